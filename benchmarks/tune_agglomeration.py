"""Tune the agglomeration threshold on tuning data, then report that choice on held-out validation data.

Everything runs through the real command line, as a user would: ``emseg import`` (TIFF -> OME-Zarr),
``emseg segment VOLUME -o OUT`` with no other flags (predict -> fragments -> region graph ->
agglomerate -> relabel, defaults from the model's metadata), ``emseg agglomerate
OUT/labels/fragments --thresholds ...`` (the sweep, reusing the graph) and ``emseg evaluate OUT GT
--json`` (every label image of the run: fragments, the default segments, one per threshold).

Data (``../shared/data``), never mixing the two roles::

    role      set               sections / crop             ground truth                 scored
    tune-2d   ISBI 2012 train   0-15                        0/255 mask -> 4-conn. cells  per section
    tune-2d   CREMI B crop      5 x 500 x 500               neuron ids                   per section
    tune-3d   gala FIB-SEM      train-* 50 x 100 x 200      3-D body ids                 as a volume
    val-2d    ISBI 2012 train   16-19 (never trained on)    0/255 mask -> 4-conn. cells  per section
    val-3d    gala FIB-SEM      raveler-* 50 x 200 x 100    3-D body ids                 as a volume

Choices, each the threshold with the lowest sum of (adapted Rand error + VOI split + VOI merge)
over its tuning sets: the pooled 2-D one (ISBI 0-15 + CREMI: a candidate default),
one per 2-D tuning set (its recipe's value; ISBI's is the ``pipelines/isbi2012.toml`` candidate)
and the 3-D one (gala train).  Only then are the validation sets segmented, and agglomerated only
at the thresholds chosen for them; reported are the fragments (before agglomeration),
``emseg segment``'s own default (no flags) and each choice.
Writes the section between the ``tune`` markers of ``benchmarks/README_agglomeration.md`` and
the sweeps as JSON; rerun it after the bundled model (or the defaults) change.

Usage::

    nice -n 10 .venv/bin/python benchmarks/tune_agglomeration.py --workdir /tmp/emseg-tune
    nice -n 10 .venv/bin/python benchmarks/tune_agglomeration.py --model path/to/checkpoint
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
README = ROOT / "benchmarks" / "README_agglomeration.md"
BEGIN, END = "<!-- tune_agglomeration:begin -->", "<!-- tune_agglomeration:end -->"
THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


@dataclass(frozen=True)
class Dataset:
    name: str
    role: str  # tune-2d, tune-3d, val-2d, val-3d
    raw: str  # path relative to the data folder
    gt: str
    sections: tuple[int, int] | None  # z range, or None for all
    voxel_size: str
    mode: str  # evaluate --mode


DATASETS = (
    Dataset("isbi_0-15", "tune-2d", "isbi2012/train-volume.tif", "isbi2012/train-labels.tif", (0, 16), "50,4,4", "auto"),
    Dataset("cremi_b_crop", "tune-2d", "cremi_b_crop/raw.tif", "cremi_b_crop/neuron_ids.tif", None, "40,4,4", "section"),
    Dataset("gala_train", "tune-3d", "fib_gala/train-raw.tif", "fib_gala/train-labels.tif", None, "10,10,10", "volume"),
    Dataset("isbi_16-19", "val-2d", "isbi2012/train-volume.tif", "isbi2012/train-labels.tif", (16, 20), "50,4,4", "auto"),
    Dataset("gala_raveler", "val-3d", "fib_gala/raveler-raw.tif", "fib_gala/raveler-labels.tif", None, "10,10,10",
            "volume"),
)


def emseg(*args: str, log: Path) -> str:
    """Run ``emseg ARGS`` (the installed command of this venv); stdout returned, stderr to ``log``."""
    exe = Path(sys.executable).parent / "emseg"
    start = time.perf_counter()
    with open(log, "a") as err:
        err.write(f"\n$ emseg {' '.join(args)}\n")
        err.flush()
        done = subprocess.run([str(exe), *args], stdout=subprocess.PIPE, stderr=err, text=True)
        err.write(f"# exit {done.returncode} after {time.perf_counter() - start:.1f} s\n")
    if done.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"emseg {' '.join(args)} failed (exit {done.returncode}); see {log}:\n" + "\n".join(tail))
    return done.stdout


def tiff_slice(src: Path, sections: tuple[int, int] | None, dst: Path) -> Path:
    """``emseg import`` takes whole files: write the sections to a temporary TIFF."""
    if sections is None:
        return src
    import tifffile

    data = tifffile.imread(src)[sections[0]:sections[1]]
    tifffile.imwrite(dst, data, photometric="minisblack")
    return dst


def run_dataset(ds: Dataset, workdir: Path, model: str | None, thresholds: tuple[float, ...], log: Path
                ) -> dict[str, object]:
    src = workdir / "src"
    src.mkdir(exist_ok=True)
    raw = tiff_slice(DATA / ds.raw, ds.sections, src / f"{ds.name}_raw.tif")
    gt = tiff_slice(DATA / ds.gt, ds.sections, src / f"{ds.name}_gt.tif")
    volume, out = workdir / f"{ds.name}.zarr", workdir / f"{ds.name}_seg.zarr"
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if not volume.exists():  # a rerun in the same workdir resumes: import once, segment/agglomerate resume
        emseg("import", str(raw), str(volume), "--voxel-size", ds.voxel_size, "--no-progress", log=log)
    timings["import"] = time.perf_counter() - start
    start = time.perf_counter()
    segment = ["segment", str(volume), "-o", str(out), "--no-progress"] + (["--model", model] if model else [])
    emseg(*segment, log=log)
    timings["segment"] = time.perf_counter() - start
    from emseg.io import read_status

    default = read_status(out / "labels" / "segments")["threshold"]  # what `emseg segment` chose
    start = time.perf_counter()
    emseg("agglomerate", str(out / "labels" / "fragments"), "--threshold", f"{default}",
          "--thresholds", ",".join(f"{t:g}" for t in thresholds), "--no-progress", log=log)
    timings["sweep"] = time.perf_counter() - start
    (workdir / f"{ds.name}_curve.png").unlink(missing_ok=True)
    start = time.perf_counter()
    report = json.loads(emseg("evaluate", str(out), str(gt), "--mode", ds.mode, "--json",
                              "--plot", str(workdir / f"{ds.name}_curve.png"), log=log))
    timings["evaluate"] = time.perf_counter() - start
    rows = {}
    for r in report["results"]:
        name = r["segmentation"].split("/")[-1]
        key = "fragments" if name == "fragments" else ("default" if name == "segments" else f"{r['threshold']:g}")
        rows[key] = {k: r[k] for k in ("threshold", "adapted_rand_error", "voi_split", "voi_merge", "voi", "segments",
                                       "gt_segments")}
        if key == "default" and f"{r['threshold']:g}" not in rows:
            rows[f"{r['threshold']:g}"] = rows[key]  # the default threshold's image is labels/segments only
    return {"dataset": ds.name, "role": ds.role, "gt_kind": report["gt_kind"], "mode": report["mode"],
            "command": " ".join(["emseg", *segment]), "rows": rows,
            "seconds": {k: round(v, 1) for k, v in timings.items()}}


def total(results: list[dict[str, object]], sets: list[str], key: str, metric: str = "sum") -> float:
    rows = [r["rows"][key] for r in results if r["dataset"] in sets]  # type: ignore[index]
    return float(sum(x["adapted_rand_error"] + (x["voi"] if metric == "sum" else 0.0) for x in rows))


def choose(results: list[dict[str, object]], sets: list[str], thresholds: tuple[float, ...],
           metric: str = "sum") -> float:
    """The threshold with the lowest ARE + VOI (``metric="sum"``) or ARE summed over ``sets``."""
    return min(thresholds, key=lambda t: total(results, sets, f"{t:g}", metric))


def fmt(row: dict[str, float]) -> str:
    return (f"{row['adapted_rand_error']:.4f} | {row['voi_split']:.3f} | {row['voi_merge']:.3f} | "
            f"{row['segments']} / {row['gt_segments']}")


def markdown(results: list[dict[str, object]], picks: list[dict[str, object]], meta: dict[str, str],
             thresholds: tuple[float, ...]) -> str:
    lines = [BEGIN, "", "## Threshold tuning and validation (`benchmarks/tune_agglomeration.py`)", "",
             f"Run {meta['date']}, code {meta['commit']}, model `{meta['model']}` (safetensors sha256 "
             f"`{meta['model_sha']}…`), {meta['seconds']} s in all on 2 shared CPU cores. Command:", "",
             f"    {meta['command']}", "",
             "Each set: `emseg import` (TIFF; sections cut to a temporary TIFF), `emseg segment VOL -o OUT` with no "
             "other flags, `emseg agglomerate OUT/labels/fragments --thresholds ...` (the graph reused), "
             "`emseg evaluate OUT GT --json`. Scores per the definition of `emseg evaluate`: a 0/255 mask becomes the "
             "4-connected components of each section's interior, membrane (0) ignored, scored per section (mean "
             "over sections); CREMI (3-D ids, 2-D pipeline) also per section; the gala FIB-SEM crops as 3-D volumes "
             "(id 0 ignored). ARE = adapted Rand error, VOI in bits; `segments / true` counts per section summed "
             "(2-D) or in the volume (3-D). The thresholds are chosen on the tuning sets only; the validation sets "
             "are segmented afterwards and agglomerated only at the chosen thresholds.", "",
             "### Choices (lowest sum of ARE + VOI over the named tuning sets)", ""]
    for p in picks:
        lines.append(f"- {p['name']}: **{p['threshold']:g}** (by ARE alone: {p['by_are']:g}); validated on "
                     f"{p['validate'] or 'no set'}")
    lines += ["", "### Tuning sets: the whole sweep", "",
              "| set | labels | ARE | VOI split | VOI merge | segments / true |", "|---|---|---|---|---|---|"]
    for r in results:
        if str(r["role"]).startswith("val"):
            continue
        rows = r["rows"]  # type: ignore[assignment]
        own = choose(results, [str(r["dataset"])], thresholds)
        for key in ["fragments", "default"] + [f"{t:g}" for t in thresholds]:
            if key not in rows or (key != "default" and rows[key] is rows.get("default")):
                continue
            t = rows[key]["threshold"]
            if key == "fragments":
                label = "fragments (before agglomeration)"
            elif key == "default":
                label = f"`emseg segment` default (t = {t:g})"
            else:
                label = f"t = {key}"
            if t is not None and f"{t:g}" == f"{own:g}":
                label = f"**{label}** (best for this set)"
            lines.append(f"| {r['dataset']} | {label} | {fmt(rows[key])} |")
    lines += ["", "### Validation sets (never tuned on)", "",
              "| set | labels | ARE | VOI split | VOI merge | segments / true |", "|---|---|---|---|---|---|"]
    for r in results:
        if not str(r["role"]).startswith("val"):
            continue
        rows = r["rows"]  # type: ignore[assignment]
        lines.append(f"| {r['dataset']} | fragments (before agglomeration) | {fmt(rows['fragments'])} |")
        lines.append(f"| {r['dataset']} | `emseg segment` default, no flags (t = {rows['default']['threshold']:g}) | "
                     f"{fmt(rows['default'])} |")
        for p in picks:
            if p["validate"] == r["dataset"]:
                key = f"{p['threshold']:g}"
                lines.append(f"| {r['dataset']} | {p['name']}: t = {key} | {fmt(rows[key])} |")
    lines += ["", "Seconds per set (import / segment / agglomerate sweep / evaluate), 2 CPU cores shared with other "
              "jobs: " + "; ".join(f"{r['dataset']} " + " / ".join(f"{v}" for v in r["seconds"].values())  # type: ignore[union-attr]
                                   for r in results), "", END]
    return "\n".join(lines)


def write_readme(section: str) -> None:
    text = README.read_text() if README.exists() else "# Agglomeration: tuning, validation and scale\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    README.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="outputs (default: a temp dir, removed after)")
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--thresholds", default=",".join(f"{t:g}" for t in THRESHOLDS))
    parser.add_argument("--sets", default=",".join(d.name for d in DATASETS), help="subset of the data sets")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite benchmarks/README_agglomeration.md")
    parser.add_argument("--report-only", action="store_true",
                        help="only rewrite the report from WORKDIR/tune_agglomeration.json of an earlier run")
    args = parser.parse_args()
    if args.report_only:
        if args.workdir is None:
            raise SystemExit("--report-only needs the --workdir of an earlier run")
        saved = json.loads((args.workdir / "tune_agglomeration.json").read_text())
        section = markdown(saved["results"], saved["picks"], saved["meta"], tuple(saved["thresholds"]))
        print(section)
        if not args.no_readme:
            write_readme(section)
        return
    thresholds = tuple(float(t) for t in args.thresholds.split(","))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="emseg-tune-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "emseg.log"
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    wanted = set(args.sets.split(","))
    start = time.perf_counter()
    results: list[dict[str, object]] = []
    sets = [d for d in DATASETS if d.name in wanted]
    # tuning sets first: every choice is made before a validation set is segmented
    for ds in (d for d in sets if d.role.startswith("tune")):
        print(f"{ds.name} ({ds.role}) ...", file=sys.stderr, flush=True)
        results.append(run_dataset(ds, workdir, args.model, thresholds, log))
        print(json.dumps(results[-1]["rows"]), file=sys.stderr, flush=True)
    tune2 = [str(r["dataset"]) for r in results if r["role"] == "tune-2d"]
    tune3 = [str(r["dataset"]) for r in results if r["role"] == "tune-3d"]
    val2 = next((d.name for d in sets if d.role == "val-2d"), "")
    val3 = next((d.name for d in sets if d.role == "val-3d"), "")
    picks: list[dict[str, object]] = []
    if tune2:
        picks.append({"name": f"2-D, pooled ({' + '.join(tune2)}): candidate default",
                      "sets": tune2, "validate": val2})
        picks += [{"name": f"2-D, {name} only: candidate for its recipe", "sets": [name],
                   "validate": val2 if name.startswith("isbi") else ""} for name in tune2]
    if tune3:
        picks.append({"name": f"3-D, {' + '.join(tune3)}: candidate for the fib_gala recipe", "sets": tune3, "validate": val3})
    for p in picks:
        p["threshold"] = choose(results, p["sets"], thresholds)  # type: ignore[arg-type]
        p["by_are"] = choose(results, p["sets"], thresholds, "are")  # type: ignore[arg-type]
    for ds in (d for d in sets if d.role.startswith("val")):
        chosen = tuple(sorted({float(p["threshold"]) for p in picks if p["validate"] == ds.name}))  # type: ignore[arg-type]
        print(f"{ds.name} ({ds.role}) at {chosen} ...", file=sys.stderr, flush=True)
        results.append(run_dataset(ds, workdir, args.model, chosen or thresholds[:1], log))
        print(json.dumps(results[-1]["rows"]), file=sys.stderr, flush=True)
    import emseg as package

    code = Path(package.__file__).resolve().parents[1]
    model_dir = Path(args.model) if args.model else code / "emseg" / "models" / "bundled"
    sha = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()[:16]
    if (code / "COMMIT").exists():  # a `git archive` snapshot run with PYTHONPATH (see the README)
        commit = (code / "COMMIT").read_text().strip()
    else:
        commit = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
            "model": str(args.model or "bundled (emseg/models/bundled)"), "model_sha": sha,
            "seconds": f"{time.perf_counter() - start:.0f}",
            "command": (f"PYTHONPATH={os.environ['PYTHONPATH']} " if os.environ.get("PYTHONPATH") else "")
            + "nice -n 10 .venv/bin/python benchmarks/tune_agglomeration.py " + " ".join(sys.argv[1:])}
    (workdir / "tune_agglomeration.json").write_text(json.dumps({"meta": meta, "picks": picks, "results": results,
                                                                "thresholds": thresholds},
                                                                indent=1))
    section = markdown(results, picks, meta, thresholds)
    print(section)
    if not args.no_readme:
        write_readme(section)
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
