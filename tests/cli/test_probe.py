"""The bad-input contract, probed across every command: several hundred hostile invocations.

Each probe is a command x (a bad path | a bad number | a bad file | a forbidden output), generated
combinatorially below.  For every one: non-zero exit, exactly one ``Error:`` line on stderr, no
traceback, and every input byte-identical afterwards.  Probes run in-process (click's CliRunner);
none of them reaches a Dask cluster, because every one must be refused before work starts.
"""

from __future__ import annotations

import itertools
import os
import signal
import stat
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from emseg.cli import cli
from tests.conftest import tree_digest
from tests.support import read_only_dir

# inputs that are not readable volumes, each tried wherever a command takes a volume
BAD_VOLUMES = ["missing", "emptydir", "text", "garbage", "garbage_tif", "badmeta", "flat", "group", "incomplete",
               "empty", "corrupt", "foreign", "loop", "codec", "bad_scale"]
# commands that only read metadata never see the damaged chunk, and info shows incomplete outputs
NOT_BAD_FOR = {"info": {"corrupt", "incomplete"}, "view": {"corrupt"}}
# commands whose bad-volume probes would reach a cluster (blocks read on workers): corrupt data
# there is a fault test (test_faults.py), not a probe
NOT_PROBED = {"predict": {"corrupt"}, "label": {"corrupt"}, "segment": {"corrupt"}, "train": {"corrupt"},
              "agglomerate": {"corrupt"}}


def volume_commands(o: Path) -> dict[str, list[str]]:
    """Command lines with ``{V}`` where the (bad) volume goes; outputs go under ``o``."""
    return {
        "info": ["info", "{V}"],
        "import": ["import", "{V}", f"{o}/imp.zarr", "--no-progress"],
        "export-tiff": ["export", "{V}", f"{o}/exp.tif", "--no-progress"],
        "export-precomputed": ["export", "{V}", f"{o}/pc", "--format", "precomputed", "--no-progress"],
        "predict": ["predict", "{V}", "-o", f"{o}/p.zarr", "--no-progress"],
        "label": ["label", "{V}", "-o", f"{o}/l.zarr", "--no-progress"],
        "segment": ["segment", "{V}", "-o", f"{o}/s.zarr", "--no-progress"],
        "evaluate-seg": ["evaluate", "{V}", "{seg}"],
        "evaluate-gt": ["evaluate", "{seg}", "{V}"],
        "preview": ["preview", "{V}", "-o", f"{o}/v.png"],
        "view": ["view", "{V}"],
        "train": ["train", "--raw", "{V}", "--labels", "{seg}", "-o", f"{o}/ck", "--steps", "1"],
        "train-labels": ["train", "--raw", "{raw}", "--labels", "{V}", "-o", f"{o}/ck", "--steps", "1"],
        "agglomerate": ["agglomerate", "{V}", "--no-progress"],
    }


