"""Helpers shared by the tests: synthetic volumes, partition checks, tiny models, hostile inputs on disk."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tifffile
import zarr
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.segmentation import find_boundaries

from emseg.io import create_labels, create_volume, mark_complete, update_status


@contextlib.contextmanager
def scheduler_of(connection: Any) -> Iterator[str]:
    """The address of ``connection``'s scheduler, with the client TLS credentials that a ``--scheduler`` run
    in this process needs set in the Dask configuration (the clusters emseg starts require mutual TLS)."""
    import dask

    security = connection.client.security
    settings = {"distributed.comm.require-encryption": security.require_encryption,
                "distributed.comm.tls.ca-file": security.tls_ca_file,
                "distributed.comm.tls.client.cert": security.tls_client_cert,
                "distributed.comm.tls.client.key": security.tls_client_key}
    with dask.config.set(settings):
        yield connection.client.scheduler.address


def invoke_on(connection: Any, *argv: str) -> Any:
    """``emseg ARGV --scheduler ADDRESS`` in this process, on ``connection``'s (the session's) cluster: a run
    that needs no process of its own (a rerun after a SIGKILL, a reference run) starts no cluster."""
    from click.testing import CliRunner

    from emseg.cli import cli

    with scheduler_of(connection) as address:
        return CliRunner().invoke(cli, [*argv, "--scheduler", address])


def blob_mask(shape, seed: int, sigma: float = 1.5, level: float = 0.5) -> npt.NDArray[np.bool_]:
    """Seeded smoothed noise, thresholded: many components of all sizes crossing block faces."""
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.random(shape), sigma) > level


def assert_same_partition(labels: npt.NDArray, reference: npt.NDArray) -> None:
    """Same background and a bijection between the nonzero ids (ids may be numbered differently)."""
    np.testing.assert_array_equal(labels == 0, reference == 0)
    fg = reference != 0
    pairs = np.unique(np.stack([labels[fg].astype(np.uint64), reference[fg].astype(np.uint64)], axis=1), axis=0)
    n_labels = len(np.unique(labels[fg]))
    n_reference = len(np.unique(reference[fg]))
    assert n_labels == n_reference, f"{n_labels} segments, expected {n_reference}"
    assert len(pairs) == n_reference, f"{len(pairs) - n_reference} segments are split or merged"


def assert_consecutive_uint64(labels: npt.NDArray, n_segments: int) -> None:
    assert labels.dtype == np.uint64
    ids = np.unique(labels)
    ids = ids[ids != 0]
    np.testing.assert_array_equal(ids, np.arange(1, n_segments + 1, dtype=np.uint64))


def cells(shape: tuple[int, int, int], n: int, seed: int, *, gaps: float = 0.15,
          noise: float = 0.08, blur: float = 0.8) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.float32]]:
    """Voronoi cells and a boundary map of them: smoothed membranes with holes and noise.

    Returns the ground-truth cells (ids 1..n) and the boundary probability (float32 in [0, 1]).
    """
    rng = np.random.default_rng(seed)
    points = rng.uniform(0, 1, size=(n, 3)) * np.asarray(shape)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    _, nearest = cKDTree(points).query(grid + 0.5)
    gt = (nearest.reshape(shape) + 1).astype(np.uint32)
    membrane = find_boundaries(gt, mode="inner").astype(np.float32)
    holes = ndimage.gaussian_filter(rng.uniform(size=shape).astype(np.float32), 2.0)
    membrane[holes < np.quantile(holes, gaps)] *= 0.3  # weak spots: fragments leak, agglomeration decides
    boundary = ndimage.gaussian_filter(membrane, blur) * 1.8 + rng.normal(0, noise, size=shape).astype(np.float32)
    return gt, np.clip(boundary, 0, 1).astype(np.float32)


def smooth_volume(shape: tuple[int, ...], seed: int = 0, dtype: str = "uint8") -> np.ndarray:
    """Seeded random data, lightly smoothed so that the model sees structure."""
    rng = np.random.default_rng(seed)
    x = rng.random(shape)
    for axis in range(-3, 0):
        x = (x + np.roll(x, 1, axis) + np.roll(x, -1, axis)) / 3
    x = (x - x.min()) / (x.max() - x.min())
    if dtype == "uint8":
        return (x * 255).astype(np.uint8)
    if dtype == "uint16":
        return (x * 65535).astype(np.uint16)
    return x.astype(dtype)


def tiny_model(ndim: int = 3, padding: str = "valid", in_channels: int = 1, out_channels: int = 1,
               seed: int = 0) -> Any:
    import torch

    from emseg.models import build

    torch.manual_seed(seed)
    return build("unet", ndim=ndim, in_channels=in_channels, out_channels=out_channels, base_channels=2,
                 depth=2, padding=padding).eval()


BUNDLED = Path(__file__).resolve().parents[1] / "emseg" / "models" / "bundled"


def _image(path: Path, data: np.ndarray, channels: bool = False, **status: object) -> Path:
    vol = create_volume(path, shape=data.shape[-3:], dtype=data.dtype, chunks=(4, 16, 16), voxel_size=(40.0, 4.0, 4.0),
                        channels=data.shape[0] if channels else None)
    vol.write(vol.roi, data)
    mark_complete(path)
    if status:
        update_status(path, **status)
    return path


def build_inputs(root: Path) -> dict[str, Path]:
    """Every input the probes use, good and bad, under ``root`` (read-only from the tests' view)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    p: dict[str, Path] = {}
    raw = rng.integers(0, 255, (8, 32, 32), dtype=np.uint8)
    p["raw"] = _image(root / "raw.zarr", raw)
    p["pred"] = _image(root / "pred.zarr", rng.integers(0, 255, (1, 8, 32, 32), dtype=np.uint8), channels=True,
                       stage="predict", source=str(p["raw"]))
    seg = (np.arange(8 * 32 * 32).reshape(8, 32, 32) // 700 + 1).astype(np.uint64)
    p["seg"] = _image(root / "seg.zarr", seg)
    labels = create_labels(p["raw"], "ground_truth", dtype=np.uint64)
    labels.write(labels.roi, seg)
    mark_complete(p["raw"] / "labels" / "ground_truth")
    p["gt"] = p["raw"] / "labels" / "ground_truth"
    # a store with a damaged chunk (valid metadata, garbage bytes where blosc data should be)
    p["corrupt"] = root / "corrupt.zarr"
    shutil.copytree(p["raw"], p["corrupt"], ignore=shutil.ignore_patterns("labels"))
    chunk = next(f for f in sorted((p["corrupt"] / "0").rglob("*")) if f.is_file() and f.name != "zarr.json")
    chunk.write_bytes(b"\x02\x01garbage" * 7)
    # degenerate shapes and wrong kinds
    p["empty"] = root / "empty.zarr"
    zarr.create_array(str(p["empty"]), shape=(0, 32, 32), chunks=(4, 16, 16), dtype="uint8")
    p["flat"] = root / "flat.zarr"
    zarr.create_array(str(p["flat"]), shape=(32, 32), dtype="uint8")
    p["group"] = root / "group.zarr"
    zarr.open_group(str(p["group"]), mode="w")
    p["incomplete"] = root / "incomplete.zarr"
    create_volume(p["incomplete"], shape=(8, 32, 32), dtype="uint8", chunks=(4, 16, 16), voxel_size=(1, 1, 1))
    p["big"] = root / "big.zarr"  # 256 GiB declared, nothing written: only metadata on disk
    create_volume(p["big"], shape=(4096, 8192, 8192), dtype="uint8", chunks=(64, 512, 512), voxel_size=(1, 1, 1))
    mark_complete(p["big"])
    p["badmeta"] = root / "badmeta.zarr"
    p["badmeta"].mkdir()
    (p["badmeta"] / "zarr.json").write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    p["nanpred"] = _image(root / "nanpred.zarr", np.full((1, 8, 32, 32), np.nan, np.float32), channels=True)
    # files
    p["text"] = root / "notes.txt"
    p["text"].write_text("not a volume\n")
    p["garbage"] = root / "garbage.bin"
    p["garbage"].write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    p["garbage_tif"] = root / "garbage.tif"
    p["garbage_tif"].write_bytes(b"II*\x00" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    p["tif"] = root / "stack.tif"
    tifffile.imwrite(p["tif"], raw)
    p["int64_tif"] = root / "int64.tif"
    tifffile.imwrite(p["int64_tif"], raw.astype(np.int64))
    p["complex_tif"] = root / "complex.tif"
    tifffile.imwrite(p["complex_tif"], raw.astype(np.complex64))
    p["tif4d"] = root / "4d.tif"
    tifffile.imwrite(p["tif4d"], np.zeros((2, 2, 8, 8, 3), np.uint8))
    p["emptydir"] = root / "emptydir"
    p["emptydir"].mkdir()
    p["foreign"] = root / "foreign"  # somebody's folder: --overwrite must never delete it
    p["foreign"].mkdir()
    (p["foreign"] / "thesis.txt").write_text("four years of work\n")
    p["foreign_file"] = root / "foreign.png"
    p["foreign_file"].write_bytes(b"\x89PNG\r\n\x1a\n" + b"not emseg's" * 10)
    for suffix in ("toml", "yaml", "json"):
        p[f"binary_{suffix}"] = root / f"binary.{suffix}"
        p[f"binary_{suffix}"].write_bytes(b"\xff\xfe\x00\x81" + rng.integers(128, 256, 200, dtype=np.uint8).tobytes())
    p["bad_voxel_toml"] = root / "bad_voxel.toml"
    p["bad_voxel_toml"].write_text('name = "x"\nvoxel_size = [0, -4, 4]\n')
    p["bad_profile"] = root / "bad_profile.yaml"
    p["bad_profile"].write_text("kind: local\nworkers: -3\n")
    # checkpoints
    p["ckpt_pickle"] = root / "ckpt_pickle"
    p["ckpt_pickle"].mkdir()
    (p["ckpt_pickle"] / "model.pt").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    p["ckpt_huge"] = root / "ckpt_huge"
    shutil.copytree(BUNDLED, p["ckpt_huge"])
    config = json.loads((p["ckpt_huge"] / "config.json").read_text())
    config["model"].update(base_channels=4096, depth=6)
    (p["ckpt_huge"] / "config.json").write_text(json.dumps(config))
    p["ckpt_binary"] = root / "ckpt_binary"
    shutil.copytree(BUNDLED, p["ckpt_binary"])
    (p["ckpt_binary"] / "config.json").write_bytes(b"\xff\xfe\x00" * 50)
    p["missing"] = root / "does-not-exist.zarr"
    # symlinks: a loop, and a link to a store emseg did not make (--overwrite through it must refuse)
    (root / "loop_a").symlink_to("loop_b")
    (root / "loop_b").symlink_to("loop_a")
    p["loop"] = root / "loop_a"
    p["foreign_zarr"] = root / "foreign.zarr"
    zarr.create_array(str(p["foreign_zarr"]), shape=(8, 32, 32), chunks=(4, 16, 16), dtype="uint8")[:] = 7
    p["link_foreign"] = root / "link.zarr"
    p["link_foreign"].symlink_to("foreign.zarr")
    # an image whose metadata lists a level that is not there, and one with a codec nobody knows
    p["missing_level"] = root / "missing_level.zarr"
    shutil.copytree(p["raw"], p["missing_level"], ignore=shutil.ignore_patterns("labels"))
    meta = json.loads((p["missing_level"] / "zarr.json").read_text())
    datasets = meta["attributes"]["ome"]["multiscales"][0]["datasets"]
    datasets.append({**datasets[0], "path": "1"})
    (p["missing_level"] / "zarr.json").write_text(json.dumps(meta))
    p["codec"] = root / "codec.zarr"
    shutil.copytree(p["raw"], p["codec"], ignore=shutil.ignore_patterns("labels"))
    meta = json.loads((p["codec"] / "0" / "zarr.json").read_text())
    meta["codecs"].append({"name": "no-such-codec", "configuration": {}})
    (p["codec"] / "0" / "zarr.json").write_text(json.dumps(meta))
    # files import must refuse: pages of two shapes, a truncated stack, an empty HDF5 dataset
    p["ragged_tif"] = root / "ragged.tif"
    with tifffile.TiffWriter(p["ragged_tif"]) as tif:
        tif.write(np.ones((32, 32), np.uint8))
        tif.write(np.ones((16, 16), np.uint8))
    p["trunc_tif"] = root / "trunc.tif"
    p["trunc_tif"].write_bytes(p["tif"].read_bytes()[: p["tif"].stat().st_size // 2])
    p["empty_h5"] = root / "empty.h5"
    import h5py

    with h5py.File(p["empty_h5"], "w") as f:
        f["d"] = np.zeros((0, 5, 5), np.uint8)
    p["bad_interface"] = root / "bad_interface.yaml"
    p["bad_interface"].write_text("kind: local\nworkers: 1\ninterface: nosuchif0\n")
    p["bad_scale"] = root / "bad_scale.zarr"  # a voxel size of 0 nm in the metadata
    shutil.copytree(p["raw"], p["bad_scale"], ignore=shutil.ignore_patterns("labels"))
    meta = json.loads((p["bad_scale"] / "zarr.json").read_text())
    meta["attributes"]["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] = [0, 4, 4]
    (p["bad_scale"] / "zarr.json").write_text(json.dumps(meta))
    p["tiny_memory"] = root / "tiny_memory.yaml"
    p["tiny_memory"].write_text("kind: local\nworkers: 1\nmemory_limit: 1MB\n")
    return p


@contextlib.contextmanager
def read_only_dir(path: Path) -> Iterator[Path | None]:
    """``path`` as a read-only bind mount (root ignores permission bits); yields None where mount fails."""
    path.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "--bind", "-o", "ro", str(path), str(path)], capture_output=True).returncode == 0
    try:
        yield path if ok else None
    finally:
        if ok:
            subprocess.run(["umount", str(path)], capture_output=True, check=False)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "256k") -> Iterator[Path | None]:
    """A tmpfs of ``size`` at ``path`` (disk full after a few writes); yields None where mount fails."""
    path.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True).returncode == 0
    try:
        yield path if ok else None
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def environment() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("PYTEST_CURRENT_TEST", None)
    return env
