"""A checkpoint named with --model is checked before emseg segment starts a cluster or writes anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_a_bad_model_is_refused_before_any_cluster_starts(make_volume, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    volume = make_volume()
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"\x80\x04not a safetensors file")
    out = tmp_path / "seg.zarr"
    done = subprocess.run([sys.executable, "-c", "from emseg.cli import main; main()", "-v", "segment", str(volume),
                           "-o", str(out), "--model", str(bad), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and str(bad) in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "local cluster" not in done.stderr, "a cluster was started for a checkpoint that cannot load"
    assert not out.exists()