def number_probes(o: Path) -> list[list[str]]:
    """Bad numbers for every numeric option."""
    probes: list[list[str]] = []
    zyx_bad = ["0", "-1", "nan", "inf", "abc", "1,2", "0,4,4", "4,-4,4", ""]
    for value in zyx_bad:
        probes += [
            ["predict", "{raw}", "-o", f"{o}/p.zarr", "--block-size", value],
            ["predict", "{raw}", "-o", f"{o}/p.zarr", "--tile-size", value],
            ["predict", "{raw}", "-o", f"{o}/p.zarr", "--chunks", value],
            ["label", "{pred}", "-o", f"{o}/l.zarr", "--block-size", value],
            ["import", "{tif}", f"{o}/i.zarr", "--chunks", value],
            ["synth", f"{o}/s.zarr", "--shape", value],
            ["synth", f"{o}/s.zarr", "--shape", "8,16,16", "--chunks", value],
            ["segment", "{raw}", "-o", f"{o}/s.zarr", "--block-size", value],
        ]
    for value in ["nan,4,4", "inf,4,4", "0,4,4", "-1,4,4", "4,4,-0.5", "abc", "1,2", "nan"]:
        probes += [
            ["import", "{tif}", f"{o}/i.zarr", "--voxel-size", value],
            ["synth", f"{o}/s.zarr", "--shape", "8,16,16", "--voxel-size", value],
        ]
    for triple in (["-1", "4", "4"], ["nan", "4", "4"], ["0", "4", "4"], ["4", "inf", "4"]):
        probes.append(["train", "--raw", "{raw}", "--labels", "{seg}", "-o", f"{o}/ck", "--voxel-size", *triple])
    for value in ["0", "2", "-1", "nan", "abc"]:
        probes += [["label", "{pred}", "-o", f"{o}/l.zarr", "--threshold", value],
                   ["segment", "{raw}", "-o", f"{o}/s.zarr", "--threshold", value],
                   *([["agglomerate", "{pred}", "--threshold", value, "--no-progress"],
                      ["agglomerate", "{pred}", "--thresholds", f"0.3,{value}", "--no-progress"]]
                     if value in ("-1", "nan", "abc") else [])]
    for value in ["0", "-1", "abc", "nan", "1,2,3,4", ""]:
        probes.append(["models", "--input-size", value])
    probes += [["models", "--ndim", "4"], ["agglomerate", "{pred}", "--block-size", "0", "--no-progress"],
               ["agglomerate", "{pred}", "--context", "-1", "--no-progress"],
               ["agglomerate", "{pred}", "--min-size", "-1", "--no-progress"]]
    probes += [
        ["predict", "{raw}", "-o", f"{o}/p.zarr", "--batch-size", "0"],
        ["predict", "{raw}", "-o", f"{o}/p.zarr", "--halo", "-1"],
        ["predict", "{raw}", "-o", f"{o}/p.zarr", "--devices", "-1"],
        ["predict", "{raw}", "-o", f"{o}/p.zarr", "--workers", "0"],
        ["predict", "{raw}", "-o", f"{o}/p.zarr", "--dtype", "int64"],
        ["label", "{pred}", "-o", f"{o}/l.zarr", "--connectivity", "7"],
        ["label", "{pred}", "-o", f"{o}/l.zarr", "--min-size", "-1"],
        ["label", "{pred}", "-o", f"{o}/l.zarr", "--min-distance", "0"],
        ["label", "{big}", "-o", f"{o}/l.zarr", "--block-size", "1,1,1"],
        ["label", "{big}", "-o", f"{o}/l.zarr", "--block-size", "4096,8192,8192"],
        ["synth", f"{o}/s.zarr", "--shape", "100000,100000,100000"],
        ["synth", f"{o}/s.zarr", "--shape", "8,16,16", "--seed", "-1"],
        ["synth", f"{o}/s.zarr", "--shape", "8,16,16", "--cell-size", "0"],
        ["synth", f"{o}/s.zarr", "--shape", "8,16,16", "--zarr-format", "5"],
        ["synth", f"{o}/s.zarr", "--shape", "8,16,16", "--chunks", "4,4,4", "--block-size", "6,6,6"],
        ["import", "{tif}", f"{o}/i.zarr", "--zarr-format", "4"],
        ["export", "{raw}", f"{o}/e.tif", "--level", "7"],
        ["export", "{raw}", f"{o}/e.raw"],
        ["export", "{raw}", f"{o}/e", "--format", "png"],
        ["preview", "{pred}", "-o", f"{o}/v.png", "--slices", "0"],
        ["preview", "{pred}", "-o", f"{o}/v.png", "--size", "1"],
        ["train", "--raw", "{raw}", "--labels", "{seg}", "-o", f"{o}/ck", "--patch-shape", "4096,4096"],
        ["train", "--raw", "{raw}", "--labels", "{seg}", "-o", f"{o}/ck", "--base-channels", "4096", "--depth", "6"],
        ["train", "--raw", "{raw}", "--labels", "{seg}", "-o", f"{o}/ck", "--patch-shape", "0,0"],
        ["train", "--raw", "{raw}", "--labels", "{seg}", "-o", f"{o}/ck", "--steps", "0"],
        ["train", "--raw", "{raw}", "--labels", "{seg}", "-o", f"{o}/ck", "--lr", "-1"],
        ["train", "--raw", "{raw}", "--labels", "{seg}", "-o", f"{o}/ck", "--batch-size", "0"],
        ["train", "--raw", "{raw}", "--labels", "{seg}", "-o", f"{o}/ck", "--depth", "0"],
        ["train", "--raw", "{raw}", "--labels", "{seg}", "-o", f"{o}/ck", "--model", "resnet9000"],
        ["train", "--raw", "{raw}", "--labels", "{seg}", "-o", f"{o}/ck", "--ndim", "4"],
    ]
    return probes


