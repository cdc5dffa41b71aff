"""``emseg synth``: write a synthetic EM-like volume with exact instance ground truth."""

from __future__ import annotations

import time
from typing import Literal

import click

from emseg.cli.options import overwrite_option, zarr_format_option
from emseg.cli.output import JSON_OPTION, PROGRESS_OPTION, echo_report
from emseg.cli.types import FLOAT_ZYX, INT_ZYX

CONFIRM_BYTES = 16 * 2**30
"""Volumes larger than this (uncompressed image + labels) are written only after a yes."""


@click.command()
@click.argument("dst", type=click.Path(file_okay=False, dir_okay=True, writable=True))
@click.option("--shape", type=INT_ZYX, required=True, help="Volume shape Z,Y,X in voxels, e.g. 256,256,256.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Random seed; the same seed gives identical bytes.")
@click.option("--voxel-size", type=FLOAT_ZYX, default="8,8,8", show_default=True,
              help="Voxel size Z,Y,X in nm (e.g. 40,4,4 for serial-section EM).")
@click.option("--chunks", type=INT_ZYX, default="64,64,64", show_default=True, help="Zarr chunk shape Z,Y,X.")
@click.option("--block-size", type=INT_ZYX, default=None,
              help="Voxels computed per unit of work, a multiple of --chunks  [default: 128 per axis].")
@click.option("--cell-size", type=click.FloatRange(min=0, min_open=True), default=320.0, show_default=True,
              help="Mean cell diameter in nm (spacing of the cell seeds).")
@zarr_format_option(3)
@overwrite_option("Replace DST if it exists.")
@PROGRESS_OPTION
@click.option("-y", "--yes", is_flag=True,
              help=f"Write volumes over {CONFIRM_BYTES // 2**30} GiB without asking (needed where no one can answer).")
@JSON_OPTION
def synth(
    dst: str,
    shape: tuple[int, int, int],
    seed: int,
    voxel_size: tuple[float, float, float],
    chunks: tuple[int, int, int],
    block_size: tuple[int, int, int] | None,
    cell_size: float,
    zarr_format: Literal[2, 3],
    overwrite: bool,
    progress: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Write a synthetic EM volume to DST (OME-Zarr) with its labels at DST/labels/ground_truth.

    Cells are a Voronoi tessellation of jittered seeds with dark membranes, mitochondria and
    vesicles, texture, blur and noise.  Every voxel of the uint64 ground truth holds its cell id,
    membranes included.  Blocks are computed independently, so volumes larger than memory work.
    """
    from emseg.synth import LABEL_NAME, SynthParams, write_synth

    # the ZYX types (axes=3) give three values: one value on the command line stands for every axis
    params = SynthParams(voxel_size=voxel_size, cell_size=cell_size)
    _confirm_size(dst, shape, yes)
    start = time.perf_counter()
    write_synth(
        dst, shape=shape, seed=seed, params=params, chunks=chunks, block_shape=block_size,
        overwrite=overwrite, zarr_format=zarr_format, progress=progress,
    )
    elapsed = time.perf_counter() - start
    if as_json:
        echo_report({"path": dst, "shape": shape, "seed": seed, "voxel_size": params.voxel_size,
                     "labels": f"labels/{LABEL_NAME}", "seconds": round(elapsed, 3)}, True)
        return
    click.echo(
        f"wrote {dst}: {'x'.join(map(str, shape))} uint8 image + uint64 labels/{LABEL_NAME}, "
        f"seed {seed}, voxel size {','.join(f'{v:g}' for v in params.voxel_size)} nm, {elapsed:.1f} s"
    )


def _confirm_size(dst: str, shape: tuple[int, int, int], yes: bool) -> None:
    """Ask before writing more than CONFIRM_BYTES (uint8 image + uint64 labels, uncompressed)."""
    import math
    import sys

    from emseg.errors import ConfigError

    size = math.prod(shape) * 9
    if size <= CONFIRM_BYTES or yes:
        return
    what = f"{'x'.join(map(str, shape))} voxels are about {_human(size)} uncompressed (image + labels) in {dst}"
    if not sys.stdin.isatty():
        raise ConfigError(f"{what}; nobody can confirm here: pass --yes to write it, or a smaller --shape")
    if not click.confirm(f"{what}. Write it?", default=False, err=True):
        raise ConfigError("synth cancelled: nothing written")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if n < 1024 or unit == "EiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} EiB"

