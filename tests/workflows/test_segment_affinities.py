"""`emseg segment` with a 3-D affinity checkpoint (a real, tiny torch U-Net with long-range offsets):
the agglomeration takes affinities from the prediction's metadata and runs in 3-D."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner

from emseg.cli import cli
from emseg.io import create_volume, mark_complete, open_volume, read_status
from emseg.models import save_checkpoint
from emseg.models.registry import build
from tests.support import scheduler_of

OFFSETS = ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (-3, 0, 0), (0, -3, 0), (0, 0, -3))


def test_segment_with_an_affinity_model(tmp_path: Path, connection) -> None:
    torch.manual_seed(0)
    model = build("unet", ndim=3, in_channels=1, out_channels=len(OFFSETS), base_channels=2, depth=2,
                  padding="same").eval()
    ckpt = save_checkpoint(model, tmp_path / "affs", outputs=tuple(f"aff_{i}" for i in range(len(OFFSETS))),
                           offsets=OFFSETS, voxel_size_nm=(10, 10, 10))
    rng = np.random.default_rng(0)
    raw = (rng.random((16, 32, 32)) * 255).astype(np.uint8)
    volume = create_volume(tmp_path / "vol.zarr", shape=raw.shape, dtype=np.uint8, chunks=(16, 32, 32),
                           voxel_size=(10.0, 10.0, 10.0))
    volume.write(volume.roi, raw)
    mark_complete(tmp_path / "vol.zarr")
    with scheduler_of(connection) as address:
        _segment_both_ways(tmp_path, ckpt, raw, address)


def _segment_both_ways(tmp_path: Path, ckpt: Path, raw: np.ndarray, address: str) -> None:
    out = tmp_path / "out.zarr"
    for fragments in ("watershed", "mutex"):
        args = ["segment", str(tmp_path / "vol.zarr"), "-o", str(out), "--model", str(ckpt), "--scheduler", address,
                "--no-progress", "--overwrite"]
        if fragments == "mutex":
            recipe = tmp_path / "mutex.toml"
            recipe.write_text('[agglomerate]\nfragments = "mutex"\nthreshold = 0.5\n')
            args += ["--pipeline", str(recipe)]
        result = CliRunner().invoke(cli, args + (["--json"] if fragments == "mutex" else []), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        if fragments == "mutex":  # the run report: time, throughput and share of every stage
            report = json.loads(result.stdout)
            stages = {s["stage"]: s for s in report["stages"]}
            assert list(stages) == ["predict", "fragments", "graph", "agglomerate", "relabel", "pyramid", "other"]
            assert all(s["voxels"] == raw.size and s["seconds"] >= 0 for s in stages.values())
            assert abs(sum(s["share"] for s in stages.values()) - 1.0) < 0.01
            assert report["cores"] >= 1 and report["seconds"] > 0
        else:
            assert "time per stage" in result.stdout and "fragments" in result.stdout
        graph = read_status(out / "labels" / "fragments")["graph"]["params"]
        assert graph["kind"] == "affinities" and graph["mode"] == "3d"
        seg = open_volume(out / "labels" / "segments")
        labels = seg.read(seg.roi)
        ids = np.unique(labels)
        assert ids[0] >= 1 and np.array_equal(ids, np.arange(1, len(ids) + 1))
        n_fragments = int(open_volume(out / "labels" / "fragments").array[:].max())
        assert len(ids) <= n_fragments
