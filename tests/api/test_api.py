"""emseg.predict / label / segment on numpy and dask arrays equal the path-based runs (the commands)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dask.array as da
import numpy as np
import pytest

import emseg
from emseg.errors import ConfigError, VolumeShapeError
from emseg.io import create_volume, mark_complete, open_volume

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "isbi2012" / "test-volume.tif"
SMALL = dict(tile_size=(1, 128, 128), block_size=(1, 128, 128), voxel_size=(50, 4, 4))  # 8 blocks


@pytest.fixture(scope="module")
def scheduler():
    """An in-process Dask cluster for the path-based runs (the commands' code, without spawning workers)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None,
                      scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"}) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def raw() -> np.ndarray:
    if not DATA.exists():
        pytest.skip(f"{DATA} not found (../shared/data)")
    import tifffile

    return np.asarray(tifffile.imread(DATA)[:2, :256, :256])


def _image(path: Path, data: np.ndarray, voxel_size=(50.0, 4.0, 4.0)) -> Path:
    vol = create_volume(path, shape=data.shape[-3:], dtype=data.dtype, chunks=(1, 128, 128), voxel_size=voxel_size,
                        channels=data.shape[0] if data.ndim == 4 else None)
    vol.array[...] = data
    mark_complete(path)
    return path


def test_predict_numpy_dask_and_path_agree(raw: np.ndarray, tmp_path: Path, scheduler: str):
    options = {k: v for k, v in SMALL.items() if k != "voxel_size"}
    report = emseg.predict(_image(tmp_path / "raw.zarr", raw), tmp_path / "pred.zarr", **options, scheduler=scheduler)
    assert report.blocks == 8
    from_path = open_volume(tmp_path / "pred.zarr").array[...]
    from_numpy = emseg.predict(raw, **SMALL)
    assert isinstance(from_numpy, np.ndarray) and from_numpy.shape == (1, 2, 256, 256)
    # the same blocks, halos and tiles; float32 convolutions sum in an order that depends on the thread
    # layout (worker processes against threads in this process), so a rounding may differ by one uint8 step
    _assert_within_one_step(from_numpy, from_path)
    lazy = emseg.predict(da.from_array(raw, chunks=(2, 100, 100)), **SMALL)
    assert isinstance(lazy, da.Array) and lazy.chunks == ((1,), (1, 1), (128, 128), (128, 128))  # one task per block
    _assert_within_one_step(lazy.compute(), from_path)


def _assert_within_one_step(a: np.ndarray, b: np.ndarray) -> None:
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert a.shape == b.shape and a.dtype == b.dtype
    assert diff.max() <= 1 and np.count_nonzero(diff) <= 1e-3 * diff.size, (diff.max(), np.count_nonzero(diff))


def test_label_numpy_and_dask(raw: np.ndarray, tmp_path: Path, scheduler: str):
    prob = (np.asarray(raw, dtype=np.float32) < 100).astype(np.float32)[None]  # dark = membrane
    labels = emseg.label(prob, mode="2d", block_size=(1, 128, 128))
    assert labels.dtype == np.uint64 and labels.shape == (2, 256, 256)
    emseg.label(_image(tmp_path / "p.zarr", prob), tmp_path / "p.zarr", mode="2d", block_size=(1, 128, 128),
                scheduler=scheduler)
    from_path = open_volume(tmp_path / "p.zarr" / "labels" / "segments").array[...]
    np.testing.assert_array_equal(labels, from_path)
    lazy = emseg.label(da.from_array(prob), mode="2d", block_size=(1, 128, 128))
    assert isinstance(lazy, da.Array)
    np.testing.assert_array_equal(lazy.compute(), from_path)
    assert emseg.label(prob, tmp_path / "out.zarr", mode="2d").max() == labels.max()  # output= keeps a copy
    assert open_volume(tmp_path / "out.zarr").dtype == np.uint64


def test_bad_inputs_raise_emseg_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="needs output=PATH"):
        emseg.predict(str(tmp_path / "raw.zarr"))
    with pytest.raises(VolumeShapeError, match="expected a"):
        emseg.predict(np.zeros((4, 4), np.uint8))
    with pytest.raises(ConfigError, match="numpy array or a dask array"):
        emseg.label([[1, 2], [3, 4]])
    with pytest.raises(emseg.EmsegError):
        emseg.label(np.zeros((2, 8, 8), np.float32), threshold=2.0)


