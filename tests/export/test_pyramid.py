from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import zarr

from emseg.errors import ConfigError, NotAVolumeError
from emseg.export import pyramid
from emseg.export.pyramid import build_pyramid, build_pyramids, choose_factors, downsample_mean, downsample_mode
from emseg.io import create_labels, create_volume, mark_complete, open_volume


def _mode_reference(labels: np.ndarray, factor: tuple[int, int, int]) -> np.ndarray:
    """Python-loop mode with the documented tie rule: smallest non-zero among the most frequent."""
    out_shape = tuple(-(-s // f) for s, f in zip(labels.shape, factor))
    out = np.zeros(out_shape, labels.dtype)
    for idx in itertools.product(*(range(s) for s in out_shape)):
        group = labels[tuple(slice(i * f, (i + 1) * f) for i, f in zip(idx, factor))].ravel()
        values, counts = np.unique(group, return_counts=True)
        best = values[counts == counts.max()]
        nonzero = best[best != 0]
        out[idx] = nonzero.min() if nonzero.size else 0
    return out


@pytest.mark.parametrize("factor", [(2, 2, 2), (1, 2, 2)])
@pytest.mark.parametrize("shape", [(4, 6, 8), (5, 7, 3)])
def test_mode_matches_reference_and_keeps_only_existing_ids(shape, factor):
    rng = np.random.default_rng(0)
    labels = rng.choice(np.array([0, 3, 7, 2**40 + 1], dtype=np.uint64), size=shape)
    got = downsample_mode(labels, factor)
    assert got.dtype == np.uint64
    assert got.shape == tuple(-(-s // f) for s, f in zip(shape, factor))
    np.testing.assert_array_equal(got, _mode_reference(labels, factor))
    assert set(np.unique(got)) <= set(np.unique(labels))


def test_mode_tie_rule():
    tie = np.array([[[5, 5], [9, 9]], [[0, 0], [0, 0]]], dtype=np.uint32)  # 0 x4 beats 5 x2, 9 x2
    assert downsample_mode(tie, (2, 2, 2)).item() == 0
    tie[1] = [[9, 9], [5, 1]]  # 9 x4 wins
    assert downsample_mode(tie, (2, 2, 2)).item() == 9
    even = np.array([[[0, 0], [4, 4]]], dtype=np.uint64)  # 0 and 4 tie: background loses
    assert downsample_mode(even, (1, 2, 2)).item() == 4


def test_mean_matches_numpy_and_handles_odd_edges():
    data = np.arange(3 * 5 * 4, dtype=np.float32).reshape(3, 5, 4)
    got = downsample_mean(data, (2, 2, 2))
    assert got.shape == (2, 3, 2)
    assert got[0, 0, 0] == data[:2, :2, :2].mean()
    assert got[1, 2, 1] == data[2:, 4:, 2:].mean()  # a partial group averages what exists
    chans = np.stack([data, 2 * data]).astype(np.uint16)
    np.testing.assert_array_equal(downsample_mean(chans, (2, 2, 2))[1], np.rint(2 * got).astype(np.uint16))


def test_choose_factors():
    assert choose_factors((40.0, 4.0, 4.0)) == (1, 2, 2)
    assert choose_factors((8.0, 8.0, 8.0)) == (2, 2, 2)
    assert choose_factors((16.0, 8.0, 8.0)) == (2, 2, 2)
    assert choose_factors((17.0, 8.0, 8.0)) == (1, 2, 2)


def test_pyramid_levels_shapes_voxel_sizes_and_metadata(output_image: Path):
    results = build_pyramids(output_image, levels=2, progress=False)
    image, seg = results
    assert image.method == "mean" and seg.method == "mode"
    # voxel size (8, 4, 4): z is within 2x of xy, so every level halves all axes
    assert [lv.shape for lv in image.levels] == [(20, 48, 40), (10, 24, 20), (5, 12, 10)]
    assert [lv.voxel_size for lv in seg.levels] == [(8.0, 4.0, 4.0), (16.0, 8.0, 8.0), (32.0, 16.0, 16.0)]
    assert seg.levels[2].translation == (12.0, 6.0, 6.0)  # (f - 1) / 2 * voxel size
    for path in (output_image, output_image / "labels" / "segments"):
        for k, lv in enumerate(image.levels):
            vol = open_volume(path, level=k)
            assert vol.shape == lv.shape and vol.voxel_size == lv.voxel_size
    pred = open_volume(output_image, level=1)
    assert pred.channels == 2
    # labels: only existing IDs at every level
    ids0 = set(np.unique(open_volume(output_image / "labels" / "segments").array[:]))
    for k in (1, 2):
        assert set(np.unique(open_volume(output_image / "labels" / "segments", level=k).array[:])) <= ids0
    # the metadata is valid NGFF 0.5
    from ome_zarr_models import open_ome_zarr

    open_ome_zarr(zarr.open_group(str(output_image), mode="r"))
    open_ome_zarr(zarr.open_group(str(output_image / "labels" / "segments"), mode="r"))


def test_anisotropic_default_levels_zarr_v2(tmp_path: Path):
    img = tmp_path / "aniso.zarr"
    vol = create_volume(img, shape=(6, 600, 520), dtype=np.uint8, chunks=(6, 128, 128), voxel_size=(40.0, 4.0, 4.0),
                        zarr_format=2)
    mark_complete(img)
    result = build_pyramid(img, progress=False)  # default: until y, x fit in 256 voxels
    assert [lv.shape for lv in result.levels] == [(6, 600, 520), (6, 300, 260), (6, 150, 130)]
    assert result.levels[-1].voxel_size == (40.0, 16.0, 16.0)
    assert "multiscales" in zarr.open_group(str(img), mode="r").attrs  # NGFF 0.4 keeps keys on top
    assert open_volume(img, level=2).shape == (6, 150, 130)
    del vol


def test_blockwise_equals_whole_volume(tmp_path: Path, monkeypatch, blob_labels):
    img = tmp_path / "img.zarr"
    vol = create_volume(img, shape=(18, 36, 44), dtype=np.uint8, chunks=(4, 8, 8), voxel_size=(4.0, 4.0, 4.0))
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, vol.shape, dtype=np.uint8)
    vol.write(vol.roi, data)
    seg = create_labels(img, "s")
    labels = blob_labels(vol.shape, seed=6)
    seg.write(seg.roi, labels)
    mark_complete(img)
    mark_complete(img / "labels" / "s")
    monkeypatch.setattr(pyramid, "BLOCK_VOXELS", 4 * 8 * 8 * 2)  # many small blocks
    build_pyramids(img, levels=2, progress=False)
    once = downsample_mode(downsample_mode(labels, (2, 2, 2)), (2, 2, 2))
    np.testing.assert_array_equal(open_volume(img / "labels" / "s", level=2).array[:], once)
    mean1 = downsample_mean(data, (2, 2, 2))
    np.testing.assert_array_equal(open_volume(img, level=1).array[:], mean1)


def test_rebuild_replaces_levels(output_image: Path):
    build_pyramid(output_image, levels=3, progress=False)
    result = build_pyramid(output_image, levels=1, progress=False)
    assert open_volume(output_image).levels == ("0", "1") == tuple(lv.path for lv in result.levels)
    assert "2" not in zarr.open_group(str(output_image), mode="r")


def test_pyramid_errors(output_image: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="factors must be 1 or 2"):
        build_pyramid(output_image, levels=1, factors=(1, 3, 3), progress=False)
    with pytest.raises(ConfigError, match="at most"):
        build_pyramid(output_image, levels=9, progress=False)
    with pytest.raises(ConfigError, match="levels must be between"):
        build_pyramid(output_image, levels=-1, progress=False)
    with pytest.raises(ConfigError, match="method must be"):
        build_pyramid(output_image, levels=1, method="max", progress=False)  # type: ignore[arg-type]
    floats = create_volume(tmp_path / "f.zarr", shape=(4, 8, 8), dtype=np.float32, chunks=(4, 8, 8),
                           voxel_size=(1.0, 1.0, 1.0))
    mark_complete(tmp_path / "f.zarr")
    with pytest.raises(ConfigError, match="needs integer labels"):
        build_pyramid(floats.image_path, levels=1, method="mode", progress=False)  # type: ignore[arg-type]
    zarr.create_array(str(tmp_path / "bare.zarr"), shape=(4, 4, 4), dtype="uint8", chunks=(4, 4, 4))
    with pytest.raises(NotAVolumeError, match="bare array"):
        build_pyramid(tmp_path / "bare.zarr", levels=1, progress=False)
