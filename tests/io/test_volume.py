from pathlib import Path

import numpy as np
import pytest
import zarr
from ome_zarr_models import open_ome_zarr

from emseg.errors import (
    IncompleteOutputError,
    NotAVolumeError,
    OutputExistsError,
    UnsupportedDtypeError,
    VolumeNotFoundError,
    VolumeShapeError,
)
from emseg.geometry import Roi
from emseg.io import create_labels, create_volume, mark_complete, open_volume
from emseg.io.volume import STATUS_KEY


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_ome_zarr_image_and_labels_validate(tmp_path: Path, zarr_format: int) -> None:
    path = tmp_path / "img.zarr"
    volume = create_volume(path, shape=(6, 10, 12), dtype="uint8", chunks=(3, 5, 6), voxel_size=(40, 4, 4),
                           zarr_format=zarr_format)
    volume.write(volume.roi, np.ones((6, 10, 12), np.uint8))
    labels = create_labels(path, "segments")
    mark_complete(path)
    with pytest.raises(IncompleteOutputError, match="half-written"):
        open_volume(path / "labels" / "segments")
    mark_complete(path / "labels" / "segments")
    image = open_ome_zarr(zarr.open_group(str(path), mode="r"))
    assert type(image).__module__.startswith("ome_zarr_models.v05" if zarr_format == 3 else "ome_zarr_models.v04")
    label_image = open_ome_zarr(zarr.open_group(str(path / "labels" / "segments"), mode="r"))
    assert "ImageLabel" in type(label_image).__name__
    assert labels.dtype == np.uint64 and labels.shape == (6, 10, 12)
    reopened = open_volume(path)
    assert reopened.voxel_size == (40.0, 4.0, 4.0)
    assert open_volume(path / "0").voxel_size == (40.0, 4.0, 4.0)  # a level: metadata from the parent
    assert open_volume(path / "labels" / "segments").dtype == np.uint64


def test_channels_axis(tmp_path: Path) -> None:
    volume = create_volume(tmp_path / "p.zarr", shape=(4, 8, 8), dtype="float16", chunks=(2, 8, 8),
                           voxel_size=(1, 1, 1), channels=3)
    assert volume.axes == ("c", "z", "y", "x") and volume.channels == 3 and volume.shape == (4, 8, 8)
    data = np.random.default_rng(0).random((3, 2, 8, 8)).astype(np.float16)
    volume.write(Roi((1, 0, 0), (2, 8, 8)), data)
    assert np.array_equal(volume.read(Roi((1, 0, 0), (2, 8, 8))), data)


@pytest.mark.parametrize("roi", [Roi((-3, -5, -7), (16, 30, 44)), Roi((4, 10, 20), (9, 15, 20)),
                                 Roi((-25, -40, -2), (60, 90, 5)), Roi((2, -4, 25), (6, 12, 9))])
def test_reflect_read_matches_numpy_pad(make_volume, roi: Roi) -> None:
    volume = open_volume(make_volume(shape=(10, 20, 30)))
    whole = volume.read(volume.roi)
    pad = 100
    padded = np.pad(whole, pad, mode="reflect")
    expected = padded[roi.shift(pad).to_slices()]
    assert np.array_equal(volume.read(roi, pad="reflect"), expected)


def test_constant_read_and_strict_read(make_volume) -> None:
    volume = open_volume(make_volume(shape=(4, 8, 8)))
    out = volume.read(Roi((-1, 0, 0), (3, 8, 8)), pad="constant")
    assert (out[0] == 0).all() and np.array_equal(out[1:], volume.read(Roi((0, 0, 0), (2, 8, 8))))
    with pytest.raises(VolumeShapeError, match="reaches outside"):
        volume.read(Roi((-1, 0, 0), (3, 8, 8)))


def test_incomplete_output_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "half.zarr"
    create_volume(path, shape=(2, 4, 4), dtype="uint8", chunks=(2, 4, 4), voxel_size=(1, 1, 1))
    with pytest.raises(IncompleteOutputError, match="half-written"):
        open_volume(path)
    with pytest.raises(IncompleteOutputError, match="half-written"):
        open_volume(path / "0")
    assert open_volume(path, allow_incomplete=True).shape == (2, 4, 4)


def test_a_store_killed_before_its_multiscales_is_refused_as_half_written(tmp_path: Path) -> None:
    """A run killed after it marked its group incomplete, before the multiscales, and in the middle of a
    child's metadata (zarr's atomic write leaves ``zarr.<uuid>.partial`` and no ``zarr.json``)."""
    path = tmp_path / "killed.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.attrs[STATUS_KEY] = {"status": "incomplete"}
    (path / "labels").mkdir()
    (path / "labels" / "zarr.0123abcd.partial").write_bytes(b"{")
    with pytest.raises(IncompleteOutputError, match="half-written"):  # and no zarr warning (errors here)
        open_volume(path)
    group.attrs[STATUS_KEY] = {"status": "complete"}  # a finished group without multiscales: not an image
    with pytest.raises(NotAVolumeError, match="without OME-Zarr multiscales"):
        open_volume(path)


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(VolumeNotFoundError, match="no such file"):
        open_volume(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(NotAVolumeError, match="not a zarr"):
        open_volume(tmp_path / "plain")
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("raw", shape=(2, 2, 2), dtype="uint8")
    with pytest.raises(NotAVolumeError, match=r"holds arrays \['raw'\]"):
        open_volume(tmp_path / "g.zarr")
    assert open_volume(tmp_path / "g.zarr" / "raw").shape == (2, 2, 2)
    zarr.create_array(str(tmp_path / "2d.zarr"), shape=(4, 4), dtype="uint8")
    with pytest.raises(VolumeShapeError, match="expected 3 spatial axes"):
        open_volume(tmp_path / "2d.zarr")
    zarr.create_array(str(tmp_path / "c.zarr"), shape=(4, 4, 4), dtype="complex64")
    with pytest.raises(UnsupportedDtypeError, match="complex64"):
        open_volume(tmp_path / "c.zarr")
    create_volume(tmp_path / "o.zarr", shape=(2, 2, 2), dtype="uint8", chunks=(2, 2, 2), voxel_size=(1, 1, 1))
    with pytest.raises(OutputExistsError, match="--overwrite"):
        create_volume(tmp_path / "o.zarr", shape=(2, 2, 2), dtype="uint8", chunks=(2, 2, 2), voxel_size=(1, 1, 1))
