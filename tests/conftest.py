"""Shared fixtures: the real EM data beside the repo, small seeded volumes on disk, tiny checkpoints, local clusters."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from emseg.cluster import connect
from emseg.models import save_checkpoint
from tests import support

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# The suite starts hundreds of Python processes (xdist workers, emseg runs and their Dask workers), and each
# compiles every module it imports whose bytecode is not cached: with PYTHONDONTWRITEBYTECODE (set in some
# shells and containers) every one of them would compile emseg again, and, after the README's
# `pip install --no-compile`, torch and dask too.  The tests write bytecode whatever the caller's setting;
# the processes they start inherit this environment.
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real EM); the tests that use it fail loudly if it is missing."""
    assert SHARED_DATA.is_dir(), f"real EM data expected at {SHARED_DATA} (see README)"
    return SHARED_DATA


@pytest.fixture
def make_volume(tmp_path: Path) -> Callable[..., Path]:
    """Write a finished OME-Zarr image of seeded random data and return its path."""
    from emseg.io import create_volume, mark_complete

    def make(name: str = "vol.zarr", shape=(16, 32, 32), dtype="uint8", chunks=(8, 16, 16),
             voxel_size=(40.0, 4.0, 4.0), seed: int = 0, zarr_format: int = 3) -> Path:
        rng = np.random.default_rng(seed)
        data = rng.integers(0, 255, size=shape).astype(dtype)
        path = tmp_path / name
        volume = create_volume(path, shape=shape, dtype=dtype, chunks=chunks, voxel_size=voxel_size,
                               zarr_format=zarr_format)
        volume.write(volume.roi, data)
        mark_complete(path)
        return path

    return make


def tree_digest(path: Path) -> str:
    """Hash of every file (name and bytes) below ``path``: proves an input was left untouched."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        digest.update(str(f.relative_to(path.parent)).encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="session")
def connection():
    """A real distributed LocalCluster with 2 worker processes, shared by the session."""
    with connect(workers=2) as conn:
        yield conn


@pytest.fixture
def session_cluster(request: pytest.FixtureRequest) -> Any:
    """The session's LocalCluster (:func:`connection`), for runs that would otherwise start a cluster each
    (``--workers 1``).  Looked up at run time, so a test keeps the ``slow`` marking it had: these tests
    started clusters of their own without being slow."""
    return request.getfixturevalue("connection")


@pytest.fixture
def scheduler(session_cluster: Any) -> Iterator[str]:
    """``--scheduler`` of :func:`session_cluster`, with its TLS client settings in the Dask configuration for
    the whole test (see :func:`tests.support.scheduler_of`)."""
    with support.scheduler_of(session_cluster) as address:
        yield address


@pytest.fixture
def write_zarr(tmp_path: Path) -> Callable[..., Path]:
    """Write an array ``(z, y, x)`` or ``(c, z, y, x)`` as a finished OME-Zarr image; return its path."""
    from emseg.io import create_volume, mark_complete

    def write(data: npt.NDArray, name: str = "pred.zarr", chunks=(8, 8, 8), voxel_size=(1.0, 1.0, 1.0)) -> Path:
        path = tmp_path / name
        channels = data.shape[0] if data.ndim == 4 else None
        shape = data.shape[-3:]
        volume = create_volume(path, shape=shape, dtype=data.dtype, chunks=tuple(min(c, s) for c, s in zip(chunks, shape)),
                               voxel_size=voxel_size, channels=channels)
        volume.write(volume.roi, data)
        mark_complete(path)
        return path

    return write


def write_prediction_at(path: Path, data: npt.NDArray, chunks=(8, 16, 16), voxel_size=(1.0, 1.0, 1.0),
                        outputs: tuple[str, ...] | None = None) -> Path:
    """Write a prediction image (c, z, y, x) at ``path`` as uint8 p*255 (or float affinities); return the path."""
    from emseg.io import create_volume, mark_complete, update_status

    if data.ndim == 3:
        data = data[None]
    if np.issubdtype(data.dtype, np.floating) and outputs is None:
        data = np.round(data * 255).astype(np.uint8)
    volume = create_volume(path, shape=data.shape[1:], dtype=data.dtype, chunks=chunks, voxel_size=voxel_size,
                           channels=data.shape[0])
    volume.write(volume.roi, data)
    update_status(path, outputs=list(outputs or ("membrane",)))
    mark_complete(path)
    return path


@pytest.fixture
def write_prediction(tmp_path: Path) -> Callable[..., Path]:
    """Write a prediction image (c, z, y, x) as uint8 p*255 (or float affinities) and return its path."""

    def write(data: npt.NDArray, name: str = "pred.zarr", chunks=(8, 16, 16), voxel_size=(1.0, 1.0, 1.0),
              outputs: tuple[str, ...] | None = None) -> Path:
        return write_prediction_at(tmp_path / name, data, chunks, voxel_size, outputs)

    return write


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``checkpoints(ndim, padding, ...)``: a saved tiny U-Net, cached per session."""
    root = tmp_path_factory.mktemp("checkpoints")
    made: dict[tuple[Any, ...], Path] = {}

    def get(ndim: int = 3, padding: str = "valid", in_channels: int = 1, out_channels: int = 1,
            activation: str = "sigmoid", seed: int = 0) -> Path:
        key = (ndim, padding, in_channels, out_channels, activation, seed)
        if key not in made:
            model = support.tiny_model(ndim, padding, in_channels, out_channels, seed)
            outputs = tuple(f"out{i}" for i in range(out_channels))
            made[key] = save_checkpoint(model, root / "-".join(map(str, key)), outputs=outputs,
                                        activation=activation, normalization={"mean": 0.4, "std": 0.3})  # type: ignore[arg-type]
        return made[key]

    return get


