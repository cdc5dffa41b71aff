"""Benchmark ``emseg predict`` against its forward-only limit and MONAI's sliding window, in one run.

One volume of real EM (the ISBI 2012 test volume, 30 x 512 x 512, tiled 2 x 2 in (y, x) and repeated
along z to ``--shape``, default 32 x 1024 x 1024 = 33.5 Mvoxel uint8, OME-Zarr), one machine, the same
cores for every method:

1. ``emseg valid``: :func:`emseg.workflows.predict.predict` with **default settings** (precision, tile, batch,
   worker layout) and the bundled 2-D U-Net (valid padding), on a local cluster started before
   timing; stage time: zarr read with mirrored halo, normalisation, tiles, forward, uint8 zarr write.
2. ``forward-only valid``: only the forward passes of that plan (same model, tile input and batch
   shape, count), random input already in memory, with the best settings (bf16 + channels-last
   where the CPU has native bf16, as the plan): run (a) as tasks on the same cluster's workers
   (same processes, same layout) and (b) in this process with ``torch.set_num_threads(cores)``.
   The better of the two is the limit.
3. ``emseg same``, ``monai 0.25``, ``monai 0.5``: a random-weight "same"-padded 2-D U-Net (base 16,
   depth 3), which MONAI can run (it needs an output the size of its input): ``emseg predict``
   defaults versus ``monai.inferers.sliding_window_inference`` over the volume already in memory as
   a tensor (no I/O), Gaussian blending, bf16 autocast + channels-last, in this process with
   ``torch.set_num_threads(cores)``, ROI ``--monai-roi`` with ``--monai-batch`` windows per pass.
   ``forward-only same, workers``: the forward passes of that emseg plan alone, on the workers.
   ``monai 0.5, fused model``: MONAI at overlap 0.5 handed the model as emseg's CPU workers run it in
   bf16 (conv blocks fused into single oneDNN ops, :func:`emseg.ops.inference.fuse_conv_blocks`): the same
   engine on both sides, so that what is left is the sliding-window strategy (CPU with bf16 only).
4. ``--layouts``: ``emseg valid`` again with 1 worker x N threads and N workers x 1 thread.

The script re-executes itself under emseg's worker malloc settings (:func:`with_worker_malloc`), so that
MONAI and the in-process loop run with the allocator emseg's workers have.

Throughput is output voxels / s.  Run with ``nice``, on a quiet machine if you can; the load average
is printed before and after.

    nice .venv/bin/python benchmarks/bench_predict.py                       # ~10 min on 2 quiet cores
    nice .venv/bin/python benchmarks/bench_predict.py --shape 8,1024,1024 --layouts
    nice .venv/bin/python benchmarks/bench_predict.py --quick               # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isbi2012" / "test-volume.tif"


FUSED_MONAI = "monai 0.5, fused model"


def load(path: Path = DATA) -> np.ndarray:
    import tifffile

    return np.asarray(tifffile.imread(path))


def tiled(raw: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """``raw`` repeated (tiled) to cover ``shape`` (z, y, x), then cropped."""
    reps = [-(-s // r) for s, r in zip(shape, raw.shape)]
    return np.tile(raw, reps)[: shape[0], : shape[1], : shape[2]]


def make_volume(path: Path, data: np.ndarray) -> Path:
    from emseg.geometry import Roi
    from emseg.io import create_volume, mark_complete

    volume = create_volume(path, shape=data.shape, dtype="uint8", chunks=(16, 256, 256), voxel_size=(50, 4, 4),
                           overwrite=True)
    for z in range(0, data.shape[0], 16):
        part = data[z: z + 16]
        volume.write(Roi((z, 0, 0), part.shape), part)
    mark_complete(path)
    return path


def uptime() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def cores() -> int:
    return len(os.sched_getaffinity(0))


def _forward_task(checkpoint: str, shape: tuple[int, ...], batches: int, precision: str, threads: int) -> float:
    """Worker side: ``batches`` forward passes of a random batch of ``shape``, as emseg's workers run them."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(threads)
    return _forward_loop(checkpoint, shape, batches, precision, device)


def _forward_loop(checkpoint: str, shape: tuple[int, ...], batches: int, precision: str, device: str) -> float:
    import torch

    from emseg.models import load_checkpoint
    from emseg.ops.inference import _forward, prepare_model

    model = prepare_model(load_checkpoint(checkpoint).model, device, precision)  # type: ignore[arg-type]
    x = torch.randn(*shape, device=device).contiguous(memory_format=torch.channels_last)
    _forward(model, x, activation="sigmoid", tta=False, precision=precision).cpu()  # type: ignore[arg-type]
    start = time.perf_counter()
    for _ in range(batches):  # the output goes to host memory, as in emseg
        _forward(model, x, activation="sigmoid", tta=False, precision=precision).cpu()  # type: ignore[arg-type]
    return time.perf_counter() - start


