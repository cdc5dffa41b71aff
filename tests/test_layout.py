"""The orchestration lives in emseg/workflows/; the old module paths are the same module objects."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest


@pytest.mark.parametrize(("old", "new"), [("emseg.predict", "emseg.workflows.predict"),
                                          ("emseg.label", "emseg.workflows.label"),
                                          ("emseg.agglomerate", "emseg.workflows.agglomerate"),
                                          ("emseg.pipeline", "emseg.workflows.segment"),
                                          ("emseg.evaluate", "emseg.workflows.evaluate"),
                                          ("emseg.stitch", "emseg.segment.stitch")])
def test_old_module_paths_are_the_moved_modules(old: str, new: str) -> None:
    assert importlib.import_module(old) is importlib.import_module(new)
    assert sys.modules[old] is sys.modules[new]


def test_importing_the_old_paths_keeps_the_api_functions() -> None:
    code = ("import emseg, emseg.predict, emseg.label, emseg.agglomerate, emseg.pipeline, emseg.segment.stitch\n"
            "from emseg.label import label\n"
            "import emseg.api as api\n"
            "assert (emseg.predict, emseg.label, emseg.agglomerate, emseg.segment) == "
            "(api.predict, api.label, api.agglomerate, api.segment)\n"
            "assert label is sys.modules['emseg.workflows.label'].label\n")
    out = subprocess.run([sys.executable, "-c", "import sys\n" + code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
