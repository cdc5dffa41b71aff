"""``emseg view``: neuroglancer on raw, prediction and labels, offline by default."""

from __future__ import annotations

import json
import threading
from typing import Any

import click

from emseg.cli.output import json_option
from emseg.cli.types import INDEX_LIST


def _wait(close: Any) -> None:
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        close()


@click.command()
@click.argument("out", type=click.Path(path_type=str))
@click.option("--raw", type=click.Path(path_type=str), default=None,
              help="Raw EM (OME-Zarr image); default: the source recorded in OUT.")
@click.option("--precomputed", type=click.Path(path_type=str, file_okay=False), default=None,
              help="Directory from `emseg export --format precomputed --mesh/--skeleton`: show its meshes "
                   "and skeletons with the segments.")
@click.option("--select", type=INDEX_LIST, default=None, metavar="ID,...",
              help="Segments selected at start (their meshes/skeletons drawn in 3-D).")
@click.option("--public", is_flag=True,
              help="Print a link to the public neuroglancer site (--viewer) instead of serving the bundled "
                   "client; add --serve PORT to serve the stores for it.")
@click.option("--serve", "port", type=click.IntRange(min=0, max=65535), default=None,
              help="Port of the store server (0 = a free one)  [default: 0 offline; with --public: serve "
                   "nothing, print where the stores are expected].")
@click.option("--viewer-port", type=click.IntRange(min=0, max=65535), default=0, show_default=True,
              help="Port of the offline neuroglancer client (0 = a free one).")
@click.option("--bind", default="127.0.0.1", show_default=True,
              help="Address the servers listen on; another than 127.0.0.1 makes them reachable from other "
                   "machines (then name the host they are reached by with --allow-host).")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="Also answer requests whose Host header is NAME (repeatable; loopback names always are).")
@click.option("--base-url", default="http://127.0.0.1:8000", show_default=True,
              help="With --public and no --serve: where the stores are served.")
@click.option("--viewer", default="https://neuroglancer-demo.appspot.com", show_default=True,
              help="Neuroglancer instance of the --public link.")
@json_option("Print the viewer URL, store URL and state as one JSON line.")
def view(out: str, raw: str | None, precomputed: str | None, select: tuple[int, ...] | None, public: bool, port: int | None, viewer_port: int,
         bind: str, allow_hosts: tuple[str, ...], base_url: str, viewer: str, as_json: bool) -> None:
    """Show OUT's raw EM, prediction and segments in neuroglancer, in physical units (nm).

    By default the neuroglancer client bundled with the `neuroglancer` Python package and the
    stores are served from this machine (127.0.0.1; nothing is downloaded); open the printed link,
    Ctrl-C stops.  Only the OME-Zarr arrays of OUT and its raw source are served.
    """
    from urllib.parse import urlsplit

    from emseg.export.view import neuroglancer_state, neuroglancer_url, serve, start_viewer

    ids = tuple(select or ())

    if not public:
        local = start_viewer(out, raw_path=raw, precomputed=precomputed, select=ids, port=port or 0, viewer_port=viewer_port,
                             host=bind, allowed_hosts=allow_hosts)
        if as_json:
            click.echo(json.dumps({"url": local.url, "data_url": local.data_url, "state": local.state}))
        else:
            click.echo(local.url)
        click.echo(f"serving neuroglancer at {local.url} and the stores at {local.data_url}; Ctrl-C to stop",
                   err=True)
        _wait(local.close)
        return
    server = None
    if port is not None:
        probe = neuroglancer_state(out, raw_path=raw, precomputed=precomputed, select=ids)  # validate before binding
        parts = urlsplit(viewer)
        server = serve(probe.mounts, port=port, host=bind, allowed_origins=[f"{parts.scheme}://{parts.netloc}"],
                       allowed_hosts=allow_hosts)
        base_url = server.url
    view_state = neuroglancer_state(out, raw_path=raw, precomputed=precomputed, select=ids, base_url=base_url)
    url = neuroglancer_url(view_state.state, viewer)
    if as_json:
        click.echo(json.dumps({"url": url, "data_url": base_url, "state": view_state.state,
                               "mounts": {name: str(path) for name, path in view_state.mounts.items()}}))
    else:
        click.echo(url)
    if server is None:
        mounts = ", ".join(f"/{name}/ -> {path}" for name, path in view_state.mounts.items())
        click.echo(f"layer sources expect {base_url} to serve {mounts}; run with --serve PORT to do that", err=True)
        return
    click.echo(f"serving {len(view_state.mounts)} store(s) on {base_url}; Ctrl-C to stop", err=True)
    _wait(server.close)