def file_probes(o: Path) -> list[list[str]]:
    """Bad files where a config, profile, recipe or checkpoint goes."""
    probes: list[list[str]] = []
    for name in ("binary_toml", "binary_yaml", "binary_json", "text", "garbage", "missing", "emptydir"):
        probes += [
            ["train", "--config", "{%s}" % name],
            ["segment", "{raw}", "-o", f"{o}/s.zarr", "--pipeline", "{%s}" % name],
            ["predict", "{raw}", "-o", f"{o}/p.zarr", "--cluster", "{%s}" % name],
            ["label", "{pred}", "-o", f"{o}/l.zarr", "--cluster", "{%s}" % name],
        ]
    for name in ("ckpt_pickle", "ckpt_huge", "ckpt_binary", "emptydir", "text", "garbage", "missing", "raw"):
        probes += [["predict", "{raw}", "-o", f"{o}/p.zarr", "--model", "{%s}" % name],
                   ["segment", "{raw}", "-o", f"{o}/s.zarr", "--model", "{%s}" % name]]
    probes += [
        ["segment", "{raw}", "-o", f"{o}/s.zarr", "--pipeline", "{bad_voxel_toml}"],
        ["predict", "{raw}", "-o", f"{o}/p.zarr", "--cluster", "{bad_profile}"],
        ["import", "{complex_tif}", f"{o}/c.zarr"],
        ["import", "{tif4d}", f"{o}/4d.zarr"],
        ["predict", "{nanpred}", "-o", f"{o}/p.zarr"],  # float input, wrong channel count for the model
        ["info", "{missing_level}"],  # level 0 is there, but the image lists a level that is not
        ["export", "{missing_level}", f"{o}/m.tif", "--level", "1"],
        ["import", "{ragged_tif}", f"{o}/r.zarr"],
        ["import", "{trunc_tif}", f"{o}/t.zarr"],
        ["import", "{empty_h5}", f"{o}/h.zarr"],
        ["label", "{pred}", "-o", f"{o}/l.zarr", "--cluster", "{bad_interface}"],
        ["label", "{pred}", "-o", f"{o}/l.zarr", "--cluster", "{tiny_memory}"],
        ["segment", "{raw}", "-o", f"{o}/s.zarr", "--workers", "100000"],  # would hang starting the workers
        ["label", "{pred}", "-o", f"{o}/l.zarr", "--scheduler", "not a url"],
        ["label", "{pred}", "-o", f"{o}/l.zarr", "--scheduler", "tcp://host-without-port"],
        ["preview", "{pred}", "-o", f"{o}/v.png", "--raw", "{big}"],  # a raw of another shape
        ["agglomerate", "{raw}", "--no-progress"],  # raw EM is no prediction: nothing may be written into it
        ["agglomerate", "{seg}", "--no-progress"],
    ]
    return probes