def test_import_is_lazy_and_all_resolves():
    code = ("import sys, emseg; assert 'torch' not in sys.modules and 'dask' not in sys.modules, 'heavy import'; "
            "import emseg.geometry; assert emseg.Roi is emseg.geometry.Roi")
    subprocess.run([sys.executable, "-c", code], check=True)
    import emseg.ops
    import emseg.workflows.label
    import emseg.workflows.predict

    assert callable(emseg.predict) and callable(emseg.label) and callable(emseg.segment)
    assert {n: getattr(emseg, n) for n in emseg.__all__}
    assert sorted(emseg.__all__) == sorted(set(emseg.__all__))


def test_agglomerate_numpy_and_dask(tmp_path: Path, scheduler: str):
    import emseg.workflows.agglomerate  # noqa: F401  (importing a workflow keeps emseg.agglomerate the function)

    rng = np.random.default_rng(0)
    shape = (8, 64, 64)
    centres = rng.uniform(0, 1, (20, 3)) * np.array(shape)
    grid = np.stack(np.meshgrid(*(np.arange(s) + 0.5 for s in shape), indexing="ij"), -1)
    cells = ((grid[..., None, :] - centres) ** 2).sum(-1).argmin(-1)
    boundary = np.zeros(shape, np.float32)
    for axis in range(3):
        index = [slice(None)] * 3
        index[axis] = slice(1, None)
        boundary[tuple(index)] = np.maximum(boundary[tuple(index)], np.diff(cells, axis=axis) != 0)
    segments = emseg.agglomerate(boundary, voxel_size=(8, 8, 8), threshold=0.5)
    assert isinstance(segments, np.ndarray) and segments.dtype == np.uint64
    assert 15 <= int(segments.max()) <= 30  # about one segment per cell (20)
    path = _image(tmp_path / "b.zarr", boundary[None], voxel_size=(8.0, 8.0, 8.0))
    emseg.agglomerate(path, threshold=0.5, scheduler=scheduler)
    np.testing.assert_array_equal(open_volume(path / "labels" / "segments").array[...], segments)
    lazy = emseg.agglomerate(da.from_array(boundary), voxel_size=(8, 8, 8), threshold=0.5)
    assert isinstance(lazy, da.Array)
    np.testing.assert_array_equal(lazy.compute(), segments)


