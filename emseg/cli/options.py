"""Click options derived from the option models of :mod:`emseg.config`, and the run options every
blockwise command shares.

A stage's flags are generated from its model's fields (name, type, default, doc), so an option is
declared once: ``PredictOptions.batch_size`` becomes ``--batch-size`` with an ``IntRange(min=1)``
type and the field's doc as help.  Flags default to ``None`` ("not given"): the command passes only
the given values on, and the model (or the recipe) supplies the defaults.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, Literal, TypeVar

import annotated_types
import click
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from emseg.cli.output import JSON_OPTION, PROGRESS_OPTION
from emseg.cli.types import FLOAT_ZYX, INDEX_LIST, INT_ZYX, ZYX
from emseg.config import RunOptions

F = TypeVar("F", bound=Callable[..., Any])

FLOATS = ZYX(float, minimum=float("-inf"), name="T,T,...")
MARGIN_ZYX = ZYX(int, minimum=0, axes=3)


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """(the type without ``| None`` and ``Annotated``, the constraints found on the way)."""
    metadata: list[Any] = []
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            metadata.extend(annotation.__metadata__)
            annotation = annotation.__origin__
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation, metadata
            annotation = args[0]
        else:
            return annotation, metadata


def _bounds(metadata: Iterable[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in metadata:
        for item in getattr(m, "metadata", [m]):  # a FieldInfo inside Annotated carries its own list
            if isinstance(item, annotated_types.Ge):
                out["min"] = item.ge
            elif isinstance(item, annotated_types.Gt):
                out.update(min=item.gt, min_open=True)
            elif isinstance(item, annotated_types.Le):
                out["max"] = item.le
            elif isinstance(item, annotated_types.Lt):
                out.update(max=item.lt, max_open=True)
    return out


def _click_type(field: FieldInfo) -> tuple[Any, bool, Callable[[Any], Any] | None]:
    """(click type, is a flag, conversion of the parsed value) for a model field."""
    annotation, metadata = _unwrap(field.annotation)
    metadata = [*metadata, *field.metadata]
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return None, True, None
    if origin is Literal:
        values = typing.get_args(annotation)
        if all(isinstance(v, int) for v in values):
            return click.Choice([str(v) for v in values]), False, int
        return click.Choice(list(values)), False, None
    if origin is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return FLOATS, False, None
        _, inner = _unwrap(args[0])
        return (MARGIN_ZYX if _bounds(inner).get("min") == 0 else INT_ZYX), False, None
    bounds = _bounds(metadata)
    if annotation is int:
        return (click.IntRange(**bounds) if bounds else int), False, None
    if annotation is float:
        return (click.FloatRange(**bounds) if bounds else float), False, None
    return click.Path() if annotation is str else str, False, None


def field_option(model: type[BaseModel], name: str, *decls: str, dest: str | None = None,
                 help: str | None = None, show_default: bool = True, type: Any = None, default: Any = None,
                 **extra: Any) -> Callable[[F], F]:
    """One click option for ``model``'s field ``name`` (flag ``--name-with-dashes`` unless ``decls``).

    Its help is the field's doc (or ``help``) and the field's default, unless ``show_default`` is false.
    ``type`` replaces the click type derived from the field's annotation; ``default`` is the flag's
    value when not given (None: "not given", the model or recipe decides).
    """
    field = model.model_fields[name]
    kind, is_flag, convert = _click_type(field)
    kind = type if type is not None else kind
    text = help if help is not None else field_doc(model, name)
    if show_default and field.default is not None and field.default is not False and field.default != ():
        text += f"  [default: {','.join(map(str, field.default)) if isinstance(field.default, tuple) else field.default}]"
    dashed = name.replace("_", "-")
    # a boolean field is an on/off pair, so that a flag can also turn off what a recipe turned on
    flag = decls or ((f"--{dashed}/--no-{dashed}",) if is_flag else (f"--{dashed}",))
    callback = None
    if convert is not None:
        def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
            return None if value is None else convert(value)
    kwargs: dict[str, Any] = dict(default=default, help=text, callback=callback, **extra)
    if is_flag:
        kwargs["is_flag"] = True
    else:
        kwargs["type"] = kind
    return click.option(*flag, dest or name, **kwargs)


def field_doc(model: type[BaseModel], name: str) -> str:
    """The doc of ``model``'s field ``name`` as one line of help text."""
    return " ".join((model.model_fields[name].description or "").replace("``", "").split())


def option_flags(model: type[BaseModel], *, exclude: Iterable[str] = (), **renames: tuple[str, ...]) -> Callable[[F], F]:
    """Every field of ``model`` as a click option (in field order), except ``exclude``.

    ``renames`` maps a field to other flag declarations, e.g. ``model=("--model",)``.
    """
    skip = set(exclude)
    decorators = [field_option(model, name, *renames.get(name, ())) for name in model.model_fields if name not in skip]

    def apply(f: F) -> F:
        for decorate in reversed(decorators):
            f = decorate(f)
        return f

    return apply


