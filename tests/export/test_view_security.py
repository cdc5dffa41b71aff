"""``emseg view --serve`` is closed: only OME-Zarr arrays, no symlinks out, Host checked, no wildcard CORS."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zarr

from emseg.errors import ConfigError, NotAVolumeError, VolumeNotFoundError
from emseg.export.view import StoreServer, neuroglancer_state, servable_files, serve


def _get(server: StoreServer, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    port = server.server_address[1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    headers.setdefault("Host", f"127.0.0.1:{port}")
    conn.putrequest("GET", path, skip_host=True)
    for key, value in headers.items():
        conn.putheader(key, value)
    conn.endheaders()
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


@pytest.fixture
def server(output_image: Path) -> Iterator[StoreServer]:
    view = neuroglancer_state(output_image)
    with serve(view.mounts, port=0, allowed_origins=["http://127.0.0.1:4321"]) as running:
        yield running


def _set_source(image: Path, source: str) -> None:
    group = zarr.open_group(str(image), mode="a")
    attrs = dict(group.attrs["emseg"])
    attrs["source"] = source
    group.attrs["emseg"] = attrs


def test_serves_metadata_and_chunks_of_the_images(server: StoreServer, output_image: Path):
    status, _, body = _get(server, "/out.zarr/zarr.json")
    assert status == 200 and json.loads(body)["node_type"] == "group"
    chunk = next(p for p in (output_image / "labels" / "segments" / "0").rglob("*") if p.is_file()
                 and p.name != "zarr.json")
    rel = chunk.relative_to(output_image).as_posix()
    status, _, body = _get(server, f"/out.zarr/{rel}")
    assert status == 200 and body == chunk.read_bytes()
    assert _get(server, "/raw.zarr/0/zarr.json")[0] == 200


def test_byte_ranges_are_answered_with_206(server: StoreServer, output_image: Path):
    """Sharded precomputed layers are read in byte ranges (shard index, minishard index, chunk)."""
    chunk = next(p for p in (output_image / "labels" / "segments" / "0").rglob("*") if p.is_file()
                 and p.name != "zarr.json" and p.stat().st_size > 8)
    rel, data = chunk.relative_to(output_image).as_posix(), chunk.read_bytes()
    status, headers, body = _get(server, f"/out.zarr/{rel}", Range="bytes=2-5")
    assert (status, body, headers["content-range"]) == (206, data[2:6], f"bytes 2-5/{len(data)}")
    assert _get(server, f"/out.zarr/{rel}", Range="bytes=-3")[2] == data[-3:]
    assert _get(server, f"/out.zarr/{rel}", Range="bytes=4-")[2] == data[4:]
    assert _get(server, f"/out.zarr/{rel}", Range=f"bytes={len(data) + 5}-")[0] == 416
    assert _get(server, "/out.zarr/emseg_state/zarr.json", Range="bytes=0-3")[0] == 404  # still only what is served


def test_only_ome_zarr_arrays_are_served(server: StoreServer, output_image: Path):
    # emseg's own bookkeeping and stray files inside the store are not part of the image
    (output_image / "notes.txt").write_text("private")
    assert _get(server, "/out.zarr/notes.txt")[0] == 404
    state = [p for p in output_image.rglob("*") if p.is_file() and "emseg_state" in p.parts]
    for p in state[:1]:
        assert _get(server, "/out.zarr/" + p.relative_to(output_image).as_posix())[0] == 404
    for bad in ("/out.zarr/../raw.zarr/zarr.json", "/out.zarr/0/../../raw.zarr/zarr.json", "/out.zarr/",
                "/out.zarr/0/", "/elsewhere/zarr.json", "/out.zarr//zarr.json", "/%2e%2e/etc/passwd"):
        assert _get(server, bad)[0] == 404, bad


def test_a_symlink_out_of_the_store_is_refused(output_image: Path, tmp_path: Path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    level = output_image / "0"
    (level / "c" / "leak").symlink_to(secret)  # inside an array directory, so its name is allowed
    (output_image / "labels" / "segments" / "0" / "c" / "dir-link").symlink_to(tmp_path, target_is_directory=True)
    with serve(neuroglancer_state(output_image).mounts, port=0) as server:
        assert _get(server, "/out.zarr/0/c/leak")[0] == 404
        assert _get(server, "/out.zarr/labels/segments/0/c/dir-link/secret.txt")[0] == 404
        assert _get(server, "/out.zarr/0/zarr.json")[0] == 200


def test_recorded_source_etc_is_not_served(output_image: Path):
    _set_source(output_image, "/etc")
    view = neuroglancer_state(output_image)
    assert [layer["name"] for layer in view.state["layers"]] == ["prediction", "segments"]
    assert all(path != Path("/etc") for path in view.mounts.values())
    with serve(view.mounts, port=0) as server:
        for path in ("/etc/passwd", "/etc/shadow", "/etc/hostname"):
            assert _get(server, path)[0] == 404
    with pytest.raises((NotAVolumeError, VolumeNotFoundError)):
        serve({"etc": Path("/etc")}, port=0)  # the server itself refuses a mount that is no OME-Zarr image


def test_relative_source_of_an_older_output_is_found_from_any_folder(output_image: Path, raw_image: Path,
                                                                      tmp_path: Path, monkeypatch):
    # an output written before sources were absolute: "raw.zarr" relative to where the run started
    _set_source(output_image, raw_image.name)
    elsewhere = tmp_path / "x" / "y"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    view = neuroglancer_state(output_image)
    assert view.mounts["raw.zarr"] == raw_image.resolve()


def test_host_header_is_checked(server: StoreServer):
    port = server.server_address[1]
    for host in (f"evil.example:{port}", "attacker.test", f"10.0.0.1:{port}"):
        status, _, _ = _get(server, "/out.zarr/zarr.json", Host=host)
        assert status == 403, host
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert _get(server, "/out.zarr/zarr.json", Host=host)[0] == 200, host


def test_allowed_host_is_answered(output_image: Path):
    with serve(neuroglancer_state(output_image).mounts, port=0, allowed_hosts=["myws.lab"]) as server:
        assert _get(server, "/out.zarr/zarr.json", Host="myws.lab:8000")[0] == 200
        assert _get(server, "/out.zarr/zarr.json", Host="other.lab:8000")[0] == 403


def test_no_wildcard_cors(server: StoreServer):
    _, headers, _ = _get(server, "/out.zarr/zarr.json", Origin="https://evil.example")
    assert "access-control-allow-origin" not in headers
    _, headers, _ = _get(server, "/out.zarr/zarr.json")
    assert "access-control-allow-origin" not in headers
    _, headers, _ = _get(server, "/out.zarr/zarr.json", Origin="http://127.0.0.1:4321")
    assert headers["access-control-allow-origin"] == "http://127.0.0.1:4321"
    with pytest.raises(ConfigError, match="wildcard"):
        serve({}, port=0, allowed_origins=["*"])


def test_binds_loopback_by_default(server: StoreServer):
    assert server.server_address[0] == "127.0.0.1"
    assert server.url.startswith("http://127.0.0.1:")


def test_servable_files_lists_levels_and_labels(output_image: Path):
    mount = servable_files(output_image)
    assert "zarr.json" in mount.files and "labels/segments/zarr.json" in mount.files
    assert set(mount.trees) == {"0", "labels/segments/0"}
    assert not mount.allows("emseg_state/x") and mount.allows("0/c/0/0/0/0")


def test_cli_public_serve_binds_loopback_and_refuses_foreign_hosts(output_image: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", "from emseg.cli import main; main()", "view", str(output_image), "--public",
         "--serve", str(port), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line, proc.stderr.read()  # type: ignore[union-attr]
        data = json.loads(line)
        assert data["data_url"] == f"http://127.0.0.1:{port}"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        deadline = time.monotonic() + 10
        while True:
            try:
                conn.request("GET", "/out.zarr/zarr.json", headers={"Host": "rebound.example",
                                                                    "Origin": "https://neuroglancer-demo.appspot.com"})
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert conn.getresponse().status == 403
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/out.zarr/zarr.json", headers={"Origin": "https://neuroglancer-demo.appspot.com"})
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Access-Control-Allow-Origin") == "https://neuroglancer-demo.appspot.com"
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_offline_viewer_serves_the_bundled_client_on_loopback(output_image: Path):
    pytest.importorskip("neuroglancer")
    import urllib.parse
    import urllib.request

    from emseg.export.view import start_viewer

    with start_viewer(output_image) as local:
        viewer = urllib.parse.urlsplit(local.url)
        assert viewer.hostname == "127.0.0.1" and local.store.server_address[0] == "127.0.0.1"
        with urllib.request.urlopen(local.url, timeout=10) as response:  # the client, from the package
            assert response.status == 200 and b"neuroglancer" in response.read()
        origin = f"{viewer.scheme}://{viewer.netloc}"
        _, headers, _ = _get(local.store, "/out.zarr/zarr.json", Origin=origin)
        assert headers["access-control-allow-origin"] == origin  # the viewer may read the stores
        _, headers, _ = _get(local.store, "/out.zarr/zarr.json", Origin="http://127.0.0.1:1")
        assert "access-control-allow-origin" not in headers  # another local page may not
        layers = {layer["name"]: layer["source"] for layer in local.state["layers"]}
        assert layers["segments"].startswith(f"zarr3://{local.data_url}/")
