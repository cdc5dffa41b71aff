"""Meshes and skeletons exported blockwise, stitched, and read back by CloudVolume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from emseg.export.precomputed import export_precomputed
from emseg.io import create_labels, create_volume, mark_complete, open_volume
from emseg.ops.mesh import merge_skeletons, skeletonize_block

pytest.importorskip("zmesh")
pytest.importorskip("kimimaro")


@pytest.fixture
def tubes(tmp_path: Path) -> Path:
    """Two tubes running through several blocks along x and y, plus a blob; voxel size 8,4,4 nm."""
    shape = (24, 64, 96)
    raw = create_volume(tmp_path / "t.zarr", shape=shape, dtype=np.uint8, chunks=(8, 16, 16),
                        voxel_size=(8.0, 4.0, 4.0))
    raw.write(raw.roi, np.zeros(shape, np.uint8))
    labels = np.zeros(shape, np.uint64)
    labels[8:16, 20:30, 3:93] = 11  # along x
    labels[4:12, 3:61, 60:70] = 22  # along y (touches 11: a separate id)
    labels[16:22, 40:56, 10:30] = 33
    seg = create_labels(tmp_path / "t.zarr", "segments")
    seg.write(seg.roi, labels)
    mark_complete(tmp_path / "t.zarr")
    mark_complete(tmp_path / "t.zarr" / "labels" / "segments")
    return tmp_path / "t.zarr"


def test_blockwise_meshes_and_skeletons_are_stitched(tubes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import emseg.export.meshes as meshes
    import emseg.ops.mesh

    monkeypatch.setattr(meshes, "BLOCK_VOXELS", 16 * 32 * 32)  # many blocks on this small volume
    # an invalidation ball fit for these thin, short tubes (the default 300 nm is for neurons)
    teasar = {"scale": 1.5, "const": 40.0, "pdrf_scale": 100000, "pdrf_exponent": 4}
    monkeypatch.setattr(emseg.ops.mesh, "DEFAULT_TEASAR", teasar)
    report = export_precomputed(tubes, tmp_path / "pc", overwrite=False, mesh=True, skeleton=True, progress=False)
    layer = next(lay for lay in report.layers if lay.type == "segmentation")
    assert (layer.meshes, layer.skeletons) == (3, 3)
    info = json.loads((layer.path / "info").read_text())
    assert info["mesh"] == "mesh" and info["skeletons"] == "skeletons"
    assert json.loads((layer.path / "skeletons" / "info").read_text())["@type"] == "neuroglancer_skeletons"
    mesh_info = json.loads((layer.path / "mesh" / "info").read_text())
    assert mesh_info["@type"] == "neuroglancer_multilod_draco" and mesh_info["sharding"]["@type"] == \
        "neuroglancer_uint64_sharded_v1"
    assert mesh_info["spatial_index"]["chunk_size"] == [32 * 4, 32 * 4, 16 * 8]  # one index file per block
    spatial = sorted((layer.path / "mesh").glob("*.spatial"))
    assert len(spatial) == 3 * 2 * 2  # 96x64x24 voxels in 32x32x16 blocks
    assert sum("11" in json.loads(p.read_text()) for p in spatial) >= 3  # the x tube crosses blocks
    assert list((layer.path / "mesh").glob("*.shard")) and not list(tmp_path.glob("pc/mesh-pieces/*/*.npz"))

    from osteoid import Skeleton

    from emseg.ops.mesh import SKELETON_ATTRIBUTES

    labels = open_volume(tubes / "labels" / "segments").array[...]
    whole = skeletonize_block(labels, resolution_xyz=(4, 4, 8), origin_nm_xyz=(0, 0, 0), teasar=teasar)
    got = {seg_id: Skeleton.from_precomputed((layer.path / "skeletons" / str(seg_id)).read_bytes(), segid=seg_id,
                                             vertex_attributes=SKELETON_ATTRIBUTES) for seg_id in (11, 22, 33)}
    for seg_id, skeleton in got.items():
        assert len(skeleton.components()) == 1, f"segment {seg_id}: pieces not joined"
    # 11 crosses two block faces: the stitched skeleton is the whole-volume one, give or take a little
    assert got[11].cable_length() == pytest.approx(merge_skeletons([whole[11]]).cable_length(), rel=0.15)
    x = got[11].vertices[:, 0]
    assert x.min() < 8 * 4 and x.max() > 88 * 4  # spans the tube (x 3..93 voxels), in nm
    # 22 runs along a block face (x = 64) and crosses another (y = 32): one skeleton across both
    y = got[22].vertices[:, 1]
    assert y.min() < 24 * 4 and y.max() > 40 * 4


def test_cloudvolume_reads_labels_meshes_and_skeletons(tubes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import cloudvolume

    import emseg.ops.mesh

    monkeypatch.setattr(emseg.ops.mesh, "MIN_CHUNK_NM", 64.0)  # levels of detail for these small segments
    export_precomputed(tubes, tmp_path / "pc", overwrite=False, mesh=True, skeleton=True, progress=False)
    cv = cloudvolume.CloudVolume(f"file://{tmp_path}/pc/labels/segments", progress=False, fill_missing=False)
    labels = open_volume(tubes / "labels" / "segments").array[...]
    np.testing.assert_array_equal(np.asarray(cv[:, :, :])[..., 0].transpose(2, 1, 0), labels)
    assert cv.resolution.tolist() == [4, 4, 8]
    assert cv.mesh.meta.info["@type"] == "neuroglancer_multilod_draco"
    # igneous's spatial index, as igneous queries it before meshing into another mesh dir
    assert {int(i) for i in cv.mesh.spatial_index.query(cv.bounds * cv.resolution)} == {11, 22, 33}
    voxel = np.array([4.0, 4.0, 8.0])
    for seg_id in (11, 22, 33):
        z, y, x = np.nonzero(labels == seg_id)
        # the voxels' corners (neuroglancer draws voxel i over [i, i + 1) * resolution)
        lo, hi = np.array([x.min(), y.min(), z.min()]) * voxel, np.array([x.max(), y.max(), z.max()]) * voxel + voxel
        faces = []
        for lod in range(3):  # 11 (360 nm) has 3 levels of detail at 64 nm: each simplified further
            mesh = cv.mesh.get(seg_id, lod=lod)
            mesh = mesh[seg_id] if isinstance(mesh, dict) else mesh
            # level 0 on the voxel faces; level k simplified within its scale, 2**k voxels
            tolerance = voxel / 4 if lod == 0 else voxel * 2**lod
            assert np.all(np.abs(mesh.vertices.min(0) - lo) <= tolerance), (seg_id, lod, mesh.vertices.min(0), lo)
            assert np.all(np.abs(mesh.vertices.max(0) - hi) <= tolerance), (seg_id, lod, mesh.vertices.max(0), hi)
            faces.append(len(mesh.faces))
            if seg_id != 11:
                break
        assert seg_id != 11 or faces[0] > faces[1] > faces[2], faces
    skeleton = cv.skeleton.get(22)
    assert len(skeleton.vertices) > 10 and skeleton.cable_length() > 40 * 4


def test_skeleton_export_resumes_and_merges_again(tubes: Path, tmp_path: Path):
    first = export_precomputed(tubes, tmp_path / "pc", overwrite=False, skeleton=True, progress=False)
    second = export_precomputed(tubes, tmp_path / "pc", overwrite=True, skeleton=True, progress=False)
    assert [lay.skeletons for lay in first.layers] == [lay.skeletons for lay in second.layers] == [0, 3]


def test_scale_keys_and_chunks_as_igneous_names_them(tubes: Path, tmp_path: Path):
    cloudvolume = pytest.importorskip("cloudvolume", reason="pip install cloud-volume (not in the test extra: its "
                                      "boto3 and torch's s3fs pin botocore apart, pip backtracks for minutes)")
    export_precomputed(tubes / "labels" / "segments", tmp_path / "pc", overwrite=False, progress=False)
    layer = tmp_path / "pc" / "labels" / "segments"
    info = json.loads((layer / "info").read_text())
    (scale,) = info["scales"]
    assert scale["key"] == "4_4_8" and scale["resolution"] == [4, 4, 8]
    assert all(isinstance(r, int) for r in scale["resolution"])
    assert all(c <= 64 for c in scale["chunk_sizes"][0])
    # CloudVolume (which igneous uses to add mips) names a new scale from the resolution: same style
    cv = cloudvolume.CloudVolume(f"file://{layer}", progress=False)
    cv.add_scale((2, 2, 1))
    assert [s["key"] for s in cv.info["scales"]] == ["4_4_8", "8_8_8"]


def test_info_describes_precomputed_layers(tubes: Path, tmp_path: Path):
    from click.testing import CliRunner

    from emseg.cli import cli

    export_precomputed(tubes, tmp_path / "pc", overwrite=False, mesh=True, progress=False)
    runner = CliRunner()
    layer = runner.invoke(cli, ["info", str(tmp_path / "pc" / "labels" / "segments")])
    assert layer.exit_code == 0, layer.output
    assert "segmentation layer" in layer.output and "scale 4_4_8" in layer.output and "meshes:" in layer.output
    export = runner.invoke(cli, ["info", str(tmp_path / "pc"), "--json"])
    assert export.exit_code == 0, export.output
    assert [lay["type"] for lay in json.loads(export.output)["layers"]] == ["image", "segmentation"]


def test_export_on_a_cluster_gives_the_same_meshes_and_skeletons(tubes: Path, scheduler: str, tmp_path: Path):
    from click.testing import CliRunner

    from emseg.cli import cli

    export_precomputed(tubes / "labels" / "segments", tmp_path / "here", overwrite=False, mesh=True, skeleton=True,
                       progress=False)
    result = CliRunner().invoke(cli, ["export", str(tubes / "labels" / "segments"), str(tmp_path / "cluster"),
                                      "--format", "precomputed", "--mesh", "--skeleton", "--scheduler", scheduler,
                                      "--no-progress", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["layers"][0]["skeletons"] == 3
    for sub in ("mesh", "skeletons"):
        here = sorted((tmp_path / "here" / "labels" / "segments" / sub).iterdir())
        there = sorted((tmp_path / "cluster" / "labels" / "segments" / sub).iterdir())
        assert [p.name for p in here] == [p.name for p in there]
        assert all(a.read_bytes() == b.read_bytes() for a, b in zip(here, there)), sub