@pytest.fixture
def write_volume(tmp_path: Path) -> Callable[..., Path]:
    """Write a finished OME-Zarr image holding ``data`` (``(z, y, x)`` or ``(c, z, y, x)``)."""
    from emseg.io import create_volume, mark_complete

    def write(data: np.ndarray, name: str = "vol.zarr", chunks: tuple[int, ...] = (8, 16, 16),
              voxel_size: tuple[float, ...] = (40.0, 4.0, 4.0)) -> Path:
        path = tmp_path / name
        channels = data.shape[0] if data.ndim == 4 else None
        volume = create_volume(path, shape=data.shape[-3:], dtype=data.dtype, chunks=chunks, voxel_size=voxel_size,
                               offset_nm=(80.0, 8.0, 4.0), channels=channels)
        volume.write(volume.roi, data)
        mark_complete(path)
        return path

    return write


@pytest.fixture(scope="session")
def cluster2(connection: Any) -> Any:
    """A real LocalCluster of 2 single-threaded worker processes, shared by the session: :func:`connection`'s
    (the same ``connect(workers=2)``; one cluster rather than two identical ones per test process)."""
    return connection


@pytest.fixture(scope="session")
def cluster1() -> Iterator[Any]:
    """A real LocalCluster of 1 worker process."""
    from emseg.cluster import connect

    with connect(workers=1) as connection:
        yield connection


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return support.build_inputs(tmp_path_factory.mktemp("inputs") / "inp")


#: Fixtures that make a test slow: a LocalCluster of worker processes, real EM through whole runs,
#: training on ISBI crops, the SLURM of cluster/slurm-up.sh.
SLOW_FIXTURES = frozenset({"connection", "cluster1", "cluster2", "shared_data", "isbi_crops", "slurm"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``slow`` every test that uses a :data:`SLOW_FIXTURES` fixture, and the static checks (ruff, mypy),
    so that ``pytest -m "not slow and not cluster"`` is the quick loop; a plain ``pytest`` runs everything.

    The tests of ``tests/cluster`` go first: under pytest-xdist they are one unit of work (see
    :func:`pytest_xdist_make_scheduler`), the longest, started at once on one worker."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & SLOW_FIXTURES or item.nodeid.startswith("tests/test_static.py"):
            item.add_marker(pytest.mark.slow)
        if "slurm" in names and not item.nodeid.startswith(CLUSTER_TESTS):
            raise pytest.UsageError(f"{item.nodeid}: tests of the dev SLURM belong in {CLUSTER_TESTS}")
    items.sort(key=lambda item: not item.nodeid.startswith(CLUSTER_TESTS))


CLUSTER_TESTS = "tests/cluster/"
"""The tests that start the dev SLURM (one per machine) live here, and run on one xdist worker."""


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """pytest-xdist: each test file is one unit of work (its module fixtures are made once), and all of
    ``tests/cluster`` one unit, so that one worker starts, uses and stops the dev SLURM."""
    from xdist.scheduler import LoadScopeScheduling

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return CLUSTER_TESTS if nodeid.startswith(CLUSTER_TESTS) else nodeid.split("::", 1)[0]

    return ByFile(config, log)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 server (moto's server mode) on 127.0.0.1 for the session; returns its endpoint URL.

    botocore/s3fs reach it through ``AWS_ENDPOINT_URL`` and the usual credential variables, as a
    user's MinIO or Ceph endpoint would be reached.
    """
    import logging
    import warnings

    with warnings.catch_warnings():  # moto's dependencies use deprecated pydantic features on import
        warnings.simplefilter("ignore")
        from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh empty bucket on the test S3 server; returns ``s3://<name>``."""
    import uuid

    import s3fs

    name = f"emseg-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"
