"""Bring your own volume: `emseg finetune` on one labelled crop, `emseg segment --model CKPT` on another.

Each case runs, through the real command line and in one session:

1. ``emseg import`` of the evaluation volume (TIFF -> OME-Zarr, with its voxel size);
2. the baseline: ``emseg segment EVAL.zarr`` with no other flags (the bundled model and threshold
   that emseg picks), scored by ``emseg evaluate --json`` in 3-D (instance ground truth, as one volume);
3. ``emseg finetune --raw ... --labels ... -o CKPT --time-limit M`` on the training crop only;
4. ``emseg segment EVAL.zarr --model CKPT`` (no other flags: the checkpoint's threshold), scored the same way.

``--workers 1 --no-progress`` are run options (where blocks run, no progress bar); they do not change
the output.  The evaluation crop is never seen by the fine-tuning (it holds out part of its own crop).

Cases (``../shared/data``)::

    gala_train_to_raveler   fine-tune on fib_gala/train-*   (50 x 100 x 200), evaluate raveler-* (50 x 200 x 100)
    gala_raveler_to_train   fine-tune on fib_gala/raveler-* , evaluate train-*
    cremi_0-2_to_3-4        fine-tune on cremi_b_crop sections 0-2, evaluate sections 3-4 in 3-D

Usage::

    nice -n 5 .venv/bin/python benchmarks/finetune_byov.py --workdir /tmp/byov --case gala_train_to_raveler
    .venv/bin/python benchmarks/finetune_byov.py --workdir /tmp/byov --report   # writes README_finetune.md's table
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
README = ROOT / "benchmarks" / "README_finetune.md"
BEGIN, END = "<!-- finetune_byov:begin -->", "<!-- finetune_byov:end -->"


@dataclass(frozen=True)
class Case:
    name: str
    train_raw: str  # emseg finetune --raw (relative to the data folder, [z0:z1] allowed)
    train_labels: str
    eval_raw: str
    eval_labels: str
    eval_sections: tuple[int, int] | None
    voxel_size: str


CASES = (
    Case("gala_train_to_raveler", "fib_gala/train-raw.tif", "fib_gala/train-labels.tif",
         "fib_gala/raveler-raw.tif", "fib_gala/raveler-labels.tif", None, "10,10,10"),
    Case("gala_raveler_to_train", "fib_gala/raveler-raw.tif", "fib_gala/raveler-labels.tif",
         "fib_gala/train-raw.tif", "fib_gala/train-labels.tif", None, "10,10,10"),
    Case("cremi_0-2_to_3-4", "cremi_b_crop/raw.tif[0:3]", "cremi_b_crop/neuron_ids.tif[0:3]",
         "cremi_b_crop/raw.tif", "cremi_b_crop/neuron_ids.tif", (3, 5), "40,4,4"),
)


def emseg(*args: str, log: Path) -> tuple[str, float]:
    """Run ``emseg ARGS`` (this venv's command); stdout and wall seconds returned, stderr to ``log``."""
    exe = Path(sys.executable).parent / "emseg"
    start = time.perf_counter()
    with open(log, "a") as err:
        for attempt in range(2):  # a rerun resumes; on a loaded machine a worker may time out starting
            err.write(f"\n$ emseg {' '.join(args)}\n")
            err.flush()
            done = subprocess.run([str(exe), *args], stdout=subprocess.PIPE, stderr=err, text=True)
            seconds = time.perf_counter() - start
            err.write(f"# exit {done.returncode} after {seconds:.1f} s\n")
            if done.returncode == 0 or attempt == 1:
                break
            err.write("# rerunning the same command\n")
    if done.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"emseg {' '.join(args)} failed (exit {done.returncode}); see {log}:\n" + "\n".join(tail))
    return done.stdout, seconds


def sections(src: Path, span: tuple[int, int] | None, dst: Path) -> Path:
    """``emseg import``/``evaluate`` take whole files: write the sections to a TIFF."""
    if span is None:
        return src
    import tifffile

    tifffile.imwrite(dst, tifffile.imread(src)[span[0]:span[1]], photometric="minisblack")
    return dst


def score(seg: Path, gt: Path, log: Path) -> dict[str, float]:
    out, _ = emseg("evaluate", str(seg / "labels" / "segments"), str(gt), "--mode", "volume", "--json", log=log)
    r = json.loads(out)
    r = r["results"][0] if "results" in r else r
    keys = ("adapted_rand_error", "voi_split", "voi_merge", "segments")
    return {k: r[k] for k in keys if k in r}


