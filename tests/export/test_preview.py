from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from emseg.cli import cli
from emseg.errors import ConfigError, VolumeNotFoundError
from emseg.export.preview import find_sources, label_colors, render_preview
from emseg.export.pyramid import build_pyramids
from emseg.io import update_status


def test_label_colors_fixed_per_id_and_background_black():
    labels = np.array([[0, 1, 2], [2**63 + 5, 1, 0]], dtype=np.uint64)
    rgb = label_colors(labels)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert (rgb[0, 0] == 0).all() and (rgb[1, 2] == 0).all()
    np.testing.assert_array_equal(rgb[0, 1], rgb[1, 1])
    assert not np.array_equal(rgb[0, 1], rgb[0, 2])
    assert (rgb[labels != 0].max(axis=-1) >= 55).all()
    np.testing.assert_array_equal(label_colors(labels), rgb)  # deterministic


def test_find_sources(output_image: Path, raw_image: Path):
    sources = find_sources(output_image)
    assert sources.raw == raw_image
    assert sources.prediction == output_image
    assert sources.labels == output_image / "labels" / "segments"
    assert find_sources(raw_image) == (raw_image, None, None)


def test_render_preview_montage(output_image: Path, tmp_path: Path):
    png = render_preview(output_image, slices=2, png_path=tmp_path / "p" / "preview.png", max_panel=64)
    img = np.asarray(Image.open(png).convert("RGB"))
    # 3 columns of 53x64 panels (48x40 voxels scaled to 64 px), 2 rows, 18 px header, 4 px gaps
    assert img.shape == (18 + 2 * (64 + 4) + 4, 3 * 53 + 4 * 4, 3)
    labels_panel = img[18 + 20 : 18 + 60, -50:-5]
    assert len(np.unique(labels_panel.reshape(-1, 3), axis=0)) > 2  # several coloured segments


def test_render_preview_uses_pyramid_level(output_image: Path, tmp_path: Path):
    from emseg.export.preview import _pick_level

    build_pyramids(output_image, levels=2, progress=False)
    assert _pick_level(output_image, 16).shape == (5, 12, 10)  # the finest level that fits 16 px
    assert _pick_level(output_image, 30).shape == (10, 24, 20)
    png = render_preview(output_image, slices=1, png_path=tmp_path / "small.png", max_panel=16)
    assert Image.open(png).size == (3 * 13 + 4 * 4, 18 + 16 + 4 + 4)


def test_render_preview_errors(output_image: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="slices must be at least 1"):
        render_preview(output_image, slices=0, png_path=tmp_path / "x.png")
    update_status(output_image, source=str(tmp_path / "gone.zarr"))
    with pytest.raises(VolumeNotFoundError, match="pass --raw PATH"):
        render_preview(output_image, png_path=tmp_path / "x.png")


def test_preview_without_recorded_raw_omits_column(output_image: Path, tmp_path: Path):
    update_status(output_image, source=None)
    png = render_preview(output_image, slices=1, png_path=tmp_path / "two.png", max_panel=48)
    assert Image.open(png).size[0] == 2 * 40 + 3 * 4


def test_cli_preview(output_image: Path, raw_image: Path, tmp_path: Path):
    runner = CliRunner()
    assert runner.invoke(cli, ["preview", "--help"]).exit_code == 0
    result = runner.invoke(cli, ["preview", str(output_image), "-o", str(tmp_path / "a.png"), "--raw",
                                 str(raw_image), "--slices", "2", "--size", "32"])
    assert result.exit_code == 0, result.output
    assert Path(result.output.strip()) == tmp_path / "a.png"
    missing = runner.invoke(cli, ["preview", str(tmp_path / "nope.zarr"), "-o", str(tmp_path / "b.png")])
    assert missing.exit_code == 1
    assert "Error: " in missing.output and "no such file" in missing.output
    assert runner.invoke(cli, ["preview", str(output_image), "--slices", "0"]).exit_code == 2
