"""Static checks: ruff lints emseg/, tests/ and benchmarks/, mypy type-checks emseg/, and no two emseg
modules import each other, directly or round a longer loop.

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


def _emseg_imports() -> dict[str, set[str]]:
    """Module -> the emseg modules it imports (at the top or inside functions), from the source."""
    import ast

    modules = {}
    for path in (ROOT / "emseg").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "emseg":
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    edges.add(full if full in modules else resolve(node.module or ""))
            elif isinstance(node, ast.Import):
                edges.update(resolve(a.name) for a in node.names if a.name.split(".")[0] == "emseg")
        graph[name] = edges - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle() -> None:
    # function-level (lazy) imports count too: a lazy import both ways is still two modules knowing each other
    graph = _emseg_imports()
    assert "emseg.cluster.slurm" in graph["emseg.cluster.client"]  # the graph holds the package's modules
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check can see one
    assert _cycles(graph) == []


def test_the_sbatch_template_is_package_data() -> None:
    # emseg train --cluster renders it from the installed package (a wheel has no repo cluster/ folder)
    import fnmatch
    import tomllib

    from emseg.cluster.slurm import default_template, render_training_script

    template = default_template()
    assert template.is_file() and str(template).endswith("emseg/cluster/templates/train.sbatch")
    shipped = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["emseg"]
    assert any(fnmatch.fnmatch("cluster/templates/train.sbatch", pattern) for pattern in shipped), shipped
    script = render_training_script(["--config", "c.toml"], nodes=2, gpus_per_node=4)
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gres=gpu:4" in script and "@{" not in script
