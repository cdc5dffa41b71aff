from __future__ import annotations

import json
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from emseg.cli import cli
from emseg.errors import ConfigError
from emseg.export.view import neuroglancer_state, neuroglancer_url, serve


def test_state_names_layers_and_sources(output_image: Path, raw_image: Path):
    view = neuroglancer_state(output_image, base_url="http://127.0.0.1:9999")
    layers = {layer["name"]: layer for layer in view.state["layers"]}
    assert list(view.state["dimensions"]) == ["x", "y", "z"]
    assert view.state["dimensions"]["z"] == [8e-9, "m"] and view.state["dimensions"]["x"] == [4e-9, "m"]
    assert list(layers) == ["raw", "prediction", "segments"]
    assert layers["raw"]["source"] == "zarr3://http://127.0.0.1:9999/raw.zarr/"
    assert layers["prediction"]["source"] == "zarr3://http://127.0.0.1:9999/out.zarr/"
    assert layers["segments"]["source"] == "zarr3://http://127.0.0.1:9999/out.zarr/labels/segments/"
    assert layers["segments"]["type"] == "segmentation"
    assert view.mounts == {"raw.zarr": raw_image.resolve(), "out.zarr": output_image.resolve()}
    url = neuroglancer_url(view.state)
    assert json.loads(urllib.parse.unquote(url.split("#!", 1)[1])) == view.state


def test_serve_fetches_file_with_cors(output_image: Path):
    view = neuroglancer_state(output_image)
    server = serve(view.mounts, port=0, allowed_origins=["http://127.0.0.1:9000"])
    try:
        port = server.server_address[1]
        request = urllib.request.Request(f"http://127.0.0.1:{port}/out.zarr/zarr.json",
                                         headers={"Origin": "http://127.0.0.1:9000"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:9000"
            meta = json.loads(response.read())
        assert meta["node_type"] == "group"
        for bad in ("/out.zarr/../raw.zarr/zarr.json", "/elsewhere/zarr.json", "/out.zarr/"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{bad}", timeout=5)
            assert err.value.code == 404
        with pytest.raises(ConfigError, match="cannot serve"):
            serve(view.mounts, port=port)  # in use
    finally:
        server.shutdown()
        server.server_close()


def test_cli_view(output_image: Path, tmp_path: Path):
    runner = CliRunner()
    assert runner.invoke(cli, ["view", "--help"]).exit_code == 0
    result = runner.invoke(cli, ["view", str(output_image), "--public", "--json", "--base-url",
                                 "http://localhost:8123"])
    assert result.exit_code == 0, result.output
    state = json.loads(result.stdout)["state"]
    assert [layer["name"] for layer in state["layers"]] == ["raw", "prediction", "segments"]
    assert "--serve" in result.stderr
    link = runner.invoke(cli, ["view", str(output_image), "--public"])
    assert link.stdout.startswith("https://neuroglancer-demo.appspot.com/#!")
    missing = runner.invoke(cli, ["view", str(tmp_path / "nope.zarr")])
    assert missing.exit_code == 1 and "Error: " in missing.output
