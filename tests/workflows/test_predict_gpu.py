"""GPU path: workers pinned one per GPU with resource GPU=1; runs only where CUDA is found."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from emseg.io import open_volume
from emseg.workflows.predict import predict
from tests.support import smooth_volume

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to torch)"),
]


def test_gpu_workers_match_cpu_workers(checkpoints, write_volume, tmp_path: Path, cluster1) -> None:
    from emseg.cluster import connect

    ckpt = checkpoints(3)
    source = write_volume(smooth_volume((16, 32, 32)), chunks=(8, 16, 16))
    cpu = tmp_path / "cpu.zarr"
    predict(source, cpu, checkpoint=ckpt, block_size=(8, 16, 16), tile_size=(8, 16, 16), dtype="float32",
            precision="fp32", client=cluster1, progress=False)
    gpu = tmp_path / "gpu.zarr"
    with connect("local-gpu") as connection:
        assert connection.resources == {"GPU": 1}
        workers = connection.client.scheduler_info()["workers"].values()
        assert len(workers) == torch.cuda.device_count()
        assert all(w["resources"] == {"GPU": 1} for w in workers)
        devices = connection.client.run(lambda: __import__("os").environ["CUDA_VISIBLE_DEVICES"])
        assert sorted(devices.values()) == [str(i) for i in range(torch.cuda.device_count())]
        predict(source, gpu, checkpoint=ckpt, block_size=(8, 16, 16), tile_size=(8, 16, 16), dtype="float32",
                precision="fp32", client=connection, progress=False)
    np.testing.assert_allclose(open_volume(gpu).array[:], open_volume(cpu).array[:], atol=1e-4)
