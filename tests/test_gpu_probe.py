"""Counting GPUs where the machine has none does not import torch (seconds in every command that starts a cluster)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from emseg.cluster.local import _no_gpu_device_nodes


def test_no_gpu_device_node_means_no_gpu_and_no_torch_import() -> None:
    if not _no_gpu_device_nodes():
        pytest.skip("this machine shows a GPU device node: torch is asked how many GPUs it sees")
    code = "import sys; from emseg.cluster.local import visible_gpus; print(visible_gpus(), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["[]", "False"]
    import torch

    assert not torch.cuda.is_available()  # what torch says agrees