def output_probes(o: Path) -> list[list[str]]:
    """Forbidden outputs: inside or equal to an input, a recorded source, somebody's folder or file."""
    probes = [
        ["import", "{tif}", "{raw}/sub.zarr"],
        ["import", "{tif}", "{tif}"],
        ["export", "{raw}", "{raw}/x.tif"],
        ["export", "{raw}", "{raw}", "--format", "precomputed"],
        ["predict", "{raw}", "-o", "{raw}/p.zarr"],
        ["predict", "{raw}", "-o", "{raw}"],
        ["label", "{pred}", "-o", "{pred}/0"],
        ["label", "{pred}", "-o", "{raw}"],  # the raw image the prediction was made from
        ["label", "{pred}", "-o", "{raw}", "--overwrite"],
        ["segment", "{raw}", "-o", "{raw}"],
        ["preview", "{pred}", "-o", "{raw}/zarr.json"],
        ["preview", "{pred}", "-o", "{pred}/zarr.json"],
        ["preview", "{pred}", "-o", "{raw}/zarr.json", "--overwrite"],
        ["preview", "{pred}", "-o", "{foreign_file}"],
        ["preview", "{pred}", "-o", "{foreign_file}", "--overwrite"],
        ["preview", "{pred}", "-o", "{text}"],
        ["export", "{raw}", "{text}", "--format", "tiff", "--overwrite"],
        ["train", "--raw", "{raw}", "--labels", "{seg}", "-o", "{root}", "--overwrite"],  # holds the data
        ["train", "--raw", "{raw}", "--labels", "{seg}", "-o", "{raw}/ck"],
        ["evaluate", "{seg}", "{gt}", "--plot", "{seg}/zarr.json"],
        ["evaluate", "{seg}", "{gt}", "--plot", "{foreign_file}"],
    ]
    for command in (["import", "{tif}", "{T}"], ["synth", "{T}", "--shape", "8,16,16"],
                    ["export", "{raw}", "{T}", "--format", "precomputed"], ["predict", "{raw}", "-o", "{T}"],
                    ["label", "{pred}", "-o", "{T}"], ["train", "--raw", "{raw}", "--labels", "{seg}", "-o", "{T}"]):
        for target, flags in itertools.product(("{foreign}", "{text}", "{link_foreign}", "{foreign_zarr}"),
                                               ([], ["--overwrite"])):
            probes.append([a.replace("{T}", target) for a in command] + flags)
    # an output whose parent is a file
    for command in (["import", "{tif}", "{text}/x.zarr"], ["synth", "{text}/x.zarr", "--shape", "8,16,16"],
                    ["export", "{raw}", "{text}/x.tif"], ["predict", "{raw}", "-o", "{text}/p.zarr"],
                    ["label", "{pred}", "-o", "{text}/l.zarr"], ["preview", "{pred}", "-o", "{text}/v.png"],
                    ["train", "--raw", "{raw}", "--labels", "{seg}", "-o", "{text}/ck", "--steps", "1"]):
        probes.append(command)
    return probes


WRITERS = {  # every command that writes, with its output at {T}
    "import": ["import", "{tif}", "{T}/i.zarr", "--no-progress"],
    "export-tiff": ["export", "{raw}", "{T}/e.tif", "--no-progress"],
    "export-precomputed": ["export", "{raw}", "{T}/pc", "--format", "precomputed", "--no-progress"],
    "synth": ["synth", "{T}/s.zarr", "--shape", "8,16,16", "--no-progress"],
    "predict": ["predict", "{raw}", "-o", "{T}/p.zarr", "--no-progress"],
    "label": ["label", "{pred}", "-o", "{T}/l.zarr", "--no-progress"],
    "segment": ["segment", "{raw}", "-o", "{T}/s.zarr", "--no-progress"],
    "train": ["train", "--raw", "{raw}", "--labels", "{seg}", "-o", "{T}/ck", "--steps", "1", "--patch-shape", "92,92"],
    "preview": ["preview", "{pred}", "-o", "{T}/v.png"],
}


def all_probes(o: Path) -> list[list[str]]:
    probes: list[list[str]] = []
    for name, template in volume_commands(o).items():
        command = name.split("-")[0]
        for bad in BAD_VOLUMES:
            if bad in NOT_BAD_FOR.get(command, ()) or bad in NOT_PROBED.get(command, ()):
                continue
            if command == "import" and bad in ("incomplete", "empty", "flat", "group", "corrupt", "badmeta",
                                               "codec", "bad_scale"):
                continue  # zarr stores are not import sources: covered by "foreign" folder cases
            probes.append([a.replace("{V}", "{%s}" % bad) for a in template])
    return probes + number_probes(o) + file_probes(o) + output_probes(o)


