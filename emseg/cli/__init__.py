"""The ``emseg`` command line: one click group, one module per command, a thin layer over the library.

Commands are imported lazily so that ``emseg --help`` does not import torch or dask.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Any

import click

from emseg import __version__
from emseg.errors import EmsegError

# name -> "module:function" (modules under emseg.cli).  Explicit, no plugin discovery.
COMMANDS: dict[str, str] = {
    "info": "emseg.cli.info:info",
    "import": "emseg.cli.convert:import_cmd",
    "export": "emseg.cli.convert:export_cmd",
    "synth": "emseg.cli.synth:synth",
    "models": "emseg.cli.models:models",
    "predict": "emseg.cli.predict:predict",
    "label": "emseg.cli.label:label",
    "segment": "emseg.cli.segment:segment",
    "agglomerate": "emseg.cli.agglomerate:agglomerate",
    "evaluate": "emseg.cli.evaluate:evaluate",
    "train": "emseg.cli.train:train",
    "finetune": "emseg.cli.finetune:finetune",
    "calibrate": "emseg.cli.finetune:calibrate",
    "preview": "emseg.cli.preview:preview",
    "view": "emseg.cli.view:view",
}


class EmsegGroup(click.Group):
    """Click group that loads commands on demand and turns ``EmsegError`` into a one-line error."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name, target in COMMANDS.items() if _module_exists(target))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None or not _module_exists(target):
            return None
        module_name, attr = target.split(":")
        command: click.Command = getattr(importlib.import_module(module_name), attr)
        return command

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            raise usage_error(e) from e

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            raise usage_error(e) from e
        except EmsegError as e:
            exc = click.ClickException(_one_line(str(e)))
            exc.exit_code = e.exit_code  # type: ignore[misc]  # click declares a ClassVar; each error has its own code
            raise exc from e
        except OSError as e:  # the machine said no (permissions, disk full, read-only): not a bug
            raise click.ClickException(describe_os_error(e)) from e


def usage_error(e: click.UsageError) -> click.ClickException:
    """A usage error as one ``Error:`` line naming the help to read (exit code 2, click's), not three lines."""
    if type(e).__name__ == "NoArgsIsHelpError":  # a bare `emseg` (or a command without arguments) shows the help
        return e
    where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
    exc = click.ClickException(_one_line(e.format_message()) + where)
    exc.exit_code = e.exit_code  # type: ignore[misc]  # 2
    return exc


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: what failed, on which path, and what usually fixes it."""
    import errno

    reason = e.strerror or type(e).__name__
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    hint = {
        errno.ENOSPC: "free some space or write the output elsewhere, then run the command again",
        errno.EDQUOT: "free some space or write the output elsewhere",
        errno.EACCES: "check the permissions of the path or choose another output",
        errno.EPERM: "check the permissions of the path or choose another output",
        errno.EROFS: "the filesystem is read-only: write the output elsewhere",
    }.get(e.errno or 0, "")
    text = f"{paths}: {reason}" if paths else f"{reason}: {e}" if e.strerror is None else reason
    return _one_line(f"{text}{'; ' + hint if hint else ''}")


def _one_line(message: str) -> str:
    """Messages are one line on stderr: fold any newline a library put into them."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip()) or message


def _module_exists(target: str) -> bool:
    return importlib.util.find_spec(target.split(":")[0]) is not None


@click.group(cls=EmsegGroup, context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "EMSEG"})
@click.version_option(__version__, prog_name="emseg")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """emseg: distributed segmentation of large electron-microscopy volumes."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    # Dask's own INFO chatter (scheduler/nanny start-up and shut-down) only with -vv.
    for name in ("distributed", "dask_jobqueue"):
        logging.getLogger(name).setLevel(logging.WARNING if verbose < 2 else logging.DEBUG)
    # zarr reads chunks concurrently: when one is damaged, the others' "Task exception was never
    # retrieved" reports repeat the error that emseg reports once
    logging.getLogger("asyncio").setLevel(logging.CRITICAL if verbose < 2 else logging.DEBUG)


def main() -> None:
    cli()
