"""The seeds' comparison: U-Net, FusionNet, UNet++ (accurate and fast) and FCN-8s, same budget, same data.

Each architecture is trained once with ``emseg train`` on ISBI 2012 train sections 0-15 (the same
steps, batch, patch size, loss, optimiser, augmentation and seed; no validation during training,
the last weights are scored), then scored on the held-out sections 16-19:

* pixel error: the whole-section membrane probability (one forward pass, mirrored borders, fp32)
  thresholded at 0.5, against the ISBI membrane mask;
* adapted Rand error and VOI through the shipped pipeline: ``emseg import`` of sections 16-19,
  ``emseg segment VOL -o OUT --model CKPT`` (its default post-processing), ``emseg evaluate OUT GT``;
* parameters, and inference throughput (Mvoxel/s of the forward pass over the 4 whole sections,
  median of interleaved rounds over all models, fp32, 2 torch threads).

UNet++ is trained once with deep supervision; "accurate" averages its heads, "fast" is the same
weights pruned at head ``depth - 1`` (``UNetPlusPlus.prune``), as in the UNet++ paper.

Usage::

    nice -n 10 .venv/bin/python benchmarks/compare_models.py --steps 60 --workdir /tmp/emseg-compare

Writes ``benchmarks/README_models.md`` (the table, the exact settings and wall times) and the raw
figures as JSON next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
README = ROOT / "benchmarks" / "README_models.md"
RAW, LABELS = DATA / "isbi2012" / "train-volume.tif", DATA / "isbi2012" / "train-labels.tif"

# name, registry model, options (sizes chosen for 0.3-0.55 M parameters: a CPU budget)
MODELS = (
    ("U-Net", "unet", ["--base-channels", "16", "--depth", "3", "--padding", "valid"]),
    ("FusionNet", "fusionnet", ["--base-channels", "8", "--depth", "3", "--padding", "same"]),
    ("UNet++", "unetpp", ["--base-channels", "16", "--depth", "3", "--padding", "same", "--deep-supervision"]),
    ("FCN-8s", "fcn", ["--base-channels", "8", "--padding", "same"]),
)


def emseg(*args: str, log: Path) -> str:
    exe = Path(sys.executable).parent / "emseg"
    with open(log, "a") as err:
        err.write(f"\n$ emseg {' '.join(args)}\n")
        err.flush()
        done = subprocess.run([str(exe), *args], stdout=subprocess.PIPE, stderr=err, text=True)
    if done.returncode != 0:
        raise SystemExit(f"emseg {' '.join(args)} failed (exit {done.returncode}); see {log}")
    return done.stdout


def pixel_error_and_speed(ckpt: Path, raw: np.ndarray, membrane: np.ndarray) -> tuple[float, float]:
    """(pixel error at 0.5, seconds of the forward pass over all sections)."""
    import torch

    from emseg.models import load_checkpoint
    from emseg.training.loop import predict_volume

    loaded = load_checkpoint(ckpt)
    norm = (loaded.config.normalization.mean, loaded.config.normalization.std)
    start = time.perf_counter()
    with torch.no_grad():
        logits = predict_volume(loaded.model, raw, norm, ndim=2)
    seconds = time.perf_counter() - start
    prob = torch.sigmoid(logits[0]).numpy()
    return float(((prob > 0.5) != membrane).mean()), seconds


def main() -> None:
    import tifffile
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--patch", type=int, default=192)
    ap.add_argument("--speed-rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads of each training (1 when other jobs share the cores: 2 OpenMP threads on 2 busy "
                         "cores stall); the inference timing always uses 2")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/emseg-compare"))
    ap.add_argument("--only", default=None, help="comma-separated model names (default: all)")
    ap.add_argument("--collect", nargs="*", type=Path, default=None,
                    help="skip training: read the rows.jsonl of these work directories (models run in parallel with "
                         "--only), measure the inference speed of all of them and write the table")
    args = ap.parse_args()
    torch.set_num_threads(2)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    log = work / "compare.log"
    raw = tifffile.imread(RAW)[16:20]
    labels = tifffile.imread(LABELS)[16:20]
    membrane = labels == 0
    tifffile.imwrite(work / "val_raw.tif", raw, photometric="minisblack")
    tifffile.imwrite(work / "val_gt.tif", labels, photometric="minisblack")
    volume = work / "isbi_16-19.zarr"
    emseg("import", str(work / "val_raw.tif"), str(volume), "--voxel-size", "50,4,4", "--overwrite", "--no-progress", log=log)

    if args.collect is not None:
        rows = [json.loads(line) for d in args.collect for line in (d / "rows.jsonl").read_text().splitlines() if line.strip()]
        order = [label for label, _, _ in MODELS]
        rows.sort(key=lambda r: next(i for i, lab in enumerate(order) if r["model"].startswith(lab)))
        finish(rows, args, raw, membrane, work)
        return
    budget = budget_options(args)
    rows = []
    wanted = None if args.only is None else set(args.only.split(","))
    for label, name, options in MODELS:
        if wanted is not None and label not in wanted:
            continue
        ckpt = work / f"ckpt_{name}"
        start = time.perf_counter()
        emseg("-v", "train", "--raw", f"{RAW}[0:16]", "--labels", f"{LABELS}[0:16]", "--model", name, *options, *budget,
              "-o", str(ckpt), "--overwrite", log=log)
        train_s = time.perf_counter() - start
        variants = [(label, ckpt)]
        if name == "unetpp":  # the same weights: accurate (mean of heads) and fast (pruned at depth - 1)
            from emseg.models import load_checkpoint, save_checkpoint

            loaded = load_checkpoint(ckpt)
            depth = int(loaded.config.model["depth"])
            fast = work / f"ckpt_{name}_fast"
            shutil.rmtree(fast, ignore_errors=True)
            save_checkpoint(loaded.model.prune(depth - 1), fast, outputs=loaded.config.outputs,
                            normalization=loaded.config.normalization, voxel_size_nm=loaded.config.voxel_size_nm,
                            provenance=loaded.config.provenance)
            variants = [(f"{label} accurate", ckpt), (f"{label} fast (L{depth - 1})", fast)]
        for variant, path in variants:
            out = work / f"seg_{path.name}.zarr"
            start = time.perf_counter()
            emseg("segment", str(volume), "-o", str(out), "--model", str(path), "--overwrite", "--no-progress", log=log)
            segment_s = time.perf_counter() - start
            report = json.loads(emseg("evaluate", str(out), str(work / "val_gt.tif"), "--json", log=log))
            results = report.get("results", [report])
            seg = next((r for r in results if str(r["segmentation"]).rstrip("/").endswith("/segments")), results[0])
            from emseg.models import load_checkpoint

            params = sum(p.numel() for p in load_checkpoint(path).model.parameters())
            pe, _ = pixel_error_and_speed(path, raw, membrane)
            rows.append({"model": variant, "checkpoint": str(path), "parameters": params, "pixel_error": pe,
                         "adapted_rand_error": seg["adapted_rand_error"], "voi_split": seg["voi_split"],
                         "voi_merge": seg["voi_merge"], "train_seconds": round(train_s), "segment_seconds": round(segment_s)})
            print(json.dumps(rows[-1]), flush=True)
            with open(work / "rows.jsonl", "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    finish(rows, args, raw, membrane, work)


def budget_options(args: argparse.Namespace) -> list[str]:
    return ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--patch-shape", f"{args.patch},{args.patch}",
            "--optimizer", "adam", "--lr", "5e-4", "--loss", "weighted-ce", "--precision", "bf16", "--threads", str(args.threads),
            "--seed", "0", "--checkpoint-every", str(args.steps), "--voxel-size", "50", "4", "4"]


def finish(rows: list[dict], args: argparse.Namespace, raw: np.ndarray, membrane: np.ndarray, work: Path) -> None:
    budget = budget_options(args)
    # inference throughput, interleaved over the models so that a shared machine slows each alike
    times: dict[str, list[float]] = {r["model"]: [] for r in rows}
    for _ in range(args.speed_rounds):
        for r in rows:
            times[r["model"]].append(pixel_error_and_speed(Path(r["checkpoint"]), raw, membrane)[1])
    for r in rows:
        r["inference_mvoxel_s"] = raw.size / statistics.median(times[r["model"]]) / 1e6
    meta = {"steps": args.steps, "batch_size": args.batch_size, "patch": args.patch, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
            "load_average": os.getloadavg(), "budget_options": budget}
    (work / "compare_models.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    write_readme(rows, meta, " ".join(sys.argv[1:]))


def write_readme(rows: list[dict], meta: dict, argv: str) -> None:
    lines = [
        "# Architectures compared: U-Net, FusionNet, UNet++, FCN-8s (`benchmarks/compare_models.py`)", "",
        f"Run {meta['date']} at commit `{meta['commit']}` on 2 CPU cores shared with other jobs (load average at the end "
        f"{meta['load_average'][0]:.1f}), no GPU. Command: `nice -n 10 .venv/bin/python benchmarks/compare_models.py {argv}`.", "",
        f"**Budget (the same for every model, one run each): {meta['steps']} steps x batch {meta['batch_size']} of "
        f"{meta['patch']}x{meta['patch']} input patches** from ISBI 2012 train sections 0-15 (`emseg train` with "
        f"`{' '.join(meta['budget_options'])}`: U-Net weight-map cross-entropy, Adam 5e-4, bf16 autocast, elastic + flip + "
        "intensity augmentation, seed 0). This is a small CPU budget: the figures compare the architectures at this "
        "budget only, far from convergence, and do not reproduce the papers' absolute numbers.", "",
        "Scored on the held-out ISBI sections 16-19 (4 x 512 x 512): pixel error of the membrane probability > 0.5 "
        "(whole sections, one forward pass, fp32); adapted Rand error (ARE) and VOI split/merge of "
        "`emseg segment VOL --model CKPT` (default post-processing) scored by `emseg evaluate` (cells = 4-connected "
        "components of the interior, per section); inference Mvoxel/s = output voxels / forward-pass seconds over the 4 "
        "sections (fp32, 2 threads, median of interleaved rounds; the machine was shared, so only ratios mean much).", "",
        "| model | parameters | pixel error | ARE | VOI split | VOI merge | inference Mvoxel/s | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['parameters']:,} | {r['pixel_error']:.4f} | {r['adapted_rand_error']:.4f} | "
                     f"{r['voi_split']:.3f} | {r['voi_merge']:.3f} | {r['inference_mvoxel_s']:.3f} | {r['train_seconds']} |")
    lines += ["", "Raw figures: `compare_models.json` in the work directory (copied below).", "", "```json",
              json.dumps(rows, indent=1), "```", ""]
    README.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
