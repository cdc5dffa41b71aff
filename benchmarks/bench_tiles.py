"""Forward passes only: what one 2-D tile costs per voxel, by tile size (issue 15, ``benchmarks/README.md``).

Why ``emseg same / monai 0.5`` in ``bench_predict.py`` sits near 2x: per input voxel, emseg's 608^2
tiles and MONAI's 256^2 x 4 windows cost about the same, while emseg computes 1.41x its output and MONAI
3.06x (overlap 0.5 on 1024^2 sections).  This prints both per-voxel figures and the ratio they allow,
then scans tile cores (input = core + context) with emseg's fused model, each size in several passes so
that the noise shows.  One process under emseg's worker malloc settings (as ``bench_predict.py``), bf16
autocast + channels-last, the model unfused (as MONAI runs it) and with emseg's fused convolution blocks
(:func:`emseg.ops.inference.fuse_conv_blocks`, what its CPU workers run in bf16), the model of
``bench_predict.py``'s "same" runs (random weights, base 16, depth 3) or the bundled valid model.

    .venv/bin/python benchmarks/bench_tiles.py                     # same-padded, 1 thread
    .venv/bin/python benchmarks/bench_tiles.py --model bundled --scan 2
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from typing import Any

import torch


def forward_seconds(model: Any, size: int, batch: int, reps: int) -> float:
    """Best of ``reps`` forward passes of ``batch`` tiles of ``size``^2 (after two warm-up passes)."""
    x = torch.randn(batch, 1, size, size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
        model(x)
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    from emseg.models import build, load_checkpoint
    from emseg.ops.inference import prepare_model
    from emseg.workflows.predict import BUNDLED

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("same", "bundled"), default="same")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--scan", type=int, default=1, help="passes over the scan of tile cores 256-1024 (0: none)")
    ap.add_argument("--plain-malloc", action="store_true", help="glibc's default malloc settings instead of emseg's "
                                                                 "worker settings (slower large passes)")
    args = ap.parse_args()
    from bench_predict import with_worker_malloc  # this folder is on sys.path when the script runs

    with_worker_malloc(args.plain_malloc)  # what emseg's workers run with
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model == "same":
        raw = build("unet", ndim=2, in_channels=1, out_channels=1, base_channels=16, depth=3, padding="same")
        context = 96  # emseg's halo 48 per side
    else:
        raw = load_checkpoint(BUNDLED).model
        context = raw.valid_input_shape((512 + 2 * raw.context[0],) * 2)[0] - 512  # 604^2 input for 512^2, as emseg
    models = {"unfused": prepare_model(copy.deepcopy(raw)),  # what MONAI runs in bench_predict.py
              "fused": prepare_model(copy.deepcopy(raw), "cpu", "bf16")}  # what emseg's CPU workers run in bf16
    print(f"model {args.model}, {args.threads} thread(s), bf16 + channels-last, best of {args.reps}")
    emseg_in = 512 + context
    for name, model in models.items():
        t_emseg = forward_seconds(model, emseg_in, 1, args.reps)
        rate_emseg = emseg_in**2 / t_emseg / 1e6
        print(f"{name}: tile {emseg_in}^2 x 1 (emseg's): {t_emseg * 1e3:.0f} ms, {rate_emseg:.2f} Mvoxel/s of input")
        if args.model == "same":  # MONAI's windows: the valid model has no 256^2 input
            t_monai = forward_seconds(model, 256, 4, args.reps)
            rate_monai = 4 * 256**2 / t_monai / 1e6
            print(f"{name}: window 256^2 x 4 (MONAI's): {t_monai * 1e3:.0f} ms, {rate_monai:.2f} Mvoxel/s of input")
            overhead = emseg_in**2 / 512**2
            # MONAI at overlap 0.5 on 1024^2 sections: windows every 128 px, 7 x 7 of 256^2 per section
            windows = (math.ceil((1024 - 256) / 128) + 1) ** 2
            monai_work = windows * 256**2 / 1024**2
            print(f"  ratio the passes allow at overlap 0.5 on 1024^2 sections, both {name}: ({rate_emseg:.2f} / "
                  f"{overhead:.2f}) / ({rate_monai:.2f} / {monai_work:.2f}) = "
                  f"{(rate_emseg / overhead) / (rate_monai / monai_work):.2f}x")
    model = models["fused"]
    rates: dict[int, list[float]] = {}
    for _ in range(args.scan):
        for core in range(256, 1025, 32):
            rates.setdefault(core, []).append(core**2 / forward_seconds(model, core + context, 1, args.reps) / 1e6)
    for core, values in rates.items():
        print(f"core {core:4d} (input {core + context}): output Mvoxel/s {' '.join(f'{v:.2f}' for v in values)}")


if __name__ == "__main__":
    main()
