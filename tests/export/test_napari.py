"""napari opens emseg outputs headless, through its reader plugin API (no viewer, no Qt).

napari-ome-zarr shows the root of an output as the prediction and its label images (scaled to
nanometres); napari's builtin zarr reader opens each image of it (prediction, segments) with all
its pyramid levels.  napari and napari-ome-zarr are in the test extra.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from emseg.io import open_volume

# napari's own modules still use pydantic v1 idioms: their deprecation warnings are not ours
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::PendingDeprecationWarning",
                                        "ignore::FutureWarning")


def _levels(data: object) -> list[np.ndarray]:
    return list(data) if isinstance(data, (list, tuple)) else [data]  # type: ignore[call-overload]


def test_napari_ome_zarr_shows_prediction_and_labels(output_image: Path):
    reader_module = pytest.importorskip("napari_ome_zarr._reader")
    reader = reader_module.napari_get_reader(str(output_image))
    assert reader is not None
    layers = reader(str(output_image))
    kinds = [kind for _, _, kind in layers]
    assert kinds.count("image") >= 1 and kinds.count("labels") == 1, kinds
    labels = next(data for data, _, kind in layers if kind == "labels")
    full = np.asarray(_levels(labels)[0]).squeeze()
    np.testing.assert_array_equal(full, open_volume(output_image / "labels" / "segments").array[...])
    for _, meta, kind in layers:
        assert list(meta["scale"])[-3:] == [8.0, 4.0, 4.0], (kind, meta.get("scale"))  # nm, z y x


def test_napari_builtin_reader_opens_each_image(output_image: Path):
    builtins = pytest.importorskip("napari_builtins.io._read")
    for image in (output_image, output_image / "labels" / "segments"):
        path = str(image) if image != output_image else str(output_image / "0")
        reader = builtins.napari_get_reader(path)
        assert reader is not None, path
        (layer,) = reader(path)
        data = layer[0]  # (data,) or (data, meta[, kind]): an image layer
        assert len(layer) < 3 or layer[2] == "image"
        np.testing.assert_array_equal(np.asarray(_levels(data)[0]), open_volume(image).array[...])
