"""``nproc=2`` (two gloo processes, half the batch each) takes the same step as one process."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from emseg.training import DataSource, TrainConfig, train


def _cfg(isbi_crops: dict[str, Path], out: Path, nproc: int) -> TrainConfig:
    return TrainConfig(
        train=[DataSource(raw=f"{isbi_crops['raw']}[0:3]", labels=f"{isbi_crops['labels']}[0:3]")],
        output=str(out), base_channels=2, depth=1, patch_shape=(40, 40), batch_size=4, steps=1,
        optimizer="sgd", lr=0.5, momentum=0.0, nproc=nproc, threads=1, seed=3,
        precision="fp32",  # exact arithmetic: bf16 rounds a batch of 2 and two of 1 differently
    )


def test_two_processes_average_gradients_like_one_process(tmp_path: Path, isbi_crops: dict[str, Path]) -> None:
    one = train(_cfg(isbi_crops, tmp_path / "one", nproc=1))
    two = train(_cfg(isbi_crops, tmp_path / "two", nproc=2))
    assert (one.world_size, two.world_size) == (1, 2)
    assert one.steps == two.steps == 1
    w1 = load_file(str(tmp_path / "one" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6)
    # the step really moved the weights (same seed -> same initialisation in a fresh model)
    from emseg.models import build

    torch.manual_seed(3)
    init = build("unet", ndim=2, in_channels=1, out_channels=1, base_channels=2, depth=1, padding="valid", batch_norm=False, dropout=0.0)
    moved = max(float((w1[k] - v).abs().max()) for k, v in init.state_dict().items())
    assert moved > 1e-4
    # one checkpoint, written once (by rank 0)
    assert [p.name for p in (tmp_path / "two" / "checkpoints").iterdir()] == ["step-00000001"]
