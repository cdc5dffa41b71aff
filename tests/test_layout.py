"""The layout: no alias modules, no submodule named like an API function, every module path the README
names resolves, and tests/ mirrors the package."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
API_FUNCTIONS = ("predict", "label", "segment", "agglomerate")


def _modules() -> list[str]:
    names = []
    for path in sorted((ROOT / "emseg").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_no_module_is_an_alias() -> None:
    for path in (ROOT / "emseg").rglob("*.py"):
        first = path.read_text().lstrip('"\n').split("\n", 1)[0]
        assert not first.lower().startswith(("moved", "former home")), path
        assert "sys.modules[__name__] =" not in path.read_text(), path


@pytest.mark.parametrize("name", API_FUNCTIONS)
def test_api_functions_share_no_name_with_a_submodule(name: str) -> None:
    assert f"emseg.{name}" not in _modules()
    assert not (ROOT / "emseg" / f"{name}.py").exists() and not (ROOT / "emseg" / name).exists()


def test_importing_every_module_keeps_the_api_functions() -> None:
    code = ("import importlib, emseg, emseg.api as api\n"
            f"for name in {_modules()!r}: importlib.import_module(name)\n"
            "assert (emseg.predict, emseg.label, emseg.agglomerate, emseg.segment) == "
            "(api.predict, api.label, api.agglomerate, api.segment)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr


def _resolve(dotted: str) -> object:
    """The module or attribute ``dotted`` names (the longest importable module, then attributes)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            value = getattr(value, attribute)
        return value
    raise ModuleNotFoundError(dotted)


def test_every_module_path_in_the_readme_resolves() -> None:
    names = set(re.findall(r"(?<![\w./-])emseg(?:\.[A-Za-z_]\w*)+", (ROOT / "README.md").read_text()))
    assert names
    for name in sorted(names):
        _resolve(name)


def test_tests_mirror_the_package() -> None:
    modules = set(_modules())
    for folder in sorted(p for p in (ROOT / "tests").iterdir() if p.is_dir() and p.name != "__pycache__"):
        assert f"emseg.{folder.name}" in modules, f"tests/{folder.name} names no emseg module"
