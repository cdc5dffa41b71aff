"""emseg.workflows.segment.segment takes RunOptions (or its fields as keywords), as the other stages do."""

from __future__ import annotations

import pytest

from emseg.config import RunOptions, load_pipeline
from emseg.errors import ConfigError
from emseg.workflows.segment import segment


def test_segment_takes_the_run_options_or_their_keywords(make_volume, tmp_path) -> None:
    volume = make_volume(shape=(4, 128, 128), chunks=(4, 64, 64))
    config = load_pipeline(None)
    by_model = segment(volume, tmp_path / "a.zarr", config, run=RunOptions(workers=1, overwrite=True), dry_run=True)
    by_keyword = segment(volume, tmp_path / "a.zarr", config, workers=1, overwrite=True, dry_run=True)
    assert by_model.params == by_keyword.params and len(by_model.grid) == len(by_keyword.grid)
    with pytest.raises(ConfigError, match="unknown option 'wokers'"):
        segment(volume, tmp_path / "b.zarr", config, wokers=1)
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()
