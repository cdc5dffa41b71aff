"""Launcher environments, optimizer state without pickle, labels kinds, metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from emseg.errors import ConfigError, InvalidDataError
from emseg.training import launcher_env, membrane_scores
from emseg.training.config import DataSource, TrainConfig
from emseg.training.data import instances_from_labels, load_source, parse_data_path, widen_boundaries
from emseg.training.state import latest_checkpoint, load_optimizer, save_optimizer, write_atomic_dir


def test_slurm_environment_is_read() -> None:
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}
    info = launcher_env(env)
    assert info is not None and (info.rank, info.world_size, info.local_rank, info.launcher) == (3, 4, 1, "slurm")


def test_slurm_without_master_addr_is_an_error() -> None:
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


def test_single_task_slurm_and_plain_env_are_not_launched() -> None:
    assert launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None
    assert launcher_env({}) is None


def test_torchrun_environment_is_read() -> None:
    info = launcher_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "x", "MASTER_PORT": "1"})
    assert info is not None and info.launcher == "torchrun" and info.rank == 1


def test_adam_state_round_trips_through_safetensors(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    save_optimizer(opt, tmp_path)
    fresh = torch.optim.Adam(model.parameters(), lr=1.0)
    load_optimizer(fresh, tmp_path)
    a, b = opt.state_dict(), fresh.state_dict()
    assert b["param_groups"][0]["lr"] == 1e-3
    for k in a["state"]:
        for name, value in a["state"][k].items():
            torch.testing.assert_close(b["state"][k][name], value)


def test_atomic_dir_and_latest_checkpoint(tmp_path: Path) -> None:
    def fill(d: Path) -> None:
        (d / "state.json").write_text("{}")

    write_atomic_dir(tmp_path / "step-00000002", fill)
    write_atomic_dir(tmp_path / "step-00000010", fill)
    (tmp_path / ".tmp-step-00000012").mkdir()  # a killed write: ignored
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step-00000010"


def test_labels_kind_auto_detection() -> None:
    isbi_like = np.full((1, 10, 10), 255, np.uint8)
    isbi_like[0, 5] = 0  # a membrane row: rare value 0
    inst, kind = instances_from_labels(isbi_like, "auto", per_section=True)
    assert kind == "interior-mask" and inst.max() == 2 and (inst[0, 5] == 0).all()
    vnc_like = (isbi_like == 0).astype(np.uint8)  # 1 = membrane, rare
    inst2, kind2 = instances_from_labels(vnc_like, "auto", per_section=True)
    assert kind2 == "membrane-mask"
    np.testing.assert_array_equal(inst2, inst)
    with pytest.raises(InvalidDataError, match="labels-kind"):
        instances_from_labels(np.zeros((1, 4, 4), np.uint8), "auto", per_section=True)


def test_parse_data_path() -> None:
    assert parse_data_path("a/b.tif[3:7]") == (Path("a/b.tif"), slice(3, 7))
    assert parse_data_path("a/b.zarr") == (Path("a/b.zarr"), slice(None))


def test_perfect_prediction_scores() -> None:
    inst = np.zeros((1, 8, 8), np.uint32)
    inst[0, :, :3], inst[0, :, 4:] = 1, 2
    membrane = (inst == 0).astype(np.uint8)
    s = membrane_scores(membrane.astype(np.float32), membrane, inst)
    assert s.dice == 1 and s.pixel_error == 0 and s.adapted_rand_error == pytest.approx(0)
    merged = membrane_scores(np.zeros((1, 8, 8), np.float32), membrane, inst)  # no membrane: one segment
    assert merged.adapted_rand_error > 0.3


def test_cosine_schedule_decays_from_lr_to_one_percent_and_constant_stays() -> None:
    from emseg.training.config import TrainConfig
    from emseg.training.loop import learning_rate

    src = [{"raw": "a.tif", "labels": "b.tif"}]
    cosine = TrainConfig(train=src, output="o", lr=1e-3, steps=101, lr_schedule="cosine")
    rates = [learning_rate(cosine, s) for s in range(1, 102)]
    assert rates[0] == pytest.approx(1e-3) and rates[-1] == pytest.approx(1e-5)
    assert rates[50] == pytest.approx(0.5 * (1e-3 + 1e-5))
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))
    constant = TrainConfig(train=src, output="o", lr=1e-3, steps=101)
    assert {learning_rate(constant, s) for s in (1, 50, 101)} == {1e-3}


def test_dense_instance_labels_get_a_membrane_wide_boundary(tmp_path: Path) -> None:
    import tifffile

    ids = np.zeros((2, 16, 16), np.uint16)
    ids[:, :, :8], ids[:, :8, 8:], ids[:, 8:, 8:] = 1, 2, 3  # touching cells, no gap (as CREMI's neuron ids)
    raw = np.full(ids.shape, 128, np.uint8)
    tifffile.imwrite(tmp_path / "raw.tif", raw)
    tifffile.imwrite(tmp_path / "ids.tif", ids)
    widened = widen_boundaries(ids.astype(np.uint32), 2)
    assert np.array_equal(np.flatnonzero(widened[0, 0] == 0), np.arange(5, 11))  # 1 + 1 pixels grown by 2 each side
    source = DataSource(raw=str(tmp_path / "raw.tif"), labels=str(tmp_path / "ids.tif"))
    cfg = TrainConfig(train=(source,), output=str(tmp_path / "ckpt"), voxel_size_nm=(40, 4, 4))
    dense = load_source(source, cfg)
    assert (dense.instances[:, 0] == 0).sum(axis=-1).tolist() == [8, 8]  # 12 nm = 3 pixels each side by default
    coarse = load_source(source, cfg.model_copy(update={"voxel_size_nm": (10, 10, 10)}))
    assert (coarse.instances[:, 0] == 0).sum(axis=-1).tolist() == [4, 4]  # 1 pixel at 10 nm
    given = DataSource(raw=source.raw, labels=source.labels, boundary_width=0)
    assert not (load_source(given, cfg).instances == 0).any()  # as labelled: the boundary is where the ids change
    gaps = ids.copy()
    gaps[:, :, 7:9] = 0  # labels that draw the boundary themselves are kept as they are
    tifffile.imwrite(tmp_path / "gaps.tif", gaps)
    drawn = DataSource(raw=source.raw, labels=str(tmp_path / "gaps.tif"))
    assert np.array_equal(load_source(drawn, cfg).instances == 0, gaps == 0)
