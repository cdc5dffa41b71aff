"""Inputs in the field's formats: neuroglancer precomputed (unsharded, sharded), N5, daisy zarr, URLs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts
import zarr
from click.testing import CliRunner

from emseg.cli import cli
from emseg.errors import NotAVolumeError, VolumeNotFoundError
from emseg.geometry import Roi
from emseg.io import create_volume, mark_complete, open_volume
from tests.support import scheduler_of

SHARDING = {"@type": "neuroglancer_uint64_sharded_v1", "preshift_bits": 0, "hash": "identity", "minishard_bits": 1,
            "shard_bits": 2, "minishard_index_encoding": "gzip", "data_encoding": "gzip"}


def write_precomputed(path: Path, data: np.ndarray, *, sharded: bool, resolution=(4, 4, 50), voxel_offset=(0, 0, 0),
                      chunk_xyz=(16, 16, 4)) -> None:
    """A precomputed image layer as neuroglancer/igneous write it (axes x, y, z, channel), via tensorstore."""
    scale = {"size": list(data.shape[::-1]), "resolution": list(resolution), "encoding": "raw",
             "chunk_size": list(chunk_xyz), "voxel_offset": list(voxel_offset)}
    if sharded:
        scale["sharding"] = SHARDING
    store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": str(path)},
                     "multiscale_metadata": {"type": "image", "data_type": str(data.dtype), "num_channels": 1},
                     "scale_metadata": scale, "create": True}).result()
    store[ts.d[:].translate_to[0]][..., 0] = data.T


def write_n5(path: Path, data: np.ndarray, attrs: dict) -> None:
    """An N5 dataset as the Java tools write it: ``dimensions`` fastest first (x, y, z)."""
    store = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(path)},
                     "metadata": {"dimensions": list(data.shape[::-1]), "blockSize": [16, 16, 4],
                                  "dataType": str(data.dtype), "compression": {"type": "gzip"}},
                     "create": True}).result()
    store[...] = data.T
    meta = json.loads((path / "attributes.json").read_text())
    (path / "attributes.json").write_text(json.dumps({**meta, **attrs}))


@pytest.fixture
def data() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 255, (6, 40, 56), dtype=np.uint8)


@pytest.mark.parametrize("sharded", [False, True])
def test_precomputed_layer_reads_in_zyx_with_its_geometry(tmp_path: Path, data: np.ndarray, sharded: bool) -> None:
    layer = tmp_path / "layer"
    write_precomputed(layer, data, sharded=sharded, voxel_offset=(3, 2, 1))
    if sharded:  # really sharded: shard files, not one file per chunk
        assert (layer / "4_4_50").is_dir() and all(p.suffix == ".shard" for p in (layer / "4_4_50").iterdir())
    volume = open_volume(layer)
    assert volume.format == "precomputed" and volume.axes == ("z", "y", "x")
    assert volume.shape == (6, 40, 56) and volume.voxel_size == (50.0, 4.0, 4.0)
    assert volume.offset_nm == (50.0, 8.0, 12.0) and volume.chunks == (4, 16, 16)
    assert np.array_equal(volume.read(volume.roi), data)
    roi = Roi((-2, 5, 50), (4, 10, 10))  # mirrored past the borders like a zarr volume
    assert np.array_equal(volume.read(roi, pad="reflect"), np.pad(data, ((2, 0), (0, 0), (0, 4)), mode="reflect")[0:4, 5:15, 50:60])
    assert np.array_equal(np.asarray(volume.to_dask()), data)
    assert open_volume(f"file://{layer}").shape == volume.shape


def test_n5_dataset_and_multiscale_group(tmp_path: Path, data: np.ndarray) -> None:
    dataset = tmp_path / "raw.n5" / "s0"
    write_n5(dataset, data, {"resolution": [4, 4, 50], "offset": [0, 8, 100]})
    (tmp_path / "raw.n5" / "attributes.json").write_text(json.dumps({"n5": "2.5.0"}))
    volume = open_volume(dataset)
    assert volume.format == "n5" and volume.shape == (6, 40, 56) and volume.chunks == (4, 16, 16)
    assert volume.voxel_size == (50.0, 4.0, 4.0) and volume.offset_nm == (100.0, 8.0, 0.0)
    assert np.array_equal(volume.read(volume.roi), data)
    group = open_volume(tmp_path / "raw.n5")  # n5-viewer's s0, s1, ... group opens at s0
    assert group.path == dataset and np.array_equal(group.read(group.roi), data)
    # pixelResolution (BigDataViewer) instead of resolution
    other = tmp_path / "bdv.n5"
    write_n5(other, data, {"pixelResolution": {"unit": "nm", "dimensions": [8, 8, 30]}})
    assert open_volume(other).voxel_size == (30.0, 8.0, 8.0)


def test_daisy_zarr_keeps_resolution_and_offset(tmp_path: Path, data: np.ndarray) -> None:
    """funlib.persistence writes a plain zarr array with ``resolution`` and ``offset`` (nm, z, y, x)."""
    array = zarr.create_array(str(tmp_path / "daisy.zarr" / "raw"), shape=data.shape, chunks=(2, 20, 28),
                              dtype="uint8", zarr_format=2)
    array[:] = data
    array.attrs.update({"resolution": [40, 4, 4], "offset": [80, 0, 400]})
    volume = open_volume(tmp_path / "daisy.zarr" / "raw")
    assert volume.voxel_size == (40.0, 4.0, 4.0) and volume.offset_nm == (80.0, 0.0, 400.0)
    assert open_volume(tmp_path / "daisy.zarr" / "raw", voxel_size=(50, 5, 5)).voxel_size == (50.0, 5.0, 5.0)


def test_unknown_and_missing_inputs_fail_cleanly(tmp_path: Path) -> None:
    with pytest.raises(VolumeNotFoundError):
        open_volume(tmp_path / "missing")
    with pytest.raises(VolumeNotFoundError):
        open_volume(f"file://{tmp_path}/missing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "info").write_text("{not json")
    with pytest.raises(NotAVolumeError):
        open_volume(tmp_path / "junk")
    runner = CliRunner()
    result = runner.invoke(cli, ["segment", "ftp://host/x.zarr"])
    assert result.exit_code == 1 and result.stderr.startswith("Error: ") and "ftp://" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_s3_input_reads_like_the_local_volume(s3_bucket: str, tmp_path: Path, data: np.ndarray) -> None:
    """An OME-Zarr image in a bucket of a real S3 server (moto) opens through AWS_ENDPOINT_URL."""
    url = f"{s3_bucket}/in.zarr"
    volume = create_volume(tmp_path / "in.zarr", shape=data.shape, dtype="uint8", chunks=(2, 20, 28),
                           voxel_size=(50, 4, 4))
    volume.write(volume.roi, data)
    mark_complete(tmp_path / "in.zarr")
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).put(str(tmp_path / "in.zarr"), url[len("s3://"):], recursive=True)
    remote = open_volume(url)
    assert str(remote.path) == f"{url}/0" and remote.voxel_size == (50.0, 4.0, 4.0)
    assert np.array_equal(remote.read(remote.roi), data)
    assert np.array_equal(open_volume(f"{url}/0").read(Roi((0, 0, 0), (2, 4, 4))), data[:2, :4, :4])
    with pytest.raises(VolumeNotFoundError, match="no such"):
        open_volume(f"{s3_bucket}/nothing.zarr")
    result = CliRunner().invoke(cli, ["info", url, "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["shape"] == list(data.shape), result.output


def test_import_reads_precomputed_and_n5(tmp_path: Path, data: np.ndarray) -> None:
    write_precomputed(tmp_path / "layer", data, sharded=True)
    write_n5(tmp_path / "raw.n5", data, {"resolution": [4, 4, 50]})
    runner = CliRunner()
    for source in (tmp_path / "layer", tmp_path / "raw.n5"):
        out = tmp_path / f"{source.name}.zarr"
        result = runner.invoke(cli, ["import", str(source), str(out), "--no-progress"])
        assert result.exit_code == 0, result.output
        volume = open_volume(out)
        assert np.array_equal(volume.read(volume.roi), data) and volume.voxel_size == (50.0, 4.0, 4.0)


@pytest.mark.slow
def test_segment_reads_sharded_precomputed_and_n5_like_the_zarr(shared_data: Path, connection, tmp_path: Path) -> None:
    """The same EM as OME-Zarr, as a sharded precomputed layer and as N5: identical labels."""
    import tifffile

    raw = tifffile.imread(shared_data / "isbi2012" / "test-volume.tif")[:4, :256, :256]
    volume = create_volume(tmp_path / "in.zarr", shape=raw.shape, dtype="uint8", chunks=(4, 64, 64),
                           voxel_size=(50, 4, 4))
    volume.write(volume.roi, raw)
    mark_complete(tmp_path / "in.zarr")
    write_precomputed(tmp_path / "layer", raw, sharded=True, chunk_xyz=(64, 64, 4))
    write_n5(tmp_path / "raw.n5", raw, {"resolution": [4, 4, 50]})
    runner = CliRunner()
    labels = {}
    for name in ("in.zarr", "layer", "raw.n5"):
        out = tmp_path / f"{name}_seg.zarr"
        with scheduler_of(connection) as address:  # the session's cluster: none started for each of the runs
            result = runner.invoke(cli, ["segment", str(tmp_path / name), "-o", str(out), "--scheduler", address,
                                         "--no-progress"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        segments = open_volume(out / "labels" / "segments")
        assert segments.voxel_size == (50.0, 4.0, 4.0)
        labels[name] = segments.read(segments.roi)
    assert len(np.unique(labels["in.zarr"])) > 20  # many segments: the formats are compared on real labels
    assert np.array_equal(labels["layer"], labels["in.zarr"]) and np.array_equal(labels["raw.n5"], labels["in.zarr"])
