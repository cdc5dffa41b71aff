"""How the bundled 2-D model does when it sees the sections at a coarser scale, alone or beside the native one.

For one labelled dataset of ``../shared/data``, this runs what a user runs (``emseg import``,
``emseg segment``, ``emseg agglomerate --thresholds``, ``emseg evaluate``) on

* ``--factor F``: the raw mean-downsampled by ``F`` in y and x (recorded at ``F`` times the voxel
  size); the segments are upsampled back (nearest) before they are scored against the ground truth;
* ``--combine mean|max``: the native prediction combined voxel by voxel with the ``F = 2`` one
  (upsampled, linear); both must have been run first.  The combination is written over a copy of
  the native output's prediction, whose chunk census is updated, and ``emseg agglomerate`` makes
  fragments, graph and segments from it as from any prediction.

Scores (adapted Rand error, VOI split/merge, segments) per threshold go to stdout and to
``WORK/<tag>.json``.  Figures: ``benchmarks/README_loo.md``, "Coarser scales".

    python benchmarks/scale_probe.py cremi --factor 1 --work /tmp/scale
    python benchmarks/scale_probe.py cremi --factor 2 --work /tmp/scale
    python benchmarks/scale_probe.py cremi --combine mean --work /tmp/scale
    python benchmarks/scale_probe.py cremi --factor 2 --work /tmp/scale8 --model runs/m8
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile
import zarr
from skimage.transform import downscale_local_mean, resize

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
THRESHOLDS = "0.5,0.6,0.7,0.75,0.8,0.85,0.9"
#: name: raw, ground truth, voxel size (z, y, x nm), sections, per-section labels (--2d)
DATASETS = {
    "cremi": ("cremi_b_crop/raw.tif", "cremi_b_crop/neuron_ids.tif", (40, 4, 4), None, False),
    "vnc": ("vnc_sstem/raw.tif", "vnc_sstem/membranes.tif", (50, 4.6, 4.6), None, False),
    "isbi_16_19": ("isbi2012/train-volume.tif", "isbi2012/train-labels.tif", (50, 4, 4), (16, 20), True),
}


def emseg(*args: str) -> str:
    done = subprocess.run([str(Path(sys.executable).parent / "emseg"), *args], capture_output=True, text=True,
                          cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"emseg {' '.join(args)} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout


def score(out: Path, gt: Path, factor: int, shape: tuple[int, ...], work: Path, tag: str) -> dict[str, dict]:
    """Every label image of ``out`` upsampled by ``factor`` to ``shape`` and scored by emseg evaluate."""
    root = zarr.open_group(str(out), mode="r")
    scores = {}
    for name in sorted(root["labels"].keys()):
        if not name.startswith("segments"):
            continue
        seg = np.asarray(root["labels"][name]["0"])
        seg = np.repeat(np.repeat(seg, factor, 1), factor, 2)
        pad = [(0, 0)] + [(0, max(0, s - n)) for s, n in zip(shape[1:], seg.shape[1:])]
        seg = np.pad(seg, pad, mode="edge")[:, : shape[1], : shape[2]]
        path = work / f"{tag}-{name}.tif"
        tifffile.imwrite(path, seg)
        result = json.loads(emseg("evaluate", str(path), str(gt), "--json").strip().splitlines()[-1])
        row = result["results"][0] if "results" in result else result
        scores[name] = {k: row.get(k) for k in ("adapted_rand_error", "voi_split", "voi_merge", "segments")}
        print(tag, name, {k: round(v, 4) if isinstance(v, float) else v for k, v in scores[name].items()}, flush=True)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("--factor", type=int, default=1)
    parser.add_argument("--combine", choices=("mean", "max"))
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--model", help="A checkpoint in place of the automatic choice (use one --work per model).")
    args = parser.parse_args()
    raw_name, gt_name, voxel, sections, per_section = DATASETS[args.dataset]
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    raw, gt = tifffile.imread(DATA / raw_name), tifffile.imread(DATA / gt_name)
    if sections:
        raw, gt = raw[sections[0]: sections[1]], gt[sections[0]: sections[1]]
    gt_path = work / f"{args.dataset}-gt.tif"
    tifffile.imwrite(gt_path, gt)
    flags = ["--2d"] if per_section else []
    if args.combine:
        tag = f"{args.dataset}-{args.combine}"
        native, coarse = (work / f"{args.dataset}-f{f}_seg.zarr" for f in (1, 2))
        a = np.asarray(zarr.open_array(str(native / "0"), mode="r")[:], dtype=np.float32)
        b = np.asarray(zarr.open_array(str(coarse / "0"), mode="r")[:], dtype=np.float32)
        up = np.stack([resize(b[0, z], a.shape[2:], order=1, preserve_range=True, anti_aliasing=False)
                       for z in range(a.shape[1])])[None]
        both = (a + up) / 2 if args.combine == "mean" else np.maximum(a, up)
        out = work / f"{tag}_seg.zarr"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(native, out)
        shutil.rmtree(out / "labels")
        zarr.open_array(str(out / "0"), mode="r+")[:] = np.clip(np.rint(both), 0, 255).astype(np.uint8)
        from emseg.engine.ledger import census_of
        from emseg.io import read_status, update_status

        census = dict(read_status(out).get("census") or {})
        census["0"] = census_of(out / "0")
        update_status(out, census=census)
        emseg("agglomerate", str(out), "--thresholds", THRESHOLDS, "--no-progress", *flags)
        factor = 1
    else:
        factor = args.factor
        tag = f"{args.dataset}-f{factor}"
        small = downscale_local_mean(raw.astype(np.float32), (1, factor, factor)) if factor > 1 else raw
        tif = work / f"{tag}.tif"
        tifffile.imwrite(tif, np.clip(small, 0, 255).astype(np.uint8))
        volume, out = work / f"{tag}.zarr", work / f"{tag}_seg.zarr"
        size = f"{voxel[0]},{voxel[1] * factor},{voxel[2] * factor}"
        emseg("import", str(tif), str(volume), "--voxel-size", size, "--overwrite", "--no-progress")
        model = ["--model", args.model] if args.model else []
        emseg("segment", str(volume), "-o", str(out), "--overwrite", "--no-progress", *flags, *model)
        emseg("agglomerate", str(out), "--thresholds", THRESHOLDS, "--no-progress", *flags)
    scores = score(out, gt_path, factor, gt.shape, work, tag)
    (work / f"{tag}.json").write_text(json.dumps(scores, indent=1))


if __name__ == "__main__":
    main()
