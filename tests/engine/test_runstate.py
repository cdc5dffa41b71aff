"""emseg.engine.runstate: the one place that decides create / resume / refuse / replace for an output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from emseg.engine.ledger import Ledger
from emseg.engine.runstate import OutputClaim, Scratch, claim_stage, fingerprint_of
from emseg.engine.scratch import scratch_path
from emseg.errors import OutputExistsError, ResumeMismatchError
from emseg.io import create_volume, open_volume, read_status


def _claim(path: Path, params: dict[str, Any], *, overwrite: bool = False, **kw: Any) -> OutputClaim:
    def create(record: dict[str, Any]) -> None:
        create_volume(path, shape=(4, 8, 8), dtype=np.uint64, chunks=(4, 8, 8), voxel_size=(1, 1, 1),
                      overwrite=overwrite, extra_attrs=record)

    return OutputClaim(path, params, kind="thing", what="things", create=create, key="thing", overwrite=overwrite,
                       **kw)


def test_create_resume_refuse_replace(tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    first = _claim(out, {"k": 1}, scratch=[Scratch.of("s", (4, 8, 8), np.uint32, (4, 8, 8))])
    assert first.check() is False and not out.exists()  # check touches nothing
    first.ensure()
    assert first.started_over and scratch_path(out, "s").is_dir()
    status = read_status(out)
    assert status["status"] == "incomplete" and status["thing"] == {"fingerprint": fingerprint_of({"k": 1}),
                                                                    "params": {"k": 1}}
    volume = open_volume(out, allow_incomplete=True, mode="r+")
    volume.write(volume.roi, np.full((4, 8, 8), 7, np.uint64))
    again = _claim(out, {"k": 1})
    assert again.check() is True
    again.ensure()
    assert not again.started_over and int(open_volume(out, allow_incomplete=True).array[0, 0, 0]) == 7  # kept
    again.complete(n=3)
    assert read_status(out)["status"] == "complete" and read_status(out)["thing"]["n"] == 3
    assert not scratch_path(out, "s").exists()
    with pytest.raises(ResumeMismatchError, match=r"holds things made with other parameters \(differs in: k\)"):
        _claim(out, {"k": 2}).check()
    replaced = _claim(out, {"k": 2}, overwrite=True)
    replaced.ensure()
    assert replaced.started_over and int(open_volume(out, allow_incomplete=True).array[0, 0, 0]) == 0


def test_foreign_and_other_kinds_are_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "thesis"
    theirs.mkdir()
    (theirs / "chapter.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="is not an emseg thing; it was not made by emseg"):
        _claim(theirs, {}).check()
    with pytest.raises(OutputExistsError, match="already exists; it was not made by emseg"):
        _claim(theirs, {}, overwrite=True).ensure()  # the create callback removes only emseg's outputs
    assert (theirs / "chapter.txt").read_text() == "mine"
    raw = tmp_path / "raw.zarr"
    create_volume(raw, shape=(4, 8, 8), dtype=np.uint8, chunks=(4, 8, 8), voxel_size=(1, 1, 1))
    for overwrite in (False, True):  # an emseg image of another kind is never replaced
        with pytest.raises(OutputExistsError, match=r"but another emseg image \(an input\); choose another"):
            _claim(raw, {}, overwrite=overwrite, others="an input").check()
    with pytest.raises(OutputExistsError, match="is not an emseg thing; pass --overwrite"):
        _claim(raw, {}).check()  # without ``others``: replaceable with --overwrite


def test_a_record_within_an_image_resumes_even_with_overwrite(tmp_path: Path) -> None:
    image = tmp_path / "img.zarr"
    create_volume(image, shape=(4, 8, 8), dtype=np.uint8, chunks=(4, 8, 8), voxel_size=(1, 1, 1))
    cleared: list[dict[str, Any]] = []

    def claim(params: dict[str, Any], overwrite: bool = False) -> OutputClaim:
        return OutputClaim(image, params, kind="graph", what="a graph", key="graph", create=cleared.append,
                           within=True, overwrite=overwrite)

    claim({"a": 1}).ensure()
    assert len(cleared) == 1 and read_status(image)["graph"]["status"] == "incomplete"
    assert claim({"a": 1}, overwrite=True).check() is True
    with pytest.raises(ResumeMismatchError, match="a graph made with other parameters"):
        claim({"a": 2}).ensure()
    other = claim({"a": 2}, overwrite=True)
    other.ensure()
    other.complete(edges=5)
    assert len(cleared) == 2 and read_status(image)["graph"] == {
        "fingerprint": fingerprint_of({"a": 2}), "params": {"a": 2}, "status": "complete", "edges": 5}
    assert read_status(image)["status"] == "incomplete"  # the image's own status is not this record's


def test_stage_records_are_kept_or_started_over(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "o.zarr", "stage")
    claim_stage(ledger, 4, "aaa", {"x": 1}, overwrite=False)
    ledger.open("r+")[1] = '{"r": 1}'
    claim_stage(ledger, 4, "aaa", {"x": 1}, overwrite=False)
    assert ledger.done() == {1: 1}
    with pytest.raises(ResumeMismatchError, match=r"an earlier stage run made with other parameters \(differs in: x\)"):
        claim_stage(ledger, 4, "bbb", {"x": 2}, overwrite=False)
    claim_stage(ledger, 4, "bbb", {"x": 2}, overwrite=True)
    assert ledger.done() == {} and ledger.attrs()["fingerprint"] == "bbb"
