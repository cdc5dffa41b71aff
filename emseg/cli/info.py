"""``emseg info``: what a volume is."""

from __future__ import annotations

import click


@click.command()
@click.argument("path", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(path: str, as_json: bool) -> None:
    """Show shape, dtype, chunks, axes, voxel size, compressor, size on disk and levels of PATH.

    PATH is an OME-Zarr image (image.zarr), one of its levels (image.zarr/0) or a zarr array.
    """
    from emseg.io.convert import describe

    report = describe(path)
    click.echo(report.to_json() if as_json else report.summary())