def pop_fields(values: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """Remove ``model``'s fields from a command's keyword arguments; return those given (not None)."""
    popped = {k: values.pop(k) for k in list(values) if k in model.model_fields}
    return {k: v for k, v in popped.items() if v is not None}


# ---------------------------------------------------------------------------------------------
# the run options every blockwise command shares


def _stack(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    def apply(f: F) -> F:
        for decorate in reversed(decorators):
            f = decorate(f)
        return f

    return apply


def cluster_options(*, devices: bool = True, applies_to: str | None = None,
                    cluster_default: str | None = None) -> Callable[[F], F]:
    """``--cluster``, ``--scheduler``, ``--workers`` (and ``--devices``): where the blocks run
    (:class:`~emseg.config.RunOptions`).

    ``applies_to`` prefixes each help (``"precomputed"`` for a command whose other modes run in this
    process); ``cluster_default`` replaces the ``--cluster`` default the help states.
    """
    def text(name: str, default: str | None = None) -> str:
        doc = field_doc(RunOptions, name)
        if default is not None:
            doc = doc.split(" [default:")[0] + f"  [default: {default}]."
        return f"{applies_to}: {doc[0].lower()}{doc[1:]}" if applies_to else doc

    options = [
        field_option(RunOptions, "cluster", type=str, show_default=False, help=text("cluster", cluster_default)),
        field_option(RunOptions, "scheduler", metavar="ADDRESS", show_default=False, help=text("scheduler")),
        field_option(RunOptions, "workers", show_default=False, help=text("workers")),
    ]
    if devices:
        options.append(field_option(RunOptions, "devices", type=INDEX_LIST, metavar="0,1,...", show_default=False,
                                    help=text("devices")))
    return _stack(*options)


def overwrite_option(help: str | None = None) -> Callable[[F], F]:
    """``--overwrite`` (:attr:`~emseg.config.RunOptions.overwrite`, default off) for every command that writes.

    ``help`` says what it replaces where that is one file rather than a run's output (a PNG, a plot).
    """
    return field_option(RunOptions, "overwrite", "--overwrite", default=False, show_default=False, help=help)


def zarr_format_option(default: Literal[2, 3] | None = None, *, default_text: str | None = None) -> Callable[[F], F]:
    """``--zarr-format 2|3``, given to the command as an int (or None, "not given", with no ``default``).

    ``default_text`` states the default in the help where it is not a number (``"the input's"``).
    """
    shown = default_text if default_text is not None else str(default)
    return click.option(  # type: ignore[return-value]
        "--zarr-format", type=click.Choice(["2", "3"]), default=None if default is None else str(default),
        callback=_int_or_none, help=f"Zarr format of the output: 3 = OME-NGFF 0.5, 2 = OME-NGFF 0.4  [default: {shown}].")


def mode_option(help: str) -> Callable[[F], F]:
    """``--2d/--3d``, given to the command as ``mode``: ``"2d"``, ``"3d"`` or None (not given: the
    command's default, e.g. chosen from the voxel size).  ``help`` says what the two mean for the command."""
    return click.option("--2d/--3d", "mode", default=None, callback=_mode, help=help)  # type: ignore[return-value]


def _mode(ctx: click.Context, param: click.Parameter, value: bool | None) -> Literal["2d", "3d"] | None:
    return None if value is None else ("2d" if value else "3d")


def output_options(*, zarr_format: str | None = "the input's", dry_run: bool = False) -> Callable[[F], F]:
    """``--zarr-format``, ``--overwrite``, (``--dry-run``), ``--progress/--no-progress``, ``--json``.

    ``zarr_format`` is the default the help states (None: no ``--zarr-format``).  ``--overwrite`` and
    ``--progress`` are :class:`~emseg.config.RunOptions` fields, with its defaults.
    """
    options = []
    if zarr_format is not None:
        options.append(zarr_format_option(default_text=zarr_format))
    options.append(overwrite_option())
    if dry_run:
        options.append(click.option("--dry-run", is_flag=True, help="Print the plan (blocks, halo, voxels, memory) "
                                                                     "and exit."))
    options += [
        PROGRESS_OPTION,
        JSON_OPTION,
    ]
    return _stack(*options)


def _int_or_none(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    return None if value is None else int(value)


def voxel_size_option() -> Callable[[F], F]:
    """``--voxel-size Z,Y,X`` (nm): replaces the voxel size an input volume's metadata gives."""
    return click.option("--voxel-size", type=FLOAT_ZYX, default=None,
                        help="Voxel size of the input in nm, z,y,x, replacing what its metadata says (e.g. a "
                             "zarr without any, read as 1,1,1).")  # type: ignore[return-value]
