"""``--json`` for every command: a report (dataclass, NamedTuple, dict) as one JSON object on stdout."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import click

MAX_ARRAY = 1000  # larger arrays are described, not listed
_SKIP = object()  # a value with no JSON form (an internal table): its field is left out


def to_jsonable(obj: Any) -> Any:
    """Plain JSON values for a report: fields by name, paths as strings, NaN as null."""
    value = _convert(obj)
    return None if value is _SKIP else value


def _fields(items: Any) -> dict[str, Any]:
    out = {str(k): _convert(v) for k, v in items}
    return {k: v for k, v in out.items() if v is not _SKIP}


def _convert(obj: Any) -> Any:
    import numpy as np

    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.generic):
        return _convert(obj.item())
    if isinstance(obj, np.ndarray):
        if obj.size > MAX_ARRAY:
            return {"shape": list(obj.shape), "dtype": str(obj.dtype)}
        return _convert(obj.tolist())
    to_json = getattr(obj, "to_json", None)
    if callable(to_json):
        value = to_json()
        return json.loads(value) if isinstance(value, str) else _convert(value)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _fields((f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, tuple) and hasattr(obj, "_asdict"):
        return _fields(obj._asdict().items())
    if isinstance(obj, dict):
        return _fields(obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [v for v in (_convert(v) for v in obj) if v is not _SKIP]
    return _SKIP


def echo_report(report: Any, as_json: bool, **extra: Any) -> None:
    """``report.summary()`` on stdout, or with ``--json`` the report (plus ``extra``) as one JSON line."""
    if as_json:
        data = to_jsonable(report)
        if not isinstance(data, dict):
            data = {"result": data}
        data.update({k: to_jsonable(v) for k, v in extra.items()})
        click.echo(json.dumps(data))
    else:
        click.echo(report.summary() if hasattr(report, "summary") else str(report))


def json_option(help: str = "Print the result as one JSON object on stdout.") -> Any:
    """``--json`` (given to the command as ``as_json``); ``help`` says what it prints where that is not
    the command's report."""
    return click.option("--json", "as_json", is_flag=True, help=help)


JSON_OPTION = json_option()
"""The ``--json`` of every command that prints its report."""


def _progress_default(ctx: click.Context, param: click.Parameter, value: bool | None) -> bool:
    """Progress bars when asked, else only when stderr is a terminal (no ``\r`` lines in logs)."""
    if value is not None:
        return value
    import sys

    return bool(sys.stderr.isatty())


PROGRESS_OPTION = click.option(
    "--progress/--no-progress", default=None, callback=_progress_default,
    help="Progress bars on stderr  [default: only when stderr is a terminal].")
"""The one progress flag of every command that shows progress bars."""
