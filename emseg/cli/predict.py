"""``emseg predict``: run a model over a volume, block by block, into an OME-Zarr image."""

from __future__ import annotations

import json

import click

from emseg.cli.types import INT_ZYX


def _three(value: tuple[int, ...] | None, option: str) -> tuple[int, int, int] | None:
    if value is None:
        return None
    if len(value) == 1:
        return (value[0], value[0], value[0])
    if len(value) != 3:
        raise click.BadParameter(f"expected 1 or 3 comma-separated values Z,Y,X, got {len(value)}", param_hint=option)
    return (value[0], value[1], value[2])


def _devices(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        devices = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected GPU indices like 0,1, got {value!r}", param_hint="--devices") from None
    if not devices or any(d < 0 for d in devices):
        raise click.BadParameter(f"expected GPU indices like 0,1, got {value!r}", param_hint="--devices")
    return devices


@click.command()
@click.argument("volume", type=click.Path(exists=True))
@click.option("-o", "--output", type=click.Path(), required=True, help="Output OME-Zarr image (e.g. OUT.zarr).")
@click.option("--model", "checkpoint", type=click.Path(exists=True), default=None,
              help="Checkpoint directory (model.safetensors + config.json)  [default: the bundled model].")
@click.option("--block-size", type=INT_ZYX, default=None,
              help="Block core Z,Y,X in voxels: a multiple of the output chunks and of the tile  "
                   "[default: 64,256,256 for 3D models, 4,512,512 for 2D (rounded up to the tile)].")
@click.option("--tile-size", type=INT_ZYX, default=None,
              help="Tile core Z,Y,X fed to the model (rounded up to its input multiple)  "
                   "[default: 64,64,64 for 3D models, 1,256,256 for 2D].")
@click.option("--halo", type=INT_ZYX, default=None,
              help="Context around each tile, 'same'-padded models only  [default: from the model's receptive "
                   "field; smaller values blend tiles with a Gaussian].")
@click.option("--chunks", type=INT_ZYX, default=None, help="Output chunk shape Z,Y,X  [default: 64,128,128 (3D models)].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Tiles per forward pass  [default: about 1 Mvoxel of model input on CPU, 8 on GPU].")
@click.option("--tta", is_flag=True, help="Average over all flips of the spatial axes (4x or 8x the compute).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="Autocast precision of the forward pass; auto: bf16 on GPUs and CPUs with native bf16, else fp32.")
@click.option("--dtype", type=click.Choice(["uint8", "float16", "float32"]), default="uint8", show_default=True,
              help="Output dtype; uint8 stores round(probability x 255).")
@click.option("--cluster", default=None, help="Cluster profile (local, local-gpu, slurm) or YAML file  [default: local].")
@click.option("--scheduler", default=None, metavar="ADDRESS", help="Join a running Dask scheduler instead.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Local workers [default: one per GPU, else one per core (memory permitting)].")
@click.option("--devices", default=None, metavar="0,1,...", help="GPU indices to use (one worker each).")
@click.option("--zarr-format", type=click.Choice(["2", "3"]), default=None,
              help="Zarr format of the output: 3 = OME-NGFF 0.5, 2 = OME-NGFF 0.4  [default: the input's].")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT, also one left by a run with other parameters.")
@click.option("--dry-run", is_flag=True, help="Print the plan (blocks, halo, voxels, memory) and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar on stderr.")
def predict(
    volume: str,
    output: str,
    checkpoint: str | None,
    block_size: tuple[int, ...] | None,
    tile_size: tuple[int, ...] | None,
    halo: tuple[int, ...] | None,
    chunks: tuple[int, ...] | None,
    batch_size: int | None,
    tta: bool,
    precision: str,
    dtype: str,
    cluster: str | None,
    scheduler: str | None,
    workers: int | None,
    devices: str | None,
    zarr_format: str | None,
    overwrite: bool,
    dry_run: bool,
    as_json: bool,
    progress: bool,
) -> None:
    """Predict the model's outputs for every voxel of VOLUME into the OME-Zarr image OUTPUT.

    Blocks are processed in parallel on a Dask cluster (overlap-tile with mirrored borders).
    Rerunning the same command resumes an interrupted run; exit code 3 means some blocks failed
    and a rerun resumes.
    """
    from emseg.predict import predict as run_predict

    report = run_predict(
        volume, output, checkpoint=checkpoint, block_size=_three(block_size, "--block-size"),
        tile_size=_three(tile_size, "--tile-size"), halo=_three(halo, "--halo"), chunks=_three(chunks, "--chunks"),
        batch_size=batch_size, tta=tta, precision=precision, dtype=dtype,  # type: ignore[arg-type]
        cluster=cluster, scheduler=scheduler, workers=workers, devices=_devices(devices), overwrite=overwrite,
        dry_run=dry_run, progress=progress, zarr_format=None if zarr_format is None else int(zarr_format),
    )
    if as_json:
        data = report.to_json()
        if dry_run:
            plan = report.plan
            data.update(blocks=len(plan.grid), block_shape=list(plan.grid.block_shape),
                        tile_shape=list(plan.tiling.tile_shape), tile_input=list(plan.tiling.input_shape),
                        halo=[list(h) for h in plan.tiling.halo], output_voxels=plan.output_voxels,
                        computed_voxels=plan.computed_voxels, memory_per_block=plan.memory_per_block)
        click.echo(json.dumps(data))
    else:
        click.echo(report.summary())
