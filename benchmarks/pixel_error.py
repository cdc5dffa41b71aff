"""Pixel error of 2-D membrane models on ISBI 2012, at 0.5 and the way the ISBI challenge scored it.

The U-Net paper's 0.0611 is the ISBI 2012 leaderboard's pixel error, which the organisers defined
as the best value over thresholds of the submitted probability map ("1 - the maximal F-score of pixel
similarity, or squared Euclidean distance between the original and the result labels",
brainiac2.mit.edu/isbi_challenge/evaluation).  emseg's training validation reports the error at 0.5.
A model trained with the U-Net weight map (class-balancing ``w_c``) over-predicts the rarer class
(membrane), so its 0.5 error is not its pixel accuracy.  This script reports, for each checkpoint:

* ``0.5``: the fraction of pixels of ISBI train sections 16-19 (validation) where ``prob > 0.5``
  disagrees with the membrane mask (what ``emseg train`` logs as ``pixel_error``);
* ``t*``: the threshold with the lowest error on **sections 0-15** (the training sections: chosen
  without looking at 16-19), from 0.05 to 0.95 in steps of 0.05;
* ``at t*``: the 16-19 error at that threshold (the ISBI-style figure, threshold chosen blind);
* ``best``: the lowest 16-19 error over the same thresholds (the challenge's optimistic figure);
* the same two with ``--tta`` (emseg's test-time augmentation: the mean over the flips of y and x).

Whole sections, mirrored borders, fp32, the tiling ``emseg predict`` uses on a CPU
(:func:`emseg.training.validation.predict_volume`); a model that runs at a coarser in-plane voxel size
(``run_voxel_size_nm``) sees the sections downsampled to it and its prediction is repeated back to 4 nm,
as ``emseg predict`` does (``--native``: at 4 nm instead).  ~10 s per model and mode on 2 cores.

    .venv/bin/python benchmarks/pixel_error.py emseg/models/bundled [more checkpoints ...] [--tta]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "isbi2012"
THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))


def membrane_probability(ckpt: Path, raw: np.ndarray, *, tta: bool, native: bool = False) -> np.ndarray:
    """``(z, y, x)`` float32 membrane probability of a 2-D sigmoid model, as ``emseg predict`` computes it."""
    from emseg.geometry import downsample_factor
    from emseg.models import load_checkpoint
    from emseg.ops.inference import downsample_sections, repeat_sections
    from emseg.training.validation import predict_volume

    loaded = load_checkpoint(ckpt)
    if loaded.model.ndim != 2 or loaded.config.activation != "sigmoid" or loaded.model.out_channels != 1:
        raise SystemExit(f"{ckpt}: not a 2-D one-channel sigmoid (membrane) model")
    norm = loaded.config.normalization
    factor = 1 if native else downsample_factor(None, loaded.config.run_voxel_size_nm, (50.0, 4.0, 4.0))
    prob = predict_volume(loaded.model, downsample_sections(raw, factor), (norm.mean, norm.std), activation="sigmoid",
                          tta=tta)
    return np.asarray(repeat_sections(prob[0], factor, raw.shape[-2:]), dtype=np.float32)


def errors(prob: np.ndarray, membrane: np.ndarray) -> dict[float, float]:
    return {t: float(((prob > t) != membrane).mean()) for t in THRESHOLDS}  # 0.5 is one of them


def main() -> None:
    import tifffile
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--tta", action="store_true", help="also with emseg's flip test-time augmentation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--native", action="store_true", help="run every model at 4 nm, whatever voxel size it runs at")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    raw = tifffile.imread(DATA / "train-volume.tif")
    membrane = tifffile.imread(DATA / "train-labels.tif") == 0  # ISBI: 0 = membrane
    print("| checkpoint | mode | 16-19 at 0.5 | t* (from 0-15) | 16-19 at t* | 16-19 best (threshold) |")
    print("|---|---|---:|---:|---:|---:|")
    for ckpt in args.checkpoints:
        for tta in (False, True) if args.tta else (False,):
            train = errors(membrane_probability(ckpt, raw[:16], tta=tta, native=args.native), membrane[:16])
            val = errors(membrane_probability(ckpt, raw[16:], tta=tta, native=args.native), membrane[16:])
            chosen = min(THRESHOLDS, key=lambda t: train[t])
            best = min(THRESHOLDS, key=lambda t: val[t])
            mode = ("flips" if tta else "plain") + (", 4 nm" if args.native else "")
            print(f"| {ckpt} | {mode} | {val[0.5]:.4f} | {chosen:.2f} | {val[chosen]:.4f} | "
                  f"{val[best]:.4f} ({best:.2f}) |", flush=True)


if __name__ == "__main__":
    main()
