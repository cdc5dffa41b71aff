"""RunOptions: the run keywords (cluster, scheduler, workers, devices, overwrite, progress, client) declared once."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

import emseg
from emseg.cli import cli
from emseg.config import RunOptions
from emseg.errors import ConfigError


def test_take_removes_the_run_keywords_and_keeps_the_client() -> None:
    client = object()
    fields = {"overwrite": True, "workers": 2, "batch_size": 4, "progress": None}
    run = RunOptions.take(RunOptions(client=client, progress=False), fields)
    assert fields == {"batch_size": 4}  # the stage's own options stay
    assert (run.overwrite, run.workers, run.progress, run.client is client) == (True, 2, False, True)
    assert run.where == {"cluster": None, "scheduler": None, "workers": 2, "devices": None, "client": client}
    with pytest.raises(ConfigError, match="--workers must be at least 1, got 0"):
        RunOptions.build(workers=0)


def test_the_flags_are_the_fields() -> None:
    runner = CliRunner()
    for command in ("predict", "label", "agglomerate", "segment"):
        text = " ".join(runner.invoke(cli, [command, "--help"]).output.split())
        for name in ("cluster", "scheduler", "workers", "overwrite"):
            doc = " ".join((RunOptions.model_fields[name].description or "").split())
            assert f"--{name}" in text and doc[:40] in text, (command, name)
        assert "--progress / --no-progress" in text
        assert ("--devices" in text) == (command in ("predict", "segment"))
    bad = runner.invoke(cli, ["label", ".", "-o", "x.zarr", "--workers", "0"])
    assert bad.exit_code == 2 and "--workers" in bad.output


def test_keywords_and_the_model_run_the_same() -> None:
    mask = np.zeros((4, 16, 16), np.uint8)
    mask[:, 2:6, 2:6] = mask[:, 9:14, 9:14] = 1
    by_keyword = emseg.label(mask, method="cc", foreground="nonzero", workers=1, progress=False)
    by_model = emseg.label(mask, method="cc", foreground="nonzero", run=RunOptions(workers=1, progress=False))
    np.testing.assert_array_equal(by_keyword, by_model)
    assert by_keyword.max() == 2
    with pytest.raises(ConfigError, match="unknown option 'wokers'"):
        emseg.label(mask, wokers=1)
