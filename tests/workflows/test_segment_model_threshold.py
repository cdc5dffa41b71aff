"""`emseg segment` and `emseg agglomerate` merge at the checkpoint's own ``agglomeration_threshold`` and weigh the
links across sections by its ``section_link_weight``, unless told otherwise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import tifffile
from click.testing import CliRunner

from emseg.cli import cli
from emseg.io import open_volume, read_status
from emseg.workflows.predict import BUNDLED
from tests.support import scheduler_of


def test_segment_uses_the_models_threshold_unless_a_flag_or_recipe_sets_one(shared_data: Path, tmp_path: Path,
                                                                             connection) -> None:
    with scheduler_of(connection) as address:  # the session's cluster: eight runs, no cluster started for each
        _check_thresholds(shared_data, tmp_path, address)


def _check_thresholds(shared_data: Path, tmp_path: Path, address: str) -> None:
    runner = CliRunner()
    crop = tmp_path / "crop.tif"
    tifffile.imwrite(crop, tifffile.imread(shared_data / "isbi2012" / "test-volume.tif")[:2, :256, :256])
    volume = tmp_path / "em.zarr"
    assert runner.invoke(cli, ["import", str(crop), str(volume), "--voxel-size", "50,4,4", "--no-progress"]).exit_code == 0
    model = tmp_path / "tuned"
    shutil.copytree(BUNDLED, model, ignore=shutil.ignore_patterns("fib3d", "*.md", "*.png"))
    config = json.loads((model / "config.json").read_text())
    config["agglomeration_threshold"] = 0.5
    config["section_link_weight"] = 0.3
    (model / "config.json").write_text(json.dumps(config))

    weights = {}

    def run(name: str, *flags: str) -> tuple[float, np.ndarray]:
        out = tmp_path / name
        result = runner.invoke(cli, ["segment", str(volume), "-o", str(out), "--model", str(model), "--scheduler", address,
                                     "--no-progress", *flags])
        assert result.exit_code == 0, result.output
        segments = open_volume(out / "labels" / "segments")
        weights[name] = read_status(out / "labels" / "fragments")["graph"]["params"].get("section_link_weight")
        return read_status(out)["pipeline"]["agglomerate"]["threshold"], segments.read(segments.roi)

    own, labels_own = run("own.zarr")
    flag, labels_flag = run("flag.zarr", "--merge-threshold", "0.5")
    default, labels_default = run("default.zarr", "--merge-threshold", "0.8")
    recipes = Path(__file__).resolve().parents[2] / "pipelines"
    own_recipe = tmp_path / "recipe.toml"
    own_recipe.write_text('name = "tuned"\n[agglomerate]\nthreshold = 0.92\n')
    recipe, _ = run("recipe.zarr", "--pipeline", str(own_recipe))
    unset, _ = run("unset.zarr", "--pipeline", str(recipes / "isbi2012.toml"))
    # a recipe that sets 0.92 wins over the model; the isbi2012 recipe leaves it to the model
    assert (own, flag, default, recipe, unset) == (0.5, 0.5, 0.8, 0.92, 0.5)
    assert np.array_equal(labels_own, labels_flag)  # the model's threshold is the one used, not only recorded
    assert len(np.unique(labels_own)) > len(np.unique(labels_default))  # 0.5 merges less than 0.8
    weighed = tmp_path / "weighed.toml"
    weighed.write_text('name = "weighed"\n[agglomerate]\nsection_link_weight = 0.9\n')
    run("weighed.zarr", "--pipeline", str(weighed))
    assert weights == {"own.zarr": 0.3, "flag.zarr": 0.3, "default.zarr": 0.3, "recipe.zarr": 0.3, "weighed.zarr": 0.9,
                       "unset.zarr": None}  # the model's weight, or the recipe's; the isbi2012 recipe links no sections

    # emseg agglomerate on an existing output: the model that predicted it gives the threshold too
    def again(target: Path, *flags: str) -> np.ndarray:
        result = runner.invoke(cli, ["agglomerate", str(target), "--scheduler", address, "--no-progress", "--overwrite",
                                     *flags])
        assert result.exit_code == 0, result.output
        segments = open_volume(tmp_path / "default.zarr" / "labels" / "segments")
        return segments.read(segments.roi)

    fragments = tmp_path / "default.zarr" / "labels" / "fragments"
    assert np.array_equal(again(fragments), labels_own)
    assert np.array_equal(again(fragments, "--threshold", "0.8"), labels_default)
    assert np.array_equal(again(tmp_path / "default.zarr"), labels_own)  # the prediction image as the target
