"""``emseg preview``: a PNG montage of raw, prediction and labels."""

from __future__ import annotations

import click

from emseg.cli.options import overwrite_option
from emseg.cli.output import JSON_OPTION, echo_report


@click.command()
@click.argument("out", type=click.Path(path_type=str))
@click.option("-o", "--output", "png", type=click.Path(dir_okay=False, path_type=str), default="preview.png",
              show_default=True, help="PNG to write.")
@click.option("--raw", type=click.Path(path_type=str), default=None,
              help="Raw EM (OME-Zarr image); default: the source recorded in OUT.")
@click.option("--slices", type=click.IntRange(min=1), default=3, show_default=True, help="Number of z sections (rows).")
@click.option("--size", "max_panel", type=click.IntRange(min=16), default=512, show_default=True,
              help="Longest side of one panel, pixels.")
@overwrite_option("Replace the PNG if it exists (only one emseg wrote).")
@JSON_OPTION
def preview(out: str, png: str, raw: str | None, slices: int, max_panel: int, overwrite: bool, as_json: bool) -> None:
    """Write a PNG of a few z sections of OUT: raw | prediction | labels (random colours).

    OUT is an emseg output (out.zarr), a synthetic volume from `emseg synth`, or any OME-Zarr image
    with labels.  Only the shown sections are read.
    """
    from emseg.export.preview import render_preview

    path = render_preview(out, raw_path=raw, slices=slices, png_path=png, max_panel=max_panel,
                          overwrite=overwrite)
    if as_json:
        echo_report({"path": path, "slices": slices}, True)
    else:
        click.echo(str(path))
