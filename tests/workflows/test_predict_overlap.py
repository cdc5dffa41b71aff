"""Two blocks per GPU worker (I/O of one overlaps the other's forward pass): same output as one at a time.

Runs without a GPU: a CPU LocalCluster whose worker advertises the resource ``GPU=1`` and has two
threads stands in for a GPU worker; predict then asks for half a GPU per block.
"""

from __future__ import annotations

import numpy as np

from emseg.io import open_volume
from emseg.workflows.predict import predict
from tests.support import smooth_volume


def test_two_blocks_per_gpu_worker_give_the_same_output(checkpoints, write_volume, tmp_path, cluster2) -> None:
    from distributed import Client, LocalCluster, get_task_stream

    from emseg.cluster import Connection

    ckpt = checkpoints(2, padding="same")
    source = write_volume(smooth_volume((8, 48, 40), seed=5), chunks=(1, 16, 16))
    common = dict(checkpoint=ckpt, tile_size=(1, 16, 16), block_size=(1, 16, 16), chunks=(1, 16, 16),
                  batch_size=2, progress=False)
    # one block at a time on each worker: the session's cluster, whose two worker processes have one thread each
    predict(source, tmp_path / "one.zarr", client=cluster2, **common)
    with LocalCluster(n_workers=1, threads_per_worker=2, resources={"GPU": 1}, dashboard_address=None,
                      host="127.0.0.1", scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"}
                      ) as cluster, Client(cluster) as client:
        with get_task_stream(client) as stream:
            report = predict(source, tmp_path / "two.zarr", client=Connection(client, {"GPU": 1}, 2), **common)
    assert report.computed == 8 * 3 * 3
    # the same prediction within one uint8 step: another thread layout may sum in another order
    two = open_volume(tmp_path / "two.zarr").array[:].astype(int)
    np.testing.assert_allclose(two, open_volume(tmp_path / "one.zarr").array[:].astype(int), rtol=0, atol=1)
    spans = sorted((s["start"], s["stop"]) for t in stream.data for s in t["startstops"] if s["action"] == "compute")
    assert len(spans) > 1
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:]))  # two blocks were in flight at once on the one worker
