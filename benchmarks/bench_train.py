"""Training throughput of ``emseg train`` (patches/s): fp32 vs bf16 autocast, channels-last or not.

One process, the settings interleaved step by step (A, B, C, D, A, B, ...), so that a machine shared
with other jobs slows every setting alike; each step is the real training step of
:mod:`emseg.training.loop` (patch sampling with augmentation, forward, loss, backward, Adam step).
Prints one JSON object: per setting the median wall seconds per step, patches/s and the ratio to
fp32, and the median CPU seconds per step (``time.process_time``: on a machine shared with other
jobs the wall time mostly measures the others; with ``--threads 1`` the CPU time is the compute cost).

    python benchmarks/bench_train.py --ndim 2 --rounds 8      # 2-D U-Net base 16 depth 3, 260x260, batch 4
    python benchmarks/bench_train.py --ndim 3 --rounds 6      # 3-D U-Net base 8 depth 3, 48^3, batch 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def main() -> None:
    from emseg.training.config import TrainConfig
    from emseg.training.data import load_source, normalization_of, sample_batch
    from emseg.training.loop import _autocast, _build_model, _channels_last
    from emseg.training.losses import total_loss

    ap = argparse.ArgumentParser()
    ap.add_argument("--ndim", type=int, choices=(2, 3), default=2)
    ap.add_argument("--rounds", type=int, default=8, help="measured steps per setting (after 1 warm-up round)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.ndim == 2:
        common = dict(train=[{"raw": str(DATA / "isbi2012/train-volume.tif") + "[0:16]",
                              "labels": str(DATA / "isbi2012/train-labels.tif") + "[0:16]"}],
                      model="unet", base_channels=16, depth=3, padding="valid", patch_shape=(256, 256), batch_size=4)
    else:
        common = dict(train=[{"raw": str(DATA / "fib_gala/train-raw.tif"), "labels": str(DATA / "fib_gala/train-labels.tif"),
                              "labels_kind": "instances"}],
                      model="unet", ndim=3, isotropic=True, target="affinities", loss="bce-dice", base_channels=8, depth=3,
                      padding="same", patch_shape=(48, 48, 48), batch_size=2, elastic_sigma=3.0, foreground_prob=0.0)
    settings = [("fp32", False), ("bf16", False), ("fp32", True), ("bf16", True)]
    cfgs = {s: TrainConfig(**common, output="/tmp/unused", precision=s[0], channels_last=s[1]) for s in settings}
    cfg0 = cfgs[settings[0]]
    volumes = [load_source(s, cfg0) for s in cfg0.train]
    norm = normalization_of(volumes)
    runs = {}
    for s, cfg in cfgs.items():
        torch.manual_seed(0)
        model = _build_model(cfg)
        if cfg.channels_last:
            model = model.to(memory_format=_channels_last(cfg.ndim))
        runs[s] = (cfg, model, torch.optim.Adam(model.parameters(), lr=3e-4))
    in_shape = runs[settings[0]][1].valid_input_shape(cfg0.patch_shape)
    out_shape = runs[settings[0]][1].output_shape(in_shape)
    times: dict[tuple[str, bool], list[float]] = {s: [] for s in settings}
    cpu: dict[tuple[str, bool], list[float]] = {s: [] for s in settings}
    losses: dict[tuple[str, bool], list[float]] = {s: [] for s in settings}
    device = torch.device("cpu")
    for step in range(args.rounds + 1):
        for s in settings:
            cfg, model, opt = runs[s]
            t, c = time.perf_counter(), time.process_time()
            batch = sample_batch(volumes, cfg, in_shape, out_shape, step=step + 1, rank=0, world_size=1, normalization=norm)
            x = torch.from_numpy(batch.raw)
            if cfg.channels_last:
                x = x.contiguous(memory_format=_channels_last(cfg.ndim))
            weight = torch.from_numpy(batch.weight) if batch.weight is not None else None
            opt.zero_grad(set_to_none=True)
            with _autocast(cfg, device):
                out = model(x)
            loss = total_loss(cfg.loss, out.float(), torch.from_numpy(batch.target), weight)
            loss.backward()
            opt.step()
            if step > 0:  # round 0 warms up every setting
                times[s].append(time.perf_counter() - t)
                cpu[s].append(time.process_time() - c)
            losses[s].append(round(float(loss.detach()), 4))
    fp32 = statistics.median(times[("fp32", False)])
    result = {
        "ndim": args.ndim, "model": f"unet base {cfg0.base_channels} depth {cfg0.depth} {cfg0.padding}",
        "input": list(in_shape), "batch": cfg0.batch_size, "rounds": args.rounds, "threads": args.threads,
        "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "load_average_at_end": os.getloadavg(),
        "settings": {
            f"{p}{' channels-last' if cl else ''}": {
                "median_s_per_step": round(statistics.median(times[(p, cl)]), 3),
                "median_cpu_s_per_step": round(statistics.median(cpu[(p, cl)]), 3),
                "cpu_speedup_vs_fp32": round(statistics.median(cpu[("fp32", False)]) / statistics.median(cpu[(p, cl)]), 2),
                "patches_per_s": round(cfg0.batch_size / statistics.median(times[(p, cl)]), 3),
                "speedup_vs_fp32": round(fp32 / statistics.median(times[(p, cl)]), 2),
                "losses": losses[(p, cl)],
            }
            for p, cl in settings
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
