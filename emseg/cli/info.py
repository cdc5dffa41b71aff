"""``emseg info``: what a volume is."""

from __future__ import annotations

import json

import click

from emseg.cli.output import json_option


@click.command()
@click.argument("path", type=click.Path(path_type=str))
@json_option("Machine-readable output.")
@click.option("--verify", is_flag=True,
              help="Check every block an emseg run recorded against the chunks on disk (reads them all); "
                   "damaged blocks are marked for recomputation by a rerun.")
def info(path: str, as_json: bool, verify: bool) -> None:
    """Show shape, dtype, chunks, axes, voxel size, compressor, size on disk and levels of PATH.

    PATH is an OME-Zarr image (image.zarr), one of its levels (image.zarr/0), a zarr array, or a
    neuroglancer precomputed layer or export (`emseg export --format precomputed`).
    """
    from emseg.io.convert import describe

    if verify:
        _verify(path)
    from emseg.export.meshes import describe_precomputed, precomputed_summary

    layer = describe_precomputed(path)  # a neuroglancer precomputed layer or export
    if layer is not None:
        from emseg.export.precomputed import export_status

        status = export_status(path)
        if status is not None:
            layer["emseg_status"] = status
        text = json.dumps(layer, indent=2) if as_json else precomputed_summary(layer)
        if status is not None and not as_json:
            text += f"\nemseg status: {status}"
        click.echo(text)
        if status == "incomplete":
            click.echo(f"Warning: {path} is an export that was interrupted (half-written); rerun the emseg export "
                       "command that made it to finish it", err=True)
        return
    report = describe(path)
    click.echo(report.to_json() if as_json else report.summary())


def _verify(path: str) -> None:
    from emseg.engine.ledger import verify_output
    from emseg.errors import IncompleteOutputError, VolumeNotFoundError
    from emseg.io.location import exists

    if not exists(path):
        raise VolumeNotFoundError(f"{path}: no such file or directory")
    found = verify_output(path)
    bad = [d for d in found if d.block_ids or d.pending]
    if bad:
        parts = "; ".join(_damage_text(d) for d in bad)
        raise IncompleteOutputError(f"{path}: stored chunks are missing or damaged, or blocks are not done ({parts}); "
                                    "rerun the command that made it to recompute them")
    checked = sum(d.checked for d in found)
    click.echo(f"verified {checked} blocks of {len(found)} stage(s): all chunks match their records", err=True)


def _damage_text(d: object) -> str:
    from emseg.engine.ledger import Damage

    assert isinstance(d, Damage)
    text = []
    if d.block_ids:
        text.append(f"{len(d.block_ids)} of {d.checked} blocks damaged (first {list(d.block_ids)[:5]}), "
                    "marked for recomputation")
    if d.pending:
        text.append(f"{len(d.pending)} blocks not done (first {list(d.pending)[:5]})")
    return f"{d.output.name} {d.stage}: {', '.join(text)}"