def tree_state(root: Path) -> dict[str, tuple[int, ...]]:
    """Every file below ``root`` (the files :func:`tree_digest` reads) with its size, inode and modification
    and change times in ns.

    A write or truncation of a file sets its ctime, which no call can set back; a file created, deleted or
    replaced changes the keys or the inode.  About 1/5 of the time of hashing the 20 MB of inputs, so it is
    taken after every probe; the byte-level :func:`tree_digest` is compared once all probes have run.
    """
    state: dict[str, tuple[int, ...]] = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except OSError:  # a symlink loop: no file to read (tree_digest skips it too)
                continue
            if stat.S_ISREG(st.st_mode):
                state[os.path.relpath(path, root)] = (st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
    return state


def check(result, argv: list[str]) -> str | None:
    """Why ``result`` breaks the contract, or None."""
    if result.exit_code == 0:
        return f"exit 0: {result.output[-300:]}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return f"traceback: {type(result.exception).__name__}: {result.exception}"
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    if len(errors) != 1:
        return f"{len(errors)} Error lines: {result.stderr[-500:]!r}"
    if "Traceback" in result.output:
        return f"traceback in output: {result.output[-500:]}"
    if "rerun the same command" in errors[0].lower():  # bad input: the same command cannot succeed
        return f"advises a rerun for bad input: {errors[0]}"
    return None


def test_probe_bad_inputs(inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    root = inputs["raw"].parent
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    names = {k: str(v) for k, v in inputs.items()} | {"root": str(root)}
    before = tree_digest(root)
    state = tree_state(root)
    probes = all_probes(out)
    failures: list[str] = []
    runner = CliRunner()
    slow: list[tuple[float, str]] = []

    def too_slow(signum: int, frame: object) -> None:
        raise TimeoutError("probe still running after 30 s: it was not refused up front")

    previous = signal.signal(signal.SIGALRM, too_slow)
    for argv in probes:
        args = [a.format(**names) if "{" in a else a for a in argv]
        start = time.perf_counter()
        signal.alarm(30)
        try:
            result = runner.invoke(cli, args)
        finally:
            signal.alarm(0)
        slow.append((time.perf_counter() - start, " ".join(args)))
        why = check(result, args)
        if why is not None:
            failures.append(f"emseg {' '.join(args)}\n    -> {why}")
        if tree_state(root) != state:
            failures.append(f"emseg {' '.join(args)}\n    -> modified the inputs")
            break
    signal.signal(signal.SIGALRM, previous)
    with capsys.disabled():
        print(f"\nprobe: {len(probes)} bad inputs, {len(probes) - len(failures)} handled; slowest: "
              + "; ".join(f"{t:.1f} s {a[:80]}" for t, a in sorted(slow, reverse=True)[:3]))
    assert len(probes) >= 200
    assert not failures, f"{len(failures)} of {len(probes)} probes broke the contract:\n" + "\n".join(failures)
    assert tree_digest(root) == before, "the inputs were modified"  # byte for byte, once every probe has run


def test_probe_unwritable_output(inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every writing command on a read-only folder: one Error line naming the path, nothing written."""
    names = {k: str(v) for k, v in inputs.items()}
    monkeypatch.chdir(tmp_path)
    with read_only_dir(tmp_path / "ro") as target:
        if target is None:
            pytest.skip("cannot bind-mount a read-only folder here (needs root and mount)")
        failures = []
        for name, template in WRITERS.items():
            args = [a.replace("{T}", str(target)).format(**names) if "{" in a else a for a in template]
            result = CliRunner().invoke(cli, args)
            why = check(result, args)
            if why is None and str(target) not in result.stderr:
                why = f"message does not name the path: {result.stderr!r}"
            if why:
                failures.append(f"{name}: {why}")
        assert not failures, "\n".join(failures)
        assert list(target.iterdir()) == []
