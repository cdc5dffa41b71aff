"""`emseg view` in a real browser: headless Chromium renders the offline viewer, segments over raw.

Needs Debian's chromium (``apt-get install chromium``; .ci/run installs it) and the playwright
package (test extra), which drives that chromium (no browser is downloaded).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

from emseg.io import create_volume, mark_complete

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "isbi2012" / "test-volume.tif"
REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)"),
    pytest.mark.skipif(not DATA.exists(), reason=f"{DATA} not found (../shared/data)"),
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, connection) -> Path:
    """The README demo on a 2x256x256 crop of the ISBI 2012 test volume: imported, then segmented (on the
    session's cluster)."""
    import tifffile

    import emseg
    from emseg.config import RunOptions

    folder = tmp_path_factory.mktemp("demo")
    raw = np.asarray(tifffile.imread(DATA)[:2, :256, :256])
    vol = create_volume(folder / "isbi.zarr", shape=raw.shape, dtype=np.uint8, chunks=(1, 128, 128),
                        voxel_size=(50.0, 4.0, 4.0))
    vol.write(vol.roi, raw)
    mark_complete(folder / "isbi.zarr")
    emseg.segment(folder / "isbi.zarr", folder / "isbi_seg.zarr", pipeline=REPO / "pipelines" / "isbi2012.toml",
                  run=RunOptions(client=connection))
    return folder / "isbi_seg.zarr"


def _colourful(png: bytes) -> tuple[float, float, int]:
    """(grey-level std, fraction of coloured pixels, number of distinct colours) of the main panel."""
    import io

    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)
    h, w, _ = image.shape
    panel = image[h // 10 : h // 2, w // 20 : w // 2]  # the xy panel of the 4-panel layout (top left)
    chroma = panel.max(-1) - panel.min(-1)
    coloured = chroma > 30
    colours = len(np.unique((panel[coloured] // 32).reshape(-1, 3), axis=0)) if coloured.any() else 0
    return float(panel.mean(-1).std()), float(coloured.mean()), colours


def test_view_renders_segments_over_raw_offline(demo: Path, tmp_path: Path):
    playwright = pytest.importorskip("playwright.sync_api")
    pytest.importorskip("neuroglancer")
    # from another folder: the raw source is found through the output's metadata
    proc = subprocess.Popen(
        [sys.executable, "-c", "from emseg.cli import main; main()", "view", str(demo), "--json"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line, proc.stderr.read()  # type: ignore[union-attr]
        info = json.loads(line)
        assert [layer["name"] for layer in info["state"]["layers"]] == ["raw", "prediction", "segments"]
        assert urllib.parse.urlsplit(info["url"]).hostname == "127.0.0.1"
        outside: list[str] = []
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"])
            page = browser.new_page(viewport={"width": 1000, "height": 700})

            def offline(route):  # type: ignore[no-untyped-def]
                if urllib.parse.urlsplit(route.request.url).hostname not in ("127.0.0.1", "localhost"):
                    outside.append(route.request.url)
                    route.abort()
                else:
                    route.continue_()

            page.route("**/*", offline)
            page.goto(info["url"])
            deadline = time.monotonic() + 90
            while True:
                time.sleep(2)
                png = page.screenshot()
                grey_std, coloured, colours = _colourful(png)
                if (coloured > 0.3 and colours >= 8) or time.monotonic() > deadline:
                    break
            browser.close()
        (tmp_path / "view.png").write_bytes(png)
        if os.environ.get("EMSEG_SCREENSHOT_DIR"):
            shutil.copy(tmp_path / "view.png", Path(os.environ["EMSEG_SCREENSHOT_DIR"]) / "view.png")
        assert not outside, f"the viewer tried to reach the network: {outside[:3]}"
        assert grey_std > 15, f"blank viewport (grey-level std {grey_std:.1f})"
        assert coloured > 0.3, f"no segments drawn: {coloured:.0%} of the panel coloured"
        assert colours >= 8, f"segments drawn in only {colours} colours"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_view_draws_meshes_and_skeletons_offline(demo: Path, tmp_path: Path):
    playwright = pytest.importorskip("playwright.sync_api")
    pytest.importorskip("zmesh")
    pytest.importorskip("kimimaro")
    from emseg.export.precomputed import export_precomputed
    from emseg.io import open_volume

    pc = tmp_path / "pc"
    report = export_precomputed(demo / "labels" / "segments", pc, overwrite=False, mesh=True, skeleton=True,
                                progress=False)
    assert report.layers[0].meshes > 0 and report.layers[0].skeletons > 0
    labels = open_volume(demo / "labels" / "segments").array[...]
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    chosen = [int(i) for i in ids[np.argsort(counts)[-3:]] if (pc / "labels" / "segments" / "skeletons" / str(i)).exists()]
    assert chosen
    proc = subprocess.Popen(
        [sys.executable, "-c", "from emseg.cli import main; main()", "view", str(demo), "--precomputed", str(pc),
         "--select", ",".join(map(str, chosen)), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line, proc.stderr.read()  # type: ignore[union-attr]
        info = json.loads(line)
        loaded: dict[str, int] = {}
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"])
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.on("response", lambda r: loaded.__setitem__(urllib.parse.urlsplit(r.url).path, r.status))
            page.goto(info["url"])
            want = {"/pc/labels/segments/mesh/info"} | {f"/pc/labels/segments/skeletons/{i}" for i in chosen}
            deadline = time.monotonic() + 90
            while not want <= set(loaded) and time.monotonic() < deadline:
                page.wait_for_timeout(500)  # playwright delivers the responses while it waits (not in time.sleep)
            page.wait_for_timeout(3000)
            page.screenshot(path=str(tmp_path / "meshes.png"))
            browser.close()
        if os.environ.get("EMSEG_SCREENSHOT_DIR"):
            shutil.copy(tmp_path / "meshes.png", Path(os.environ["EMSEG_SCREENSHOT_DIR"]) / "meshes.png")
        missing = sorted(want - set(loaded))
        assert not missing, f"the viewer never asked for {missing}"
        assert all(loaded[path] == 200 for path in want), {path: loaded[path] for path in want}
        shards = [path for path in loaded if "/mesh/" in path and path.endswith(".shard")]
        assert shards and all(loaded[path] == 206 for path in shards)  # the mesh shards, read in byte ranges
        assert loaded["/pc/labels/segments/skeletons/info"] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)
