from pathlib import Path

import pytest

from emseg.config import PipelineConfig, load_pipeline
from emseg.errors import ConfigError

PIPELINES = sorted((Path(__file__).resolve().parents[1] / "pipelines").glob("*.toml"))


def test_recipes_exist() -> None:
    assert {p.stem for p in PIPELINES} >= {"isbi2012", "vnc_sstem", "cremi", "fib_gala", "synthetic"}


@pytest.mark.parametrize("recipe", PIPELINES, ids=lambda p: p.stem)
def test_every_recipe_validates(recipe: Path) -> None:
    config = load_pipeline(recipe)
    assert isinstance(config, PipelineConfig) and config.name == recipe.stem


def test_overrides_and_errors(tmp_path: Path) -> None:
    config = load_pipeline(PIPELINES[0], {"label": {"method": "cc", "threshold": None}})
    assert config.label.method == "cc"
    assert config.label.threshold == load_pipeline(PIPELINES[0]).label.threshold  # None keeps the recipe
    bad = tmp_path / "bad.toml"
    bad.write_text("[label]\nmethod = 'magic'\n")
    with pytest.raises(ConfigError, match=r"label.method"):
        load_pipeline(bad)
    bad.write_text("[label]\nthreshhold = 0.3\n")
    with pytest.raises(ConfigError, match=r"label.threshhold: Extra inputs"):
        load_pipeline(bad)
    bad.write_text("not toml [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_pipeline(bad)
    with pytest.raises(ConfigError, match="no such recipe"):
        load_pipeline(tmp_path / "missing.toml")


# ---------------------------------------------------------------------------------------------
# one options model per stage: the CLI, the recipe and the Python API derive from it

from click.testing import CliRunner  # noqa: E402

from emseg.cli import cli  # noqa: E402
from emseg.config import AgglomerateOptions, LabelOptions, PredictOptions, SegmentLabelOptions  # noqa: E402


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@pytest.mark.parametrize(("command", "model", "other"), [
    ("predict", PredictOptions, ()),
    ("segment", PredictOptions, ()),
    ("label", LabelOptions, ("mode",)),  # --2d/--3d
    ("agglomerate", AgglomerateOptions, ()),
])
def test_every_option_field_is_a_flag(command: str, model, other: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for name, field in model.model_fields.items():
        assert field.description, f"{model.__name__}.{name} has no doc"
        if name not in other:
            assert _flag(name) in result.output, f"emseg {command} lacks {_flag(name)}"
    for flag in ("--progress / --no-progress", "--json", "--overwrite", "--workers", "--cluster", "--scheduler"):
        assert flag in result.output, f"emseg {command} lacks {flag}"


def test_a_new_field_becomes_a_flag_a_keyword_and_part_of_the_fingerprint() -> None:
    import click

    from emseg.cli.options import option_flags, pop_fields

    class Extended(PredictOptions):
        gamma: float = 1.0
        """Raise the input to this power before the model."""

    @click.command()
    @option_flags(Extended)
    def command(**fields):
        click.echo(Extended.build(**pop_fields(fields, Extended)).fingerprint()["gamma"])

    runner = CliRunner()
    assert "--gamma FLOAT" in runner.invoke(command, ["--help"]).output
    assert runner.invoke(command, ["--gamma", "0.5"]).output.strip() == "0.5"
    assert runner.invoke(command, []).output.strip() == "1.0"
    assert Extended.build(gamma=2).gamma == 2.0


def test_build_keywords_and_errors_name_the_option() -> None:
    options = PredictOptions.build(checkpoint=Path("ckpt"), block_size=64, batch_size=None)
    assert options.model == "ckpt" and options.block_size == (64, 64, 64) and options.batch_size is None
    assert PredictOptions.build(options, tta=True).model_dump() == {**options.model_dump(), "tta": True}
    assert PredictOptions.build(options, checkpoint="other").model == "other"  # an alias replaces the field
    assert AgglomerateOptions.build(fragments_method="mutex").fragments == "mutex"
    # the model path and the block do not change the output: not fingerprinted
    assert set(options.fingerprint()) == set(PredictOptions.model_fields) - {"model", "block_size"}
    with pytest.raises(ConfigError, match=r"^--batch-size must be at least 1, got 0$"):
        PredictOptions.build(batch_size=0)
    with pytest.raises(ConfigError, match=r"^--method must be one of 'cc' or 'watershed', got 'agglomerate'$"):
        LabelOptions.build(method="agglomerate")
    with pytest.raises(ConfigError, match=r"--colour: Extra inputs are not permitted"):
        LabelOptions.build(colour="red")
    with pytest.raises(ConfigError, match=r"--thresholds: agglomeration thresholds must lie in \(0, 1\)"):
        AgglomerateOptions.build(thresholds=(0.5, 1.5))
    with pytest.raises(ConfigError, match=r"--block-size must be at least 1"):
        LabelOptions.build(block_size=(0, 8, 8))


def test_copies_that_disagreed_now_agree(tmp_path: Path) -> None:
    # `emseg label` and label() default to cc; the recipe's [label] (emseg segment) to agglomerate
    assert LabelOptions().method == "cc" and SegmentLabelOptions().method == "agglomerate"
    recipe = tmp_path / "r.toml"
    recipe.write_text("[predict]\ndtype = 'float32'\ntile_size = [1, 256, 256]\n"
                      "[label]\nmethod = 'cc'\nconnectivity = 18\nforeground = 'below'\n")
    config = load_pipeline(recipe)
    assert config.predict.dtype == "float32" and config.predict.tile_size == (1, 256, 256)
    assert config.label.connectivity == 18
    assert config.label.for_label("3d") == LabelOptions(method="cc", connectivity=18, foreground="below")


@pytest.mark.parametrize("recipe", PIPELINES, ids=lambda p: p.stem)
def test_recipes_leave_the_batch_to_the_device(recipe: Path) -> None:
    """A recipe describes data, not hardware: the batch is picked per device (one 2-D tile per pass on a
    CPU, 1.5x faster than two there; several on a GPU), so no recipe pins it."""
    assert load_pipeline(recipe).predict.batch_size is None
