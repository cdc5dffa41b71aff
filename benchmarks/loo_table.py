"""Leave-one-dataset-out table: `emseg segment` with no flags on every labelled dataset in ../shared/data,
each scored with a model that never saw it, the way a user runs it, 3-D where the ground truth is 3-D.

For each dataset the script imports the raw volume (with its voxel size, as a user would), runs
``emseg segment`` with the model named for that row (``--model`` only where the shipped model saw the
dataset: the leave-one-out model), agglomerates the same region graph at every threshold of the sweep
(``emseg agglomerate --thresholds``), and scores every result with ``emseg evaluate`` (instance ground
truth in 3-D, section masks per section).  It prints one markdown table per configuration, the mean over
datasets per threshold, and which threshold the table as a whole picks.

Configurations (``--configs``):

* ``default``: exactly ``emseg segment VOL`` (the model the automatic choice picks, its threshold);
  on the rows whose data that model saw, ``--model`` swaps in the leave-one-out model.
* ``2d``: the same with ``--2d`` (per-section labels).
* ``tta``: the same with ``--tta`` (predictions averaged over the flips of the section).
* ``fib3d``: the bundled 3-D affinity model where the volume is isotropic (it saw gala ``train``).

Usage (from the repository root, ~20-40 min on 2 free cores; predictions are cached in --work)::

    python benchmarks/loo_table.py --work /tmp/loo --models shipped=emseg/models/bundled \
        --loo isbi=/path/to/model-without-isbi [--datasets cremi,gala_raveler] [--configs default,2d]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
THRESHOLDS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


@dataclass(frozen=True)
class Dataset:
    name: str
    raw: str
    gt: str
    voxel_size: str
    gt_3d: bool  # instance ids in 3-D (scored as one volume) or section masks (scored per section)
    sections: tuple[int, int] | None = None  # a z range of the TIFFs (written to --work as its own TIFFs)


DATASETS = (
    Dataset("isbi", "isbi2012/train-volume.tif", "isbi2012/train-labels.tif", "50,4,4", False),
    Dataset("isbi_16_19", "isbi2012/train-volume.tif", "isbi2012/train-labels.tif", "50,4,4", False, (16, 20)),
    Dataset("vnc", "vnc_sstem/raw.tif", "vnc_sstem/membranes.tif", "50,4.6,4.6", False),
    Dataset("cremi", "cremi_b_crop/raw.tif", "cremi_b_crop/neuron_ids.tif", "40,4,4", True),
    Dataset("gala_train", "fib_gala/train-raw.tif", "fib_gala/train-labels.tif", "10,10,10", True),
    Dataset("gala_raveler", "fib_gala/raveler-raw.tif", "fib_gala/raveler-labels.tif", "10,10,10", True),
)


def emseg(*args: str, log: Path) -> str:
    """Run the emseg command as a user would; its stdout (stderr appended to ``log``)."""
    cmd = [str(Path(sys.executable).parent / "emseg"), *args]
    with open(log, "a") as err:
        err.write("$ emseg " + " ".join(args) + "\n")
        err.flush()
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"emseg {' '.join(args)} failed ({done.returncode}); see {log}")
    return done.stdout


def files(ds: Dataset, work: Path) -> tuple[Path, Path]:
    """The raw and ground-truth TIFFs of ``ds`` (its section range cut into ``work``)."""
    if ds.sections is None:
        return DATA / ds.raw, DATA / ds.gt
    import tifffile

    z0, z1 = ds.sections
    out = []
    for name, src in (("raw", ds.raw), ("gt", ds.gt)):
        path = work / f"{ds.name}-{name}.tif"
        if not path.exists():
            tifffile.imwrite(path, tifffile.imread(DATA / src)[z0:z1])
        out.append(path)
    return out[0], out[1]


def segment(ds: Dataset, config: str, model: str | None, work: Path, log: Path) -> tuple[Path, float]:
    """``emseg segment`` of one dataset in one configuration (resumed when done); the output and its seconds."""
    volume = work / f"{ds.name}.zarr"
    if not volume.exists():
        emseg("import", str(files(ds, work)[0]), str(volume), "--voxel-size", ds.voxel_size, "--no-progress",
              log=log)
    tag = f"{ds.name}-{config}-{Path(model).name if model else 'auto'}"
    out = work / f"{tag}.zarr"
    args = ["segment", str(volume), "-o", str(out), "--no-progress", "--json"]
    if model:
        args += ["--model", model]
    if config == "2d":
        args += ["--2d"]
    if config == "tta":
        args += ["--tta"]
    start = time.perf_counter()
    report = json.loads(emseg(*args, log=log).strip().splitlines()[-1])
    seconds = time.perf_counter() - start
    (work / f"{tag}.report.json").write_text(json.dumps(report))
    return out, seconds


def sweep(ds: Dataset, out: Path, work: Path, log: Path) -> dict[float, dict[str, float]]:
    """Scores of the default segments and of every threshold of :data:`THRESHOLDS` from the same graph."""
    emseg("agglomerate", str(out), "--thresholds", ",".join(f"{t:g}" for t in THRESHOLDS), "--no-progress",
          log=log)
    result = json.loads(emseg("evaluate", str(out), str(files(ds, work)[1]), "--json", log=log).strip().splitlines()[-1])
    scores: dict[float, dict[str, float]] = {}
    for row in result["results"]:
        t = row.get("threshold")
        if t is None:
            continue
        scores[float(t)] = {k: row[k] for k in ("adapted_rand_error", "voi_split", "voi_merge", "segments")}
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="Folder for imported volumes and outputs (reused).")
    parser.add_argument("--loo", action="append", default=[],
                        help="DATASET=MODEL: the model that never saw DATASET, used on its row instead of the "
                             "automatic choice (which saw it). Repeatable.")
    parser.add_argument("--seen", action="append", default=[],
                        help="DATASET=what: the automatic model saw DATASET (printed beside its figures).")
    parser.add_argument("--model", default=None,
                        help="A checkpoint for every row without a --loo model (default: the automatic choice).")
    parser.add_argument("--datasets", default=",".join(d.name for d in DATASETS if d.name != "isbi_16_19"))
    parser.add_argument("--configs", default="default,2d")
    parser.add_argument("--label", default="run", help="Name of this run's results file in --work.")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "emseg.log"
    loo = dict(item.split("=", 1) for item in args.loo)
    seen = dict(item.split("=", 1) for item in args.seen)
    wanted = args.datasets.split(",")
    results: dict[str, dict[str, dict[str, object]]] = {}
    for config in args.configs.split(","):
        for ds in DATASETS:
            if ds.name not in wanted:
                continue
            if config == "fib3d" and not ds.voxel_size.startswith("10,"):
                continue
            model = "fib3d" if config == "fib3d" else loo.get(ds.name, args.model)
            out, seconds = segment(ds, config, model, args.work, log)
            report = json.loads((args.work / f"{out.stem}.report.json").read_text())
            default_t = report["label"]["agglomerate"]["threshold"]
            scores = sweep(ds, out, args.work, log)
            results.setdefault(config, {})[ds.name] = {
                "model": model or "automatic choice", "seen": seen.get(ds.name, "") if not model else "",
                "threshold": default_t, "seconds": seconds, "scores": {str(t): s for t, s in scores.items()},
                "findings": [f["code"] for f in report.get("findings", [])],
            }
            print(f"{config} {ds.name}: {json.dumps(results[config][ds.name])}", flush=True)
            (args.work / f"loo_results-{args.label}.json").write_text(json.dumps(results, indent=1))
    print_tables(results)


def print_tables(results: dict[str, dict[str, dict[str, object]]]) -> None:
    for config, rows in results.items():
        print(f"\n### configuration `{config}`\n")
        print("| dataset | model (never saw the dataset unless noted) | threshold | ARE | VOI split | VOI merge | "
              "segments | findings | s |")
        print("|---|---|---:|---:|---:|---:|---:|---|---:|")
        for name, row in rows.items():
            t = float(row["threshold"])  # type: ignore[arg-type]
            s = row["scores"].get(str(t)) or row["scores"].get(f"{t:g}")  # type: ignore[union-attr]
            if s is None:
                continue
            note = f" (saw {row['seen']})" if row["seen"] else ""
            print(f"| {name} | {Path(str(row['model'])).name}{note} | {t:g} | {s['adapted_rand_error']:.4f} | "
                  f"{s['voi_split']:.3f} | {s['voi_merge']:.3f} | {s['segments']} | "
                  f"{', '.join(row['findings']) or '-'} | {float(row['seconds']):.0f} |")  # type: ignore[arg-type]
        print("\nmean ARE over datasets by threshold: " + ", ".join(
            f"{t:g}: {sum(r['scores'][str(t)]['adapted_rand_error'] for r in rows.values()) / len(rows):.4f}"  # type: ignore[index]
            for t in THRESHOLDS if all(str(t) in r["scores"] for r in rows.values())))  # type: ignore[operator]


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
