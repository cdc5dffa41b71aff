from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts

from emseg.errors import OutputExistsError, SameInputOutputError, VolumeNotFoundError
from emseg.export.precomputed import export_precomputed, open_precomputed
from emseg.export.pyramid import build_pyramids
from emseg.io import open_volume


def _xyzc_to_czyx(data: np.ndarray) -> np.ndarray:
    return np.asarray(data).transpose(3, 2, 1, 0)


def test_export_reads_back_same_voxels_and_ids(output_image: Path, tmp_path: Path):
    build_pyramids(output_image, levels=2, progress=False)
    report = export_precomputed(output_image, tmp_path / "pc", overwrite=False, progress=False)
    assert [(lay.path.relative_to(tmp_path / "pc").as_posix(), lay.type, lay.scales) for lay in report.layers] == [
        ("image", "image", 3), ("labels/segments", "segmentation", 3)]
    assert "precomputed://file://" in report.summary()

    seg_info = json.loads((tmp_path / "pc" / "labels" / "segments" / "info").read_text())
    assert seg_info["type"] == "segmentation" and seg_info["data_type"] == "uint64"
    assert {s["encoding"] for s in seg_info["scales"]} == {"compressed_segmentation"}
    assert [s["resolution"] for s in seg_info["scales"]] == [[4, 4, 8], [8, 8, 16], [16, 16, 32]]
    img_info = json.loads((tmp_path / "pc" / "image" / "info").read_text())
    assert img_info["type"] == "image" and img_info["num_channels"] == 2

    for k in range(3):
        # read back with a plain tensorstore spec, not through emseg
        store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"file://{tmp_path}/pc/labels/segments",
                         "scale_index": k}).result()
        got = _xyzc_to_czyx(store.read().result())[0]
        want = open_volume(output_image / "labels" / "segments", level=k).array[:]
        assert got.dtype == np.uint64
        np.testing.assert_array_equal(got, want)
        assert set(np.unique(got)) == set(np.unique(want))
        image = _xyzc_to_czyx(open_precomputed(tmp_path / "pc" / "image", scale_index=k).read().result())
        np.testing.assert_array_equal(image, open_volume(output_image, level=k).array[:])


def test_large_scales_are_sharded_and_read_back(output_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import cloudvolume

    import emseg.export.precomputed as precomputed

    # "large" scaled down: every scale is sharded, shards of 16 KiB (a few per layer)
    monkeypatch.setattr(precomputed, "SHARD_MIN_BYTES", 0)
    monkeypatch.setattr(precomputed, "SHARD_BYTES", 1 << 14)
    monkeypatch.setattr(precomputed, "MAX_CHUNK", (8, 16, 16))
    export_precomputed(output_image, tmp_path / "pc", overwrite=False, progress=False)
    for layer, source in (("labels/segments", output_image / "labels" / "segments"), ("image", output_image)):
        info = json.loads((tmp_path / "pc" / layer / "info").read_text())
        (scale,) = info["scales"]
        assert scale["sharding"]["@type"] == "neuroglancer_uint64_sharded_v1"
        files = list((tmp_path / "pc" / layer / scale["key"]).iterdir())
        assert len(files) > 1 and all(f.suffix == ".shard" for f in files)
        want = open_volume(source).array[...]
        want = want if want.ndim == 4 else want[None]
        store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"file://{tmp_path}/pc/{layer}"}).result()
        np.testing.assert_array_equal(_xyzc_to_czyx(store.read().result()), want)
        cv = cloudvolume.CloudVolume(f"file://{tmp_path}/pc/{layer}", progress=False)
        np.testing.assert_array_equal(np.asarray(cv[:, :, :]).transpose(3, 2, 1, 0), want)


def test_export_label_image_with_meshes(output_image: Path, tmp_path: Path):
    report = export_precomputed(output_image / "labels" / "segments", tmp_path / "pc", overwrite=False, mesh=True,
                                progress=False)
    (layer,) = report.layers
    assert layer.type == "segmentation" and layer.meshes > 0
    info = json.loads((layer.path / "info").read_text())
    assert info["mesh"] == "mesh"
    ids = set(np.unique(open_volume(output_image / "labels" / "segments").array[:])) - {0}
    mesh_info = json.loads((layer.path / "mesh" / "info").read_text())
    # tensorstore reads the shards (a reader independent of the cloud-volume code that wrote them):
    # one manifest per segment, keyed by its id (big-endian uint64)
    import tensorstore as ts

    kv = ts.KvStore.open({"driver": "neuroglancer_uint64_sharded", "metadata": mesh_info["sharding"],
                          "base": f"file://{layer.path / 'mesh'}/"}).result()
    keys = {int.from_bytes(k, "big") for k in kv.list().result()}
    assert keys == {int(i) for i in ids}
    manifest = kv.read(int(next(iter(ids))).to_bytes(8, "big")).result().value
    chunk_shape, grid_origin = np.frombuffer(manifest[:12], "<f4"), np.frombuffer(manifest[12:24], "<f4")
    num_lods = int(np.frombuffer(manifest[24:28], "<u4")[0])
    extent = np.array([40, 48, 20])  # x, y, z voxels: the octree lies on the volume (a voxel of margin)
    assert num_lods >= 1 and (grid_origin >= -1).all() and (grid_origin + chunk_shape <= extent + 1).all()
    # the info file stays readable by tensorstore after adding "mesh"
    assert open_precomputed(layer.path).shape == (40, 48, 20, 1)


def test_export_float16_prediction_becomes_float32(tmp_path: Path):
    from emseg.io import create_volume, mark_complete

    vol = create_volume(tmp_path / "p.zarr", shape=(4, 8, 8), dtype=np.float16, chunks=(4, 8, 8),
                        voxel_size=(8.0, 8.0, 8.0), channels=1)
    data = np.linspace(0, 1, vol.array.size, dtype=np.float16).reshape(vol.array.shape)
    vol.write(vol.roi, data)
    mark_complete(tmp_path / "p.zarr")
    (layer,) = export_precomputed(tmp_path / "p.zarr", tmp_path / "pc", overwrite=False, progress=False).layers
    assert layer.data_type == "float32"
    np.testing.assert_array_equal(_xyzc_to_czyx(open_precomputed(layer.path).read().result()), data.astype(np.float32))


def test_export_errors(output_image: Path, tmp_path: Path):
    with pytest.raises(VolumeNotFoundError, match="no such file"):
        export_precomputed(tmp_path / "missing.zarr", tmp_path / "pc", overwrite=False, progress=False)
    (tmp_path / "pc").mkdir()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export_precomputed(output_image, tmp_path / "pc", overwrite=False, progress=False)
    with pytest.raises(SameInputOutputError):
        export_precomputed(output_image, output_image / "pc", overwrite=True, progress=False)
