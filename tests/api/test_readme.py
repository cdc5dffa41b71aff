"""The README's Python API example runs as a doctest (numpy and dask inputs, a real ISBI crop)."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "isbi2012" / "test-volume.tif"


def _api_section() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```pycon\n(.*?)```", section, flags=re.S)
    assert blocks, "README: no ```pycon example in the Python API section"
    return "\n".join(blocks)


@pytest.mark.skipif(not DATA.exists(), reason=f"{DATA} not found (../shared/data)")
def test_readme_api_example(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(REPO)  # the example's paths are relative to the repository, as the README says
    example = _api_section()
    assert "da.from_array" in example and "emseg.predict(raw" in example  # numpy and dask inputs
    test = doctest.DocTestParser().get_doctest(example, {}, "README.md: Python API", str(REPO / "README.md"), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    failures = []
    runner.run(test, out=failures.append)
    assert runner.failures == 0 and runner.tries >= 8, "".join(failures)
