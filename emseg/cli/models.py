"""``emseg models``: the registered architectures with their size and geometry."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import click

from emseg.cli.output import json_option
from emseg.cli.types import SIZES

# (row label, registry name, build kwargs); the rest of each model's options take their defaults
_PAPER_UNET = ("unet (paper)", "unet", {"base_channels": 64, "depth": 4, "padding": "valid"})


@click.command()
@click.option(
    "--input-size",
    type=SIZES,
    default=None,
    help="Input size, one value or one per axis (default 572,572 in 2D, 132,132,132 in 3D); "
    "each model reports the smallest valid input at least this large and its output.",
)
@click.option("--ndim", type=click.Choice(["2", "3"]), default="2", show_default=True, help="Spatial axes.")
@json_option("Print a JSON list instead of a table.")
@click.option("--bundled", is_flag=True, help="List only the bundled (trained, shipped) models with their model-card figures.")
def models(input_size: tuple[int, ...] | None, ndim: str, as_json: bool, bundled: bool) -> None:
    """List the model zoo (parameters, receptive field, input multiple, context, output size), then the
    bundled trained models that `emseg segment` picks from by voxel size, with their card figures."""
    if bundled:
        _bundled(as_json)
        return
    import torch

    from emseg.models import MODELS, build

    nd = int(ndim)
    if input_size is None:
        input_size = (572, 572) if nd == 2 else (132, 132, 132)
    if len(input_size) == 1:
        input_size = input_size * nd
    if len(input_size) != nd:
        raise click.BadParameter(f"expected 1 or {nd} values for --ndim {nd}, got {len(input_size)}", param_hint="--input-size")
    rows: list[dict[str, Any]] = []
    configs: list[tuple[str, str, dict[str, Any]]] = [(name, name, {}) for name in MODELS] + [_PAPER_UNET]
    with torch.device("meta"):  # parameter counts and geometry only: no memory, no initialisation cost
        for label, name, kwargs in configs:
            spec = build(name, ndim=nd, **kwargs).spec(input_size)
            rows.append({"model": label, **asdict(spec)})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    header = ("model", "padding", "params", "receptive field", "multiple", "context", "input", "output")
    table = [header] + [
        (
            r["model"],
            r["padding"],
            f"{r['parameters']:,}",
            _fmt(r["receptive_field"]),
            _fmt(r["input_multiple"]),
            _fmt(r["context"]),
            _fmt(r["input_shape"]),
            _fmt(r["output_shape"]),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    click.echo("")
    _bundled(False)


def _bundled(as_json: bool) -> None:
    from emseg.models.zoo import bundled_models

    found = bundled_models()
    if as_json:
        click.echo(json.dumps([{"name": m.name, "path": str(m.path), "ndim": m.ndim, "outputs": list(m.outputs),
                                "voxel_size_nm": m.voxel_size_nm, "card": m.figures} for m in found], indent=2))
        return
    click.echo("bundled models (no --model: sstem2d for every voxel size, per section, linked in 3-D; --model NAME picks one):")
    for m in found:
        vs = "x".join(f"{v:g}" for v in m.voxel_size_nm) if m.voxel_size_nm else "?"
        click.echo(f"  {m.name}  {m.ndim}D  outputs {','.join(m.outputs)}  trained at {vs} nm  {m.path}")
        for key, value in m.figures.items():
            click.echo(f"      {key}: {value}")
        click.echo(f"      card: {m.path / 'MODEL_CARD.md'}")


def _fmt(shape: tuple[int, ...]) -> str:
    return "x".join(str(v) for v in shape)