def test_agglomerate_of_a_path_runs_what_the_command_runs(tmp_path: Path, write_prediction, scheduler: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``emseg.agglomerate(path)`` holds the output's run lock (a second concurrent call, from another
    process, is refused while the first finishes) and merges at the predicting checkpoint's
    ``agglomeration_threshold``, as ``emseg agglomerate`` does."""
    import threading

    import emseg.workflows.agglomerate as workflow
    from emseg.engine.lock import lock_path
    from emseg.io import update_status
    from tests.support import cells

    model = _tuned_checkpoint(tmp_path, 0.5)
    _, boundary = cells((16, 48, 48), 12, seed=3)
    path = write_prediction(boundary)
    update_status(path, checkpoint=str(model))  # what `emseg predict` records
    # the first call pauses inside its run (after taking the lock) until the second one has been tried
    go, inside = threading.Event(), threading.Event()
    real = workflow.segment_prediction

    def paused(*args, **kwargs):
        inside.set()
        assert go.wait(300)
        return real(*args, **kwargs)

    monkeypatch.setattr(workflow, "segment_prediction", paused)
    results: list = []
    first = threading.Thread(target=lambda: results.append(emseg.agglomerate(path, scheduler=scheduler,
                                                                             progress=False)))
    first.start()
    try:
        assert inside.wait(120) and lock_path(path).exists()
        second = ("import sys, emseg\n"
                  "from emseg.errors import OutputInUseError\n"
                  "try:\n"
                  "    emseg.agglomerate(sys.argv[1], workers=1)\n"
                  "except OutputInUseError as e:\n"
                  "    print('refused:', e)\n")
        refused = subprocess.run([sys.executable, "-c", second, str(path)], capture_output=True, text=True,
                                 timeout=300, check=False)
    finally:
        go.set()
        first.join(300)
    assert refused.returncode == 0 and refused.stdout.startswith("refused:"), refused.stdout + refused.stderr
    assert "in use by emseg agglomerate" in refused.stdout
    (report,) = results  # the first call finished
    assert sorted(report[2].segments) == [0.5]  # the checkpoint's threshold, not the default 0.8
    assert not lock_path(path).exists()
    monkeypatch.undo()
    _, _, again = emseg.agglomerate(path / "labels" / "fragments", scheduler=scheduler, progress=False)
    assert sorted(again.segments) == [0.5]  # agglomerating the fragments again: the checkpoint's threshold too


def _tuned_checkpoint(tmp_path: Path, threshold: float) -> Path:
    """The bundled checkpoint with its ``agglomeration_threshold`` set to ``threshold``."""
    import json
    import shutil

    from emseg.workflows.predict import BUNDLED

    model = tmp_path / "tuned"
    shutil.copytree(BUNDLED, model, ignore=shutil.ignore_patterns("fib3d", "*.md", "*.png"))
    config = json.loads((model / "config.json").read_text())
    config["agglomeration_threshold"] = threshold
    (model / "config.json").write_text(json.dumps(config))
    return model


def test_agglomerate_of_a_path_merges_at_the_commands_threshold(tmp_path: Path, write_prediction,
                                                                scheduler: str) -> None:
    """On the same prediction, ``emseg.agglomerate(path)`` and ``emseg agglomerate PATH`` pick the same
    threshold (the predicting checkpoint's, else the default) and write the same segments."""
    import json

    from click.testing import CliRunner

    from emseg.cli import cli
    from emseg.config import AgglomerateOptions
    from emseg.io import update_status
    from tests.support import cells

    model = _tuned_checkpoint(tmp_path, 0.5)
    _, boundary = cells((16, 48, 48), 12, seed=3)
    for checkpoint, expected in ((None, AgglomerateOptions().threshold), (model, 0.5)):
        name = "tuned" if checkpoint else "plain"
        by_api, by_command = (write_prediction(boundary, name=f"{name}_{who}.zarr") for who in ("api", "cli"))
        if checkpoint is not None:
            for path in (by_api, by_command):
                update_status(path, checkpoint=str(checkpoint))  # what `emseg predict` records
        result = CliRunner().invoke(cli, ["agglomerate", str(by_command), "--scheduler", scheduler, "--no-progress",
                                          "--json"])
        assert result.exit_code == 0, result.output
        command = [s["threshold"] for s in json.loads(result.stdout)["segments"]]
        api = sorted(emseg.agglomerate(by_api, scheduler=scheduler, progress=False)[2].segments)
        assert api == command == [expected], name
        np.testing.assert_array_equal(open_volume(by_api / "labels" / "segments").array[...],
                                      open_volume(by_command / "labels" / "segments").array[...])



def test_a_finished_lookup_is_recorded_as_status_complete_and_older_records_still_count(
        tmp_path: Path, write_prediction, scheduler: str) -> None:
    """The fragment -> segment lookups of an agglomeration say they are finished as every emseg output
    does (``status: complete``); one stored with the older ``complete: true`` is still reused, one with
    neither is made again."""
    import zarr

    from emseg.io.edges import graph_dir, lookup_attrs
    from tests.support import cells

    _, boundary = cells((16, 48, 48), 12, seed=3)
    path = write_prediction(boundary)
    fragments = path / "labels" / "fragments"
    emseg.agglomerate(path, threshold=0.5, scheduler=scheduler, progress=False)
    segments = open_volume(path / "labels" / "segments").array[...]
    assert int(segments.max()) > 1
    (lookup,) = graph_dir(fragments).glob("lookup_*")
    attrs = lookup_attrs(lookup)
    assert attrs["status"] == "complete" and "complete" not in attrs

    def agglomerate_again() -> np.ndarray:
        emseg.agglomerate(fragments, threshold=0.5, overwrite=True, scheduler=scheduler, progress=False)
        return open_volume(path / "labels" / "segments").array[...]

    # an older record: complete: true, over a lookup that sends every fragment to segment 1
    stored = zarr.open_array(str(lookup), mode="r+")
    stored[:] = np.minimum(stored[:], 1)
    old = {k: v for k, v in attrs.items() if k != "status"}
    stored.attrs.clear()
    stored.attrs.update({**old, "complete": True, "n_segments": 1})
    assert set(np.unique(agglomerate_again())) <= {0, 1}  # the stored lookup was used, not made again
    # no completion record at all: the lookup is made again, and recorded the one way
    stored.attrs.clear()
    stored.attrs.update(old)
    np.testing.assert_array_equal(agglomerate_again(), segments)
    assert lookup_attrs(lookup)["status"] == "complete"
