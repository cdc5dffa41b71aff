"""3-D segments by default on anisotropic volumes: fragments per section, linked across sections."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from emseg.cli import cli
from emseg.io import open_volume


def _sections_per_id(labels: np.ndarray) -> np.ndarray:
    ids = [np.unique(s[s > 0]) for s in labels]
    all_ids, counts = np.unique(np.concatenate(ids), return_counts=True)
    return counts


@pytest.mark.slow
def test_anisotropic_segments_span_sections_and_2d_keeps_them_apart(shared_data: Path, cluster2, tmp_path: Path) -> None:
    from tests.support import scheduler_of

    raw = tifffile.imread(shared_data / "cremi_b_crop" / "raw.tif")[:3, :192, :192]
    tifffile.imwrite(tmp_path / "cremi.tif", raw, photometric="minisblack")
    runner = CliRunner()
    volume = tmp_path / "cremi.zarr"
    assert runner.invoke(cli, ["import", str(tmp_path / "cremi.tif"), str(volume), "--voxel-size", "40,4,4",
                               "--no-progress"]).exit_code == 0
    with scheduler_of(cluster2) as address:
        result = runner.invoke(cli, ["segment", str(volume), "--scheduler", address, "--no-progress", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["label"]["graph"]["mode"] == "3d"
    seg = open_volume(tmp_path / "cremi_seg.zarr" / "labels" / "segments")
    labels = seg.read(seg.roi)
    spans = _sections_per_id(labels)
    assert (spans >= 2).sum() >= 5  # objects continue into the next section
    # and they hold most of the voxels: small single-section pieces are the rest
    ids = np.unique(labels[labels > 0])
    crossing = ids[[len({int(z) for z in np.flatnonzero((labels == i).any(axis=(1, 2)))}) >= 2 for i in ids]]
    assert np.isin(labels, crossing).mean() > 0.5
    # per-section labels on request: no id in two sections
    with scheduler_of(cluster2) as address:
        result = runner.invoke(cli, ["segment", str(volume), "-o", str(tmp_path / "per_section.zarr"), "--2d",
                                     "--scheduler", address, "--no-progress"])
    assert result.exit_code == 0, result.output
    seg2 = open_volume(tmp_path / "per_section.zarr" / "labels" / "segments")
    assert (_sections_per_id(seg2.read(seg2.roi)) == 1).all()
