"""Static checks: ruff lints emseg/, tests/ and benchmarks/, mypy type-checks emseg/ (issue 12).

Both read their settings (rule set, per-file and per-module exceptions, each with its reason) from
pyproject.toml, and run with the interpreter running the tests, so `.venv/bin/pytest` (the README's
test command, run by `.ci/run`) runs them.  A failure shows the tool's own report.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          check=False)


def test_ruff_finds_nothing() -> None:
    out = _run("ruff", "check", "--no-cache", "emseg", "tests", "benchmarks")
    assert out.returncode == 0, f"ruff check failed:\n{out.stdout}{out.stderr}"


def test_mypy_finds_nothing() -> None:
    out = _run("mypy")  # files, plugins and exceptions: [tool.mypy] in pyproject.toml
    assert out.returncode == 0, f"mypy failed:\n{out.stdout}{out.stderr}"
    assert "Success: no issues found" in out.stdout, out.stdout
