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