def forward_only(plan, connection, threads: int, device: str) -> dict[str, float]:
    """Seconds for exactly the forward passes of ``plan``: on the cluster's workers, and in this process."""
    per_pass = plan.batch_size * math.prod(plan.tiling.input_shape)
    passes = plan.computed_voxels // per_pass
    shape = (plan.batch_size, 1, *plan.tiling.input_shape[1:])
    workers = list(connection.client.scheduler_info()["workers"])
    split = [passes // len(workers) + (i < passes % len(workers)) for i in range(len(workers))]
    # every worker times its own share after loading the model; they run at the same time: the slowest is the wall
    futures = [connection.client.submit(_forward_task, str(plan.checkpoint), shape, n, plan.precision,
                                        connection.threads_per_worker, workers=[w], pure=False)
               for w, n in zip(workers, split)]
    on_workers = max(connection.client.gather(futures))
    torch.set_num_threads(threads)
    return {"workers": on_workers, "process": _forward_loop(str(plan.checkpoint), shape, passes, plan.precision, device)}


def run_emseg(source: Path, out: Path, connection, **kwargs) -> tuple[float, object]:
    from emseg.workflows.predict import predict

    report = predict(source, out, client=connection, progress=False, overwrite=True, **kwargs)
    return report.seconds, report.plan


def warm(connection, ckpt: Path, tmp: Path) -> None:
    """Load the model on every worker (emseg caches it per worker process) and run the default tile shape once
    (oneDNN builds its kernels per input shape), as in a long run; the forward-only loops are warmed the same way."""
    from emseg.workflows.predict import predict

    n = len(connection.client.scheduler_info()["workers"])
    warm_vol = make_volume(tmp / f"warm{n}.zarr", tiled(load()[:2], (2 * n, 1024, 1024)))
    predict(warm_vol, tmp / f"warm{n}-out.zarr", checkpoint=ckpt, block_size=(1, 1024, 1024), chunks=(1, 256, 256),
            client=connection, progress=False, overwrite=True)


def monai_seconds(model, data: np.ndarray, overlap: float, roi: int, batch: int, threads: int, device: str) -> float:
    from monai.inferers import sliding_window_inference

    torch.set_num_threads(threads)
    model = model.eval().to(device).to(memory_format=torch.channels_last)
    x = torch.from_numpy((data.astype(np.float32) / 255 - 0.5) / 0.5)[None, None].to(device)

    def predictor(t: torch.Tensor) -> torch.Tensor:
        b, c, z, h, w = t.shape
        y = model(t.permute(0, 2, 1, 3, 4).reshape(b * z, c, h, w).contiguous(memory_format=torch.channels_last))
        return torch.sigmoid(y.float()).reshape(b, z, -1, h, w).permute(0, 2, 1, 3, 4)

    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16):
        out = sliding_window_inference(x, (1, roi, roi), batch, predictor, overlap=overlap, mode="gaussian")
        out = out.cpu()  # the result in host memory, as emseg's
    seconds = time.perf_counter() - start
    assert out.shape == x.shape
    return seconds


