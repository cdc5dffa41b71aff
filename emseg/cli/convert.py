"""``emseg import`` and ``emseg export``: move volumes between TIFF/PNG/HDF5, OME-Zarr and neuroglancer."""

from __future__ import annotations

from typing import Literal

import click

from emseg.cli.options import cluster_options, overwrite_option, voxel_size_option, zarr_format_option
from emseg.cli.output import JSON_OPTION, PROGRESS_OPTION, echo_report
from emseg.cli.types import INT_ZYX


@click.command("import")
@click.argument("source", type=click.Path(path_type=str))
@click.argument("output", type=click.Path(path_type=str))
@voxel_size_option()
@click.option("--chunks", type=INT_ZYX, help="Chunk shape z,y,x (default 32,256,256, clipped to the volume).")
@click.option("--dataset", help="HDF5 dataset name (or give it in the path: file.h5/group/data).")
@zarr_format_option(3)
@overwrite_option("Replace OUTPUT if it exists.")
@PROGRESS_OPTION
@JSON_OPTION
def import_cmd(source: str, output: str, voxel_size: tuple[float, ...] | None, chunks: tuple[int, ...] | None,
               dataset: str | None, zarr_format: Literal[2, 3], overwrite: bool, progress: bool, as_json: bool) -> None:
    """Convert SOURCE (TIFF stack, folder of TIFF/PNG sections, HDF5 dataset) into an OME-Zarr image."""
    from emseg.io.convert import import_volume

    report = import_volume(source, output, voxel_size=voxel_size, chunks=chunks, dataset=dataset,
                           zarr_format=zarr_format, overwrite=overwrite,
                           progress=progress)
    echo_report(report, as_json)


@click.command("export")
@click.argument("source", type=click.Path(path_type=str))
@click.argument("output", type=click.Path(path_type=str))
@click.option("--format", "fmt", type=click.Choice(["tiff", "precomputed"]), default=None,
              help="Output format (default: from OUTPUT's suffix; .tif/.tiff -> tiff).")
@click.option("--level", default="0", show_default=True, help="Multiscale level to export (tiff).")
@click.option("--mesh", is_flag=True, help="precomputed: also write meshes for a segmentation.")
@click.option("--skeleton", is_flag=True, help="precomputed: also write skeletons for a segmentation.")
@cluster_options(devices=False, applies_to="precomputed (scales, meshes, skeletons)",
                 cluster_default="threads in this process")
@overwrite_option("Replace OUTPUT if it exists.")
@PROGRESS_OPTION
@JSON_OPTION
def export_cmd(source: str, output: str, fmt: str | None, level: str, mesh: bool, skeleton: bool,
               cluster: str | None, scheduler: str | None, workers: int | None, overwrite: bool, progress: bool,
               as_json: bool) -> None:
    """Export SOURCE (OME-Zarr image or zarr array) to a TIFF stack or neuroglancer precomputed."""
    from emseg.errors import ConfigError

    if fmt is None:
        if output.lower().endswith((".tif", ".tiff")):
            fmt = "tiff"
        else:
            raise ConfigError(f"cannot tell the format of {output}; pass --format tiff|precomputed")
    if fmt == "tiff":
        from emseg.io.convert import export_tiff

        path = export_tiff(source, output, level=int(level) if level.isdigit() else level,
                           overwrite=overwrite, progress=progress)
        echo_report(f"wrote {path}", as_json, path=path, format="tiff")
    else:
        from emseg.export.precomputed import export_precomputed

        if cluster is None and scheduler is None and workers is None:
            report = export_precomputed(source, output, overwrite=overwrite, mesh=mesh, skeleton=skeleton,
                                        progress=progress)
        else:
            from emseg.cluster import connect

            with connect(cluster, scheduler=scheduler, workers=workers) as connection:
                report = export_precomputed(source, output, overwrite=overwrite, mesh=mesh, skeleton=skeleton,
                                            progress=progress, client=connection.client)
        echo_report(report, as_json)
