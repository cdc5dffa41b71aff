"""Pyramids and precomputed export as blockwise stages: on a real LocalCluster, equal to the one-shot
result, and resumed after SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from emseg.engine.ledger import Ledger
from emseg.export import pyramid
from emseg.export.precomputed import export_precomputed, open_precomputed
from emseg.export.pyramid import build_pyramids, downsample_mean, downsample_mode
from emseg.geometry import Roi
from emseg.io import create_labels, create_volume, mark_complete, open_volume

SMALL_PASSES = 1 << 18  # source voxels per block of a pass: many blocks on a small image


@pytest.fixture(scope="module")
def client(request: pytest.FixtureRequest):
    """The client of the session's LocalCluster of 2 worker processes (conftest's ``connection``)."""
    return request.getfixturevalue("connection").client


def _image(tmp_path: Path, shape=(16, 256, 256), chunks=(4, 32, 32), voxel_size=(40.0, 4.0, 4.0)) -> Path:
    rng = np.random.default_rng(5)
    out = tmp_path / "img.zarr"
    img = create_volume(out, shape=shape, dtype=np.uint8, chunks=chunks, voxel_size=voxel_size, channels=1)
    img.write(img.roi, rng.integers(0, 256, (1, *shape), dtype=np.uint8))
    seg = create_labels(out, "segments", chunks=chunks)
    labels = (rng.integers(0, 6, shape) * (2**40 + 1)).astype(np.uint64)
    seg.write(seg.roi, labels)
    mark_complete(out)
    mark_complete(out / "labels" / "segments")
    return out


def _reference(data: np.ndarray, factors, method: str) -> list[np.ndarray]:
    out = [data]
    for f in factors:
        prev = out[-1]
        if method == "mode":
            out.append(downsample_mode(prev, f))
        else:
            out.append(downsample_mean(prev, f))
    return out


def test_pyramid_on_workers_in_several_level_passes_equals_level_by_level(client, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(pyramid, "PASS_READ_VOXELS", SMALL_PASSES)
    img = _image(tmp_path, chunks=(4, 64, 64))  # a write unit of level 2 reads 4x64x64 x 16 = SMALL_PASSES
    image, seg = build_pyramids(img, levels=3, client=client, progress=False)
    state = sorted(p.name for p in (img / "emseg_state").iterdir() if p.name.startswith("pyramid-"))
    assert state == ["pyramid-1-2", "pyramid-3-3"]  # levels 1 and 2 from one read of level 0
    factors = [lv.factor for lv in image.levels]
    steps = [tuple(b // a for a, b in zip(p, q)) for p, q in zip(factors, factors[1:])]
    raw = open_volume(img).read(Roi.from_shape((16, 256, 256)))
    for k, ref in enumerate(_reference(raw, steps, "mean")):
        np.testing.assert_array_equal(open_volume(img, level=k).read(Roi.from_shape(ref.shape[1:])), ref)
    labels = open_volume(img / "labels" / "segments").read(Roi.from_shape((16, 256, 256)))
    for k, ref in enumerate(_reference(labels, steps, "mode")):
        np.testing.assert_array_equal(open_volume(img / "labels" / "segments", level=k).read(Roi.from_shape(ref.shape)),
                                      ref)
    assert seg.levels[-1].shape == (16, 32, 32)
    again = build_pyramids(img, levels=3, client=client, progress=False)  # resumes: nothing to do
    assert [lv.shape for lv in again[0].levels] == [lv.shape for lv in image.levels]
    assert Ledger(img, "pyramid-1-2").done_mask().all()


def _kill_when(proc: subprocess.Popen[bytes], done: callable, deadline_s: float = 240) -> int:
    count = 0
    try:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            try:
                count = done()
            except Exception:  # noqa: BLE001 - the ledger is not created yet
                continue
            if count >= 3:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return count


def test_pyramid_resumes_after_sigkill(client, tmp_path, monkeypatch) -> None:
    img = _image(tmp_path, shape=(16, 512, 512), chunks=(2, 32, 32))
    script = textwrap.dedent(f"""
        from emseg.export import pyramid
        pyramid.PASS_READ_VOXELS = {SMALL_PASSES}
        pyramid.build_pyramid({str(img / 'labels' / 'segments')!r}, levels=2, progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seg = img / "labels" / "segments"
    stage = "pyramid-1-2"
    killed_at = _kill_when(proc, lambda: int(Ledger(seg, stage).done_mask().sum()))
    done = int(Ledger(seg, stage).done_mask().sum())
    total = len(Ledger(seg, stage).done_mask())
    assert 3 <= done < total, f"not caught mid-way ({killed_at}, {done} of {total} blocks)"
    monkeypatch.setattr(pyramid, "PASS_READ_VOXELS", SMALL_PASSES)
    result = pyramid.build_pyramid(seg, levels=2, client=client, progress=False)
    assert Ledger(seg, stage).done_mask().all()
    labels = open_volume(seg).read(Roi.from_shape((16, 512, 512)))
    steps = [(1, 2, 2), (1, 2, 2)]
    for k, ref in enumerate(_reference(labels, steps, "mode")):
        np.testing.assert_array_equal(open_volume(seg, level=k).read(Roi.from_shape(ref.shape)), ref)
    assert [lv.shape for lv in result.levels] == [(16, 512, 512), (16, 256, 256), (16, 128, 128)]


def test_precomputed_export_on_workers_resumes_after_sigkill(client, tmp_path) -> None:
    img = _image(tmp_path, shape=(16, 512, 512), chunks=(4, 64, 64))
    seg = img / "labels" / "segments"
    dst = tmp_path / "pc"
    script = textwrap.dedent(f"""
        from emseg.export import precomputed
        precomputed.BLOCK_VOXELS = 1 << 14
        precomputed.export_precomputed({str(seg)!r}, {str(dst)!r}, overwrite=False, progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stage = "export-labels-segments-0"
    _kill_when(proc, lambda: int(Ledger(dst, stage).done_mask().sum()))
    mask = Ledger(dst, stage).done_mask()
    assert 3 <= int(mask.sum()) < len(mask), f"not caught mid-way ({int(mask.sum())} of {len(mask)})"
    from emseg.export import precomputed

    saved = precomputed.BLOCK_VOXELS
    precomputed.BLOCK_VOXELS = 1 << 14  # the same block grid as the killed run: it resumes
    try:
        report = export_precomputed(seg, dst, overwrite=False, progress=False, client=client)
    finally:
        precomputed.BLOCK_VOXELS = saved
    assert Ledger(dst, stage).done_mask().all()
    (layer,) = report.layers
    stored = open_precomputed(layer.path).read().result()
    labels = open_volume(seg).read(Roi.from_shape((16, 512, 512)))
    np.testing.assert_array_equal(stored[..., 0].transpose(2, 1, 0), labels)