def with_worker_malloc(plain: bool) -> None:
    """Re-run this script under emseg's worker malloc settings unless it already runs under them.

    glibc reads ``MALLOC_*`` once, at process start.  emseg's workers start with
    :data:`emseg.cluster.profiles.WORKER_MALLOC_ENV`; MONAI and the in-process forward-only loop run in
    this process, and with glibc's defaults their forward passes were up to 1.5x slower (2026-12-02:
    same-padded U-Net, 256^2 x 4, 2 threads: 48.5 ms against 32.3 ms).  So they get the same settings:
    no method is handicapped by its allocator.  ``--plain-malloc`` keeps glibc's defaults."""
    import sys

    from emseg.cluster.profiles import WORKER_MALLOC_ENV

    if plain or all(os.environ.get(k) == v for k, v in WORKER_MALLOC_ENV.items()):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **WORKER_MALLOC_ENV})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="32,1024,1024", help="volume Z,Y,X (ISBI tiled)")
    parser.add_argument("--monai-roi", type=int, default=256)
    parser.add_argument("--monai-batch", type=int, default=4)
    parser.add_argument("--layouts", action="store_true", help="also emseg with 1 x N and N x 1 workers x threads")
    parser.add_argument("--skip-same", action="store_true", help="skip the same-padded model (emseg and MONAI)")
    parser.add_argument("--repeat", type=int, default=2, help="rounds; each figure is the best of its rounds")
    parser.add_argument("--quick", action="store_true", help="small volume, for a smoke test")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda where torch sees a GPU (emseg then runs one worker per GPU)")
    parser.add_argument("--plain-malloc", action="store_true",
                        help="run MONAI and the in-process loop with glibc's default malloc settings (handicapped)")
    args = parser.parse_args()
    with_worker_malloc(args.plain_malloc)
    shape = tuple(int(v) for v in args.shape.split(","))
    if args.quick:
        shape = (2, 512, 512)

    from emseg.cluster import connect, default_layout
    from emseg.models import build, save_checkpoint
    from emseg.ops.inference import default_precision
    from emseg.workflows.predict import BUNDLED

    n = cores()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    voxels = math.prod(shape)
    tmp = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    data = tiled(load(), shape)
    source = make_volume(tmp / "isbi.zarr", data)
    torch.manual_seed(0)
    same = build("unet", ndim=2, base_channels=16, depth=3, padding="same").eval()
    same_ckpt = save_checkpoint(same, tmp / "same-ckpt")
    fused_same = None
    if device == "cpu" and default_precision(device) == "bf16":
        from emseg.ops.inference import prepare_model

        fused_same = prepare_model(copy.deepcopy(same), device, "bf16")
    gpu = f", GPU {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}" if device == "cuda" else ""
    print(f"machine: {platform.machine()}, {n} cores{gpu}, torch {torch.__version__}, default precision "
          f"{default_precision(device)}, default CPU layout {default_layout()}; load before: {uptime()}")
    print(f"volume: ISBI 2012 test volume tiled to {'x'.join(map(str, shape))} uint8 ({voxels / 1e6:.1f} Mvoxel)")
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(f"this process (MONAI, in-process forward-only): malloc {malloc or 'glibc defaults'}")
    results: dict[str, float] = {}
    notes: dict[str, str] = {}

    def record(name: str, seconds: float) -> None:  # best of the rounds, printed as it comes
        results[name] = min(seconds, results.get(name, math.inf))
        print(f"  {name}: {seconds:.1f} s, {voxels / seconds / 1e6:.3f} Mvoxel/s (load {uptime()})", flush=True)

    for round_ in range(args.repeat):  # rounds interleave the methods: a load that changes hits all of them
        print(f"round {round_ + 1} of {args.repeat}", flush=True)
        with connect("local-gpu" if device == "cuda" else None) as connection:
            warm(connection, BUNDLED, tmp)
            seconds, plan = run_emseg(source, tmp / "valid.zarr", connection)
            record("emseg valid", seconds)
            notes["emseg valid"] = (f"defaults: tile {'x'.join(map(str, plan.tiling.input_shape))} input, batch "
                                    f"{plan.batch_size}, {plan.precision}, {connection.threads_per_worker} thread(s) "
                                    f"per worker, {len(connection.client.scheduler_info()['workers'])} worker(s)")
            fwd = forward_only(plan, connection, n, device)
            record("forward-only valid, workers", fwd["workers"])
            record(f"forward-only valid, 1 process x {n} threads", fwd["process"])
            if not args.skip_same:
                warm(connection, same_ckpt, tmp)
                seconds, plan_same = run_emseg(source, tmp / "same.zarr", connection, checkpoint=same_ckpt)
                record("emseg same", seconds)
                notes["emseg same"] = (f"defaults: tile {'x'.join(map(str, plan_same.tiling.input_shape))} input, "
                                       f"{plan_same.tiling.blend}, batch {plan_same.batch_size}, {plan_same.precision}")
                record("forward-only same, workers", forward_only(plan_same, connection, n, device)["workers"])
        if not args.skip_same:
            for overlap in (0.25, 0.5):
                key = f"monai {overlap}"
                record(key, monai_seconds(same, data, overlap, args.monai_roi, args.monai_batch, n, device))
                notes[key] = (f"roi {args.monai_roi}, sw_batch {args.monai_batch}, gaussian, bf16 + channels-last, "
                              + ("cuda" if device == "cuda" else f"{n} threads"))
            if fused_same is not None:  # MONAI handed emseg's engine: what is left is the work ratio
                record(FUSED_MONAI, monai_seconds(fused_same, data, 0.5, args.monai_roi, args.monai_batch, n, device))
                notes[FUSED_MONAI] = "as monai 0.5, the model with emseg's fused conv blocks (its CPU bf16 workers')"
        if args.layouts and device == "cpu":
            from emseg.cluster import ClusterProfile

            for workers, threads in ((1, n), (n, 1)):
                profile = tmp / f"layout{workers}x{threads}.yaml"
                profile.write_text(json.dumps(ClusterProfile(workers=workers, threads_per_worker=threads).model_dump(
                    exclude={"slurm"}, exclude_none=True)))
                with connect(str(profile)) as connection:
                    warm(connection, BUNDLED, tmp)
                    record(f"emseg valid, {workers} worker(s) x {threads} thread(s)",
                           run_emseg(source, tmp / f"layout{workers}.zarr", connection)[0])
    print(f"load after: {uptime()}\n")
    print(f"{'method':<44}{'seconds':>9}{'Mvoxel/s':>10}  notes")
    for name, seconds in results.items():
        print(f"{name:<44}{seconds:>9.1f}{voxels / seconds / 1e6:>10.3f}  {notes.get(name, '')}")
    limit = min(results["forward-only valid, workers"], results[f"forward-only valid, 1 process x {n} threads"])
    print(f"\nemseg valid / forward-only limit (throughput): {limit / results['emseg valid']:.2f}")
    if not args.skip_same:
        for overlap in (0.25, 0.5):
            print(f"emseg same / monai {overlap} (throughput): {results[f'monai {overlap}'] / results['emseg same']:.2f}")
        if FUSED_MONAI in results:
            print(f"emseg same / {FUSED_MONAI} (throughput): {results[FUSED_MONAI] / results['emseg same']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"shape": shape, "cores": n, "seconds": results, "notes": notes}, indent=1))


if __name__ == "__main__":
    main()