def run_case(case: Case, workdir: Path, time_limit: float, threads: int) -> dict[str, object]:
    from emseg.io import read_status
    from emseg.workflows.predict import default_checkpoint

    code = _commit()  # the code the case starts with (imported now: later edits of the tree do not mix in)
    work = workdir / case.name
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    raw = sections(DATA / case.eval_raw, case.eval_sections, work / "eval_raw.tif")
    gt = sections(DATA / case.eval_labels, case.eval_sections, work / "eval_gt.tif")
    volume = work / "eval.zarr"
    if not volume.exists():
        emseg("import", str(raw), str(volume), "--voxel-size", case.voxel_size, "--no-progress", log=log)
    run = ["--workers", "1", "--no-progress", "--overwrite"]
    base_seg = work / "bundled_seg.zarr"
    _, base_s = emseg("segment", str(volume), "-o", str(base_seg), *run, log=log)
    base_t = read_status(base_seg / "labels" / "segments")["threshold"]
    base = score(base_seg, gt, log)
    ckpt = work / "ckpt"
    shutil.rmtree(ckpt, ignore_errors=True)
    finetune = ["finetune", "--raw", str(DATA / case.train_raw), "--labels", str(DATA / case.train_labels),
                "--voxel-size", case.voxel_size, "-o", str(ckpt), "--time-limit", f"{time_limit:g}",
                "--threads", str(threads), "--no-progress", "--json"]
    out, ft_s = emseg(*finetune, log=log)
    report = json.loads(out)
    ft_seg = work / "finetuned_seg.zarr"
    _, ft_seg_s = emseg("segment", str(volume), "-o", str(ft_seg), "--model", str(ckpt), *run, log=log)
    ft_t = read_status(ft_seg / "labels" / "segments")["threshold"]
    after = score(ft_seg, gt, log)
    bundled_model = Path(report["model"]).name
    result = {
        "case": case.name, "train": f"{case.train_raw} + {case.train_labels}",
        "eval": f"{case.eval_raw}" + (f" sections {case.eval_sections[0]}-{case.eval_sections[1] - 1}"
                                      if case.eval_sections else ""),
        "bundled": {"model": bundled_model, "threshold": base_t, **base, "segment_s": round(base_s, 1)},
        "finetuned": {"threshold": ft_t, **after, "segment_s": round(ft_seg_s, 1), "finetune_s": round(ft_s, 1),
                      "chosen": report["chosen"], "steps": report["steps"], "holdout": report["holdout"],
                      "validation_before": report["before"], "validation_before_calibrated":
                      report["before_calibrated"], "validation_after": report["after"],
                      "validations": report["validations"], "plain_optimum": _plain_optimum(report)},
        "commands": {"finetune": "emseg " + " ".join(finetune).replace(str(DATA), "../shared/data"),
                     "segment": f"emseg segment EVAL.zarr --model CKPT {' '.join(run)}"},
        "code": code,
        "default_checkpoint": str(default_checkpoint(tuple(float(v) for v in case.voxel_size.split(",")))),
    }
    (work / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _plain_optimum(report: dict[str, object]) -> dict[str, object]:
    """What the lowest held-out ARE + VOI alone (no margin against merges) would have kept."""
    runs = report["validations"]
    best = min(runs, key=lambda v: v["best_sum"])  # type: ignore[arg-type,index]
    return {"chosen": best["name"], "threshold": best["best_threshold"], "sum": best["best_sum"]}


def _commit() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def markdown(results: list[dict[str, object]], meta: str) -> str:
    lines = [BEGIN, "", meta, "",
             "| case | model | threshold | ARE | VOI split | VOI merge | ARE + VOI | segments | wall time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        b, f = r["bundled"], r["finetuned"]  # type: ignore[index]
        bundled = "bundled (no flags)" if b["model"] == "bundled" else f"bundled `{b['model']}` (no flags)"
        for label, row, t in ((bundled, b, f"{b['segment_s']:.0f} s segment"),
                              (f"fine-tuned ({f['chosen']}, {f['steps']} steps)", f,
                               f"{f['finetune_s'] / 60:.1f} min finetune + {f['segment_s']:.0f} s segment")):
            s = row["adapted_rand_error"] + row["voi_split"] + row["voi_merge"]
            lines.append(f"| {r['case']} | {label} | {row['threshold']:g} | {row['adapted_rand_error']:.4f} | "
                         f"{row['voi_split']:.3f} | {row['voi_merge']:.3f} | **{s:.3f}** | {row.get('segments', '')} "
                         f"| {t} |")
    lines += ["", "Held-out part of the fine-tuning crop (what `emseg finetune` printed; selection and threshold "
              "were chosen on it, so these are optimistic):", "",
              "| case | held out | starting model, default threshold | starting model, calibrated | written checkpoint "
              "| plain optimum (no margin) |",
              "|---|---|---|---|---|---|"]
    for r in results:
        f = r["finetuned"]  # type: ignore[index]

        def fmt(x: dict[str, float]) -> str:
            return f"{x['sum']:.3f} (t {x['threshold']:g})"

        plain = f.get("plain_optimum")
        plain_text = f"{plain['chosen']}: {plain['sum']:.3f} (t {plain['threshold']:g})" if plain else ""
        lines.append(f"| {r['case']} | {f['holdout']} | {fmt(f['validation_before'])} | "
                     f"{fmt(f['validation_before_calibrated'])} | {f['chosen']}: {fmt(f['validation_after'])} "
                     f"| {plain_text} |")
    lines += ["", "Commands:", ""]
    for r in results:
        c = r["commands"]  # type: ignore[index]
        lines.append(f"- {r['case']}: `{c['finetune']}`, then `{c['segment']}`")
    lines += ["", END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--case", action="append", choices=[c.name for c in CASES])
    parser.add_argument("--time-limit", type=float, default=15.0, help="emseg finetune --time-limit, minutes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", action="store_true", help="write the table of every finished case")
    args = parser.parse_args()
    for case in CASES:
        if args.case and case.name in args.case:
            result = run_case(case, args.workdir, args.time_limit, args.threads)
            print(json.dumps(result, indent=2))
    if args.report:
        results = [json.loads((args.workdir / c.name / "result.json").read_text()) for c in CASES
                   if (args.workdir / c.name / "result.json").exists()]
        codes = ", ".join(f"{r['case']} at {r.get('code', '?')}" for r in results)
        meta = (f"Code: {codes}; 2 shared CPU cores (other engineers' jobs running), `nice -n 5`, "
                f"fine-tuning with 1 torch thread. ARE = adapted Rand error, VOI in bits, scored in 3-D "
                "against the instance ids (0 ignored); lower is better.")
        text = README.read_text() if README.exists() else "# Bring your own volume: emseg finetune\n\n"
        if BEGIN in text:
            text = text[: text.index(BEGIN)] + markdown(results, meta) + text[text.index(END) + len(END):]
        else:
            text += markdown(results, meta) + "\n"
        README.write_text(text)


if __name__ == "__main__":
    main()
