"""Benchmark ``emseg predict`` against MONAI ``sliding_window_inference`` and a forward-only baseline.

One run, one volume, one model (a random-weight "same"-padded U-Net, so that MONAI, which needs
an output the size of its input, can run it too):

* ``emseg``: :func:`emseg.predict.predict` on a local Dask cluster that is already started
  (the stage time: read from zarr, normalise, tiles, forward, write uint8 to zarr);
* ``monai``: ``sliding_window_inference`` with ``roi_size`` = emseg's tile input, Gaussian
  blending, overlap 0.25 and 0.5, over the volume already in memory (no I/O);
* ``forward``: only the forward passes emseg's plan needs (same tile shape, same count, random
  input already in memory): the bound on emseg's throughput.

Throughput is output voxels per second.  Then peak RSS of one worker is measured for the
same blocks on a 1x and an 8x volume (fresh single-worker clusters).

    nice .venv/bin/python benchmarks/bench_predict.py            # ~5 min on 2 CPU cores
    nice .venv/bin/python benchmarks/bench_predict.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_volume(path: Path, shape: tuple[int, int, int], seed: int = 0) -> Path:
    from emseg.io import create_volume, mark_complete

    rng = np.random.default_rng(seed)
    volume = create_volume(path, shape=shape, dtype="uint8", chunks=(8, 256, 256), voxel_size=(40, 4, 4))
    for z in range(0, shape[0], 8):
        volume.write(volume.roi.__class__((z, 0, 0), (min(8, shape[0] - z), *shape[1:])),
                     rng.integers(0, 255, (min(8, shape[0] - z), *shape[1:]), dtype=np.uint8))
    mark_complete(path)
    return path


def worker_peak_rss(client) -> int:
    def peak() -> int:
        # VmHWM: this process's own high-water mark (ru_maxrss would include the parent's RSS at fork)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    return max(client.run(peak).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8,1024,1024", help="volume Z,Y,X")
    parser.add_argument("--tile", default="1,256,256", help="emseg tile core Z,Y,X")
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small volume, for a smoke test")
    parser.add_argument("--memory-only", action="store_true", help="skip the timings")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    tile = tuple(int(v) for v in args.tile.split(","))
    if args.quick:
        shape, tile = (2, 384, 384), (1, 128, 128)

    from emseg.models import build, save_checkpoint
    from emseg.predict import plan_prediction

    torch.manual_seed(0)
    model = build("unet", ndim=2, base_channels=args.base_channels, depth=2, padding="same").eval()
    tmp = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    ckpt = save_checkpoint(model, tmp / "ckpt")
    source = make_volume(tmp / "vol.zarr", shape)
    block = (4, 1024, 1024) if not args.quick else (1, 384, 384)
    plan = plan_prediction(source, checkpoint=ckpt, tile_size=tile, block_size=block, batch_size=1)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, cpu")
    print(plan.summary())

    if not args.memory_only:
        time_methods(args, shape, tile, block, plan, model, ckpt, source, tmp)
    measure_memory(args, tile, ckpt, tmp)


def time_methods(args, shape, tile, block, plan, model, ckpt, source, tmp) -> None:
    from monai.inferers import sliding_window_inference

    from emseg.cluster import connect
    from emseg.predict import predict

    voxels = math.prod(shape)
    results: dict[str, float] = {}
    # emseg, on a started cluster
    with connect(workers=args.workers) as connection:
        warm = make_volume(tmp / "warm.zarr", (2 * args.workers, 64, 64))
        predict(warm, tmp / "warm-out.zarr", checkpoint=ckpt, tile_size=tile, block_size=(1, 64, 64), batch_size=1,
                client=connection, progress=False)  # loads the model on every worker
        report = predict(source, tmp / "out.zarr", checkpoint=ckpt, tile_size=tile, block_size=block, batch_size=1,
                         client=connection, progress=False)
        results["emseg"] = report.seconds
    # MONAI over the in-memory volume, per slice (a 2D model): roi = emseg's tile input
    from emseg.io import open_volume

    raw = np.asarray(open_volume(source).array[:])
    x = torch.from_numpy((raw.astype(np.float32) / 255 - 0.5) / 0.5)[None, None]
    roi = plan.tiling.input_shape

    def predictor(t: torch.Tensor) -> torch.Tensor:
        b, c, z, h, w = t.shape
        y = model(t.permute(0, 2, 1, 3, 4).reshape(b * z, c, h, w))
        return torch.sigmoid(y).reshape(b, z, -1, h, w).permute(0, 2, 1, 3, 4)

    for overlap in (0.25, 0.5):
        start = time.perf_counter()
        with torch.inference_mode():
            out = sliding_window_inference(x, roi, 1, predictor, overlap=overlap, mode="gaussian")
        results[f"monai {overlap}"] = time.perf_counter() - start
        assert out.shape == x.shape
    # forward only: the passes emseg's plan needs, input already in memory
    batches = plan.computed_voxels // math.prod(plan.tiling.input_shape)
    t = torch.randn(1, 1, *plan.tiling.input_shape[1:])
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(batches):
            torch.sigmoid(model(t))
    results["forward only"] = time.perf_counter() - start

    print(f"\nvolume {'x'.join(map(str, shape))} uint8 ({voxels / 1e6:.1f} Mvoxel), 2D U-Net base "
          f"{args.base_channels} depth 2 same-padded, tile input {'x'.join(map(str, roi))}")
    print(f"{'method':<16}{'seconds':>10}{'Mvoxel/s':>12}{'emseg speed-up':>16}")
    for name, seconds in results.items():
        print(f"{name:<16}{seconds:>10.1f}{voxels / seconds / 1e6:>12.3f}{seconds / results['emseg']:>16.2f}")
    print(f"emseg / forward-only throughput: {results['forward only'] / results['emseg']:.2f}")



def measure_memory(args, tile, ckpt, tmp) -> None:
    """Peak memory per worker: same blocks, 1x and 8x volumes, fresh single-worker clusters."""
    from emseg.cluster import connect
    from emseg.predict import predict

    small = (4, 512, 512) if not args.quick else (2, 256, 256)
    print(f"\npeak RSS of one worker (blocks of {'x'.join(map(str, small))}):")
    for factor, vol_shape in ((1, small), (8, (small[0] * 2, small[1] * 2, small[2] * 2))):
        path = make_volume(tmp / f"mem{factor}.zarr", vol_shape, seed=factor)
        with connect(workers=1) as connection:
            base = worker_peak_rss(connection.client)
            predict(path, tmp / f"mem{factor}-out.zarr", checkpoint=ckpt, tile_size=tile, block_size=small,
                    batch_size=1, client=connection, progress=False)
            peak = worker_peak_rss(connection.client)
        print(f"  {factor}x volume {'x'.join(map(str, vol_shape))}: {peak / 2**20:.0f} MiB "
              f"(idle worker {base / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
