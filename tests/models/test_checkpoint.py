"""Checkpoints: safetensors + JSON round trip; pickles and mismatches are refused."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from emseg.errors import CheckpointError, ConfigError
from emseg.models import MODELS, build, load_checkpoint, save_checkpoint


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_identical(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    kwargs = {"base_channels": 2} | ({} if name == "fcn" else {"depth": 2})
    model = build(name, ndim=3, out_channels=3, anisotropic_levels=1, **kwargs)
    x = torch.rand(2, 1, *model.min_input_shape)
    model.train()
    model(x)  # move batch-norm running statistics away from their initial values
    model.eval()
    path = save_checkpoint(
        model,
        tmp_path / "ckpt",
        outputs=("aff_z", "aff_y", "aff_x"),
        activation="sigmoid",
        normalization={"mean": 0.4, "std": 0.2},
        voxel_size_nm=(40, 4, 4),
        provenance={"data": "cremi-a", "steps": 10},
    )
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    for target in (path, path / "model.safetensors", str(path)):
        loaded = load_checkpoint(target)
        assert not loaded.model.training
        assert loaded.model.config == model.config
        with torch.no_grad():
            assert torch.equal(loaded.model(x), model(x))
    cfg = loaded.config
    assert cfg.outputs == ("aff_z", "aff_y", "aff_x") and cfg.activation == "sigmoid"
    assert (cfg.normalization.mean, cfg.normalization.std) == (0.4, 0.2)
    assert cfg.voxel_size_nm == (40.0, 4.0, 4.0) and cfg.provenance == {"data": "cremi-a", "steps": 10}
    raw = json.loads((path / "config.json").read_text())
    assert raw["format"] == "emseg-checkpoint" and raw["version"] == 1 and raw["model"]["name"] == name


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nowhere"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nowhere")


def test_pickle_refused(tmp_path: Path) -> None:
    model = build("unet", base_channels=2, depth=2)
    path = save_checkpoint(model, tmp_path / "ckpt")
    (path / "model.safetensors").write_bytes(pickle.dumps(model.state_dict()))
    with pytest.raises(CheckpointError, match="is a pickle.*pickled checkpoints .* refused because loading them would run"):
        load_checkpoint(path)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="torch.save zip archive.*convert .* safetensors"):
        load_checkpoint(tmp_path / "model.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(CheckpointError, match="not safetensors.*pickled checkpoints"):
        load_checkpoint(tmp_path / "junk.safetensors")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(model.state_dict(), legacy / "model.pth")
    with pytest.raises(CheckpointError, match=r"no model.safetensors .*found model.pth.*refused"):
        load_checkpoint(legacy)


def test_config_and_weights_mismatch(tmp_path: Path) -> None:
    path = save_checkpoint(build("unet", base_channels=2, depth=2), tmp_path / "ckpt")
    other = build("unet", base_channels=4, depth=2)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="weights do not match the config's 'unet' model .*wrong shape"):
        load_checkpoint(path)
    save_file({"x": torch.zeros(1)}, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing: .*unexpected: x"):
        load_checkpoint(path)


def test_bad_config(tmp_path: Path) -> None:
    path = save_checkpoint(build("unet", base_channels=2, depth=2), tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model": {"name": "vnet"}}))
    with pytest.raises(CheckpointError, match="cannot be built: unknown model 'vnet'"):
        load_checkpoint(path)
    (path / "config.json").write_text(json.dumps({**config, "activation": "tanh"}))
    with pytest.raises(CheckpointError, match="invalid checkpoint config"):
        load_checkpoint(path)
    (path / "config.json").write_text(json.dumps({**config, "format": "other"}))
    with pytest.raises(CheckpointError, match='expected "format": "emseg-checkpoint"'):
        load_checkpoint(path)
    (path / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing checkpoint config"):
        load_checkpoint(path)


def test_save_validates(tmp_path: Path) -> None:
    model = build("unet", base_channels=2, depth=2, out_channels=2)
    with pytest.raises(ConfigError, match="outputs names 1 channel.* out_channels=2"):
        save_checkpoint(model, tmp_path / "a")
    with pytest.raises(ConfigError, match="invalid checkpoint metadata"):
        save_checkpoint(model, tmp_path / "b", outputs=("fg", "bg"), normalization={"mean": 0.5, "std": 0})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
