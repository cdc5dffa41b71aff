"""``emseg view``: a neuroglancer link for raw, prediction and labels, optionally served locally."""

from __future__ import annotations

import json
import threading

import click


@click.command()
@click.argument("out", type=click.Path(path_type=str))
@click.option("--raw", type=click.Path(path_type=str), default=None,
              help="Raw EM (OME-Zarr image); default: the source recorded in OUT.")
@click.option("--serve", "port", type=click.IntRange(min=0, max=65535), default=None,
              help="Serve the stores on 127.0.0.1:PORT (CORS enabled) until Ctrl-C; 0 picks a free port.")
@click.option("--base-url", default="http://127.0.0.1:8000", show_default=True,
              help="Where the stores are served (ignored with --serve).")
@click.option("--viewer", default="https://neuroglancer-demo.appspot.com", show_default=True,
              help="Neuroglancer instance for the link.")
@click.option("--json", "as_json", is_flag=True, help="Print the neuroglancer state JSON instead of a link.")
def view(out: str, raw: str | None, port: int | None, base_url: str, viewer: str, as_json: bool) -> None:
    """Print a neuroglancer link (or state) showing OUT's raw, prediction and segmentation.

    The layer sources are zarr3:// (or zarr2://) URLs under --base-url, each store mounted at
    /<its name>/.  With --serve PORT, emseg serves exactly those stores on localhost.
    """
    from emseg.preview import neuroglancer_state, neuroglancer_url, serve

    server = None
    if port is not None:
        probe = neuroglancer_state(out, raw_path=raw)  # validate before binding the port
        server = serve(probe.mounts, port=port)
        base_url = f"http://127.0.0.1:{server.server_address[1]}"
    view_state = neuroglancer_state(out, raw_path=raw, base_url=base_url)
    click.echo(json.dumps(view_state.state, indent=2) if as_json else neuroglancer_url(view_state.state, viewer))
    if server is None:
        mounts = ", ".join(f"/{name}/ -> {path}" for name, path in view_state.mounts.items())
        click.echo(f"layer sources expect {base_url} to serve {mounts}; run with --serve PORT to do that", err=True)
        return
    click.echo(f"serving {len(view_state.mounts)} store(s) on {base_url}; Ctrl-C to stop", err=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
