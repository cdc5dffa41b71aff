"""emseg.label skips blocks without foreground in its relabel stage; the result still equals cc3d."""

from __future__ import annotations

import cc3d
import numpy as np

from emseg.io import open_volume
from emseg.workflows.label import label
from tests.support import assert_consecutive_uint64, assert_same_partition, blob_mask


def test_empty_blocks_stay_background_and_stale_labels_are_replaced(connection, write_zarr, tmp_path) -> None:
    mask = blob_mask((16, 32, 32), seed=3)
    mask[:, :, 16:] = False  # the blocks of x >= 16 hold no foreground
    pred = write_zarr(np.where(mask, 40, 220).astype(np.uint8)[None])
    out = tmp_path / "labels.zarr"
    # an earlier run with everything foreground leaves labels in every chunk; --overwrite must clear them
    everything = write_zarr(np.full((1, 16, 32, 32), 40, np.uint8), name="full.zarr")
    label(everything, out, block_size=(8, 16, 16), client=connection, progress=False)
    report = label(pred, out, block_size=(8, 16, 16), client=connection, progress=False, overwrite=True)
    volume = open_volume(report.labels_path)
    labels = volume.read(volume.roi)
    expected, n = cc3d.connected_components(mask, connectivity=6, return_N=True)
    assert_same_partition(labels, expected)
    assert_consecutive_uint64(labels, n)
    assert not labels[:, :, 16:].any() and labels[:, :, :16].any()
