"""UNet++: deep supervision, fast (pruned) mode equals the full model's head, with fewer FLOPs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from emseg.models import UNetPlusPlus, build


def flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


@pytest.mark.parametrize(("ndim", "level"), [(2, 1), (2, 2), (3, 2)])
def test_fast_mode_equals_head(ndim: int, level: int) -> None:
    torch.manual_seed(0)
    full = build("unetpp", ndim=ndim, base_channels=2, depth=3)
    assert isinstance(full, UNetPlusPlus)
    full.eval()
    fast = full.prune(level)
    assert fast.config["mode"] == "fast" and fast.config["level"] == level and not fast.training
    x = torch.rand(1, 1, *full.min_input_shape)
    with torch.no_grad():
        heads = full.forward_heads(x)
        assert len(heads) == 3
        assert torch.equal(fast(x), heads[level - 1])
        assert torch.allclose(full(x), torch.stack(heads).mean(0))
    assert flops(fast, x) < flops(full, x)
    assert sum(p.numel() for p in fast.parameters()) < sum(p.numel() for p in full.parameters())
    assert fast.input_multiple == (2**level,) * ndim
    assert fast.receptive_field < full.receptive_field


def test_fast_mode_state_dict_is_subset() -> None:
    full = build("unetpp", base_channels=2, depth=3)
    fast = build("unetpp", base_channels=2, depth=3, mode="fast", level=2)
    assert set(fast.state_dict()) < set(full.state_dict())
    assert len(fast.forward_heads(torch.rand(2, 1, 8, 8))) == 1
