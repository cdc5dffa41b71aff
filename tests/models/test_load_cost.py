"""Loading a checkpoint, as every Dask worker does before its first block, stays cheap."""

from __future__ import annotations

import subprocess
import sys

from emseg.workflows.predict import BUNDLED


def test_loading_a_checkpoint_does_not_import_torchs_compiler() -> None:
    """The size check builds the model on the meta device; initialising meta weights would import
    torch._dynamo (seconds per process)."""
    code = ("import sys; from emseg.models import load_checkpoint; "
            f"load_checkpoint({str(BUNDLED)!r}); "
            "print('torch._dynamo' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "False"
