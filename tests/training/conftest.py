"""Fixtures of the training tests: tiny crops of the real ISBI 2012 data, tiny-model options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile


@pytest.fixture(scope="session")
def isbi_crops(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """4 sections x 96 x 96 of ISBI 2012 train (raw uint8, labels 0 = membrane / 255 = interior)."""
    out = tmp_path_factory.mktemp("isbi")
    raw = tifffile.imread(shared_data / "isbi2012" / "train-volume.tif")[:4, 100:196, 100:196]
    labels = tifffile.imread(shared_data / "isbi2012" / "train-labels.tif")[:4, 100:196, 100:196]
    tifffile.imwrite(out / "raw.tif", np.ascontiguousarray(raw), photometric="minisblack")
    tifffile.imwrite(out / "labels.tif", np.ascontiguousarray(labels), photometric="minisblack")
    return {"raw": out / "raw.tif", "labels": out / "labels.tif"}


def tiny_args(crops: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """``emseg train`` arguments for a 2-level, 4-feature U-Net on the ISBI crops (fast on a CPU)."""
    return [
        "train",
        "--raw", f"{crops['raw']}[0:3]", "--labels", f"{crops['labels']}[0:3]",
        "--val-raw", f"{crops['raw']}[3:4]", "--val-labels", f"{crops['labels']}[3:4]",
        "--base-channels", "4", "--depth", "2", "--patch-shape", "48,48", "--batch-size", "2",
        "--threads", "1", "-o", str(out), *extra,
    ]
