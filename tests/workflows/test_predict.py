"""emseg.predict end to end on a real distributed LocalCluster: stitching, bit-identity, resume, bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from emseg.engine.ledger import Ledger
from emseg.errors import (
    ConfigError,
    GeometryError,
    InvalidDataError,
    OutputExistsError,
    ResumeMismatchError,
    VolumeShapeError,
)
from emseg.io import open_volume, read_status
from emseg.models import load_checkpoint
from emseg.workflows.predict import default_checkpoint, plan_prediction, predict
from tests.ops.test_inference import MEAN, STD, whole_volume
from tests.support import smooth_volume


def read_output(path: Path) -> np.ndarray:
    return np.asarray(open_volume(path).array[:])


def test_3d_blockwise_run_equals_whole_volume_and_carries_metadata(checkpoints, write_volume, tmp_path, cluster2):
    ckpt = checkpoints(3)
    data = smooth_volume((22, 24, 26))
    source = write_volume(data, chunks=(8, 8, 8))
    out = tmp_path / "out.zarr"
    report = predict(source, out, checkpoint=ckpt, block_size=(8, 16, 8), tile_size=(8, 8, 8), chunks=(8, 8, 8),
                     dtype="float32", precision="fp32", client=cluster2, progress=False)
    assert (report.blocks, report.computed, report.skipped) == (3 * 2 * 4, 24, 0)
    model = load_checkpoint(ckpt).model
    assert (MEAN, STD) == (0.4, 0.3)  # the fixtures' normalisation
    np.testing.assert_allclose(read_output(out), whole_volume(model, data), rtol=0, atol=1e-5)
    volume = open_volume(out)
    assert volume.axes == ("c", "z", "y", "x") and volume.dtype == np.float32
    assert volume.voxel_size == (40.0, 4.0, 4.0) and volume.offset_nm == (80.0, 8.0, 4.0)
    status = read_status(out)
    assert status["status"] == "complete" and status["source"] == str(source) and status["outputs"] == ["out0"]
    assert status["params"]["model"]["name"] == "unet"


def test_2d_model_runs_per_slice_and_equals_whole_volume(checkpoints, write_volume, tmp_path, cluster2):
    ckpt = checkpoints(2, out_channels=2)
    data = smooth_volume((5, 40, 36))
    source = write_volume(data)
    out = tmp_path / "out.zarr"
    plan = plan_prediction(source, checkpoint=ckpt, block_size=(2, 16, 16), tile_size=(1, 16, 16), chunks=(1, 16, 16))
    assert plan.tiling.input_offset[0] == 0 and len(plan.grid) == 3 * 3 * 3
    predict(source, out, checkpoint=ckpt, block_size=(2, 16, 16), tile_size=(1, 16, 16), chunks=(1, 16, 16),
            dtype="float32", precision="fp32", client=cluster2, progress=False)
    model = load_checkpoint(ckpt).model
    np.testing.assert_allclose(read_output(out), whole_volume(model, data), rtol=0, atol=1e-5)


def test_output_is_bit_identical_across_block_sizes_and_worker_counts(checkpoints, write_volume, tmp_path,
                                                                       cluster1, cluster2):
    ckpt = checkpoints(2, padding="same")
    source = write_volume(smooth_volume((6, 48, 40), seed=3))
    common = dict(checkpoint=ckpt, tile_size=(1, 16, 16), chunks=(2, 16, 8), progress=False, batch_size=3)
    runs = [((2, 16, 16), cluster2), ((4, 32, 16), cluster2), ((2, 16, 16), cluster1), ((6, 48, 48), cluster1)]
    outputs = []
    for i, (block, connection) in enumerate(runs):
        out = tmp_path / f"out{i}.zarr"
        predict(source, out, block_size=block, client=connection, **common)
        outputs.append(read_output(out))
    assert outputs[0].dtype == np.uint8 and outputs[0].std() > 0
    for other in outputs[1:]:
        np.testing.assert_array_equal(outputs[0], other)


def _runs_at(ckpt: Path, nm: float, dest: Path) -> Path:
    """A copy of checkpoint ``ckpt`` whose model runs at ``nm`` in y and x (``run_voxel_size_nm``)."""
    import json
    import shutil

    shutil.copytree(ckpt, dest)
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, "run_voxel_size_nm": nm}))
    return dest


def test_a_model_that_runs_at_a_coarser_voxel_size_sees_downsampled_sections(checkpoints, write_volume, tmp_path,
                                                                             cluster2):
    from emseg.ops.inference import downsample_sections

    ckpt = _runs_at(checkpoints(2), 8.0, tmp_path / "at8nm")
    data = smooth_volume((3, 50, 42), seed=5)
    source = write_volume(data)  # 40 x 4 x 4 nm: the model sees 2 x 2 means
    common = dict(checkpoint=ckpt, tile_size=(1, 32, 32), chunks=(1, 16, 16), dtype="float32", precision="fp32",
                  client=cluster2, progress=False)
    plan = plan_prediction(source, checkpoint=ckpt, block_size=(2, 32, 32), tile_size=(1, 32, 32), chunks=(1, 16, 16))
    assert plan.downsample == 2 and plan.tiling.volume_shape == (3, 25, 21)
    assert plan.grid.block_shape == (2, 32, 32) and plan.chunks == (1, 16, 16)
    outputs = []
    for i, block in enumerate([(2, 32, 32), (3, 64, 64)]):
        out = tmp_path / f"out{i}.zarr"
        predict(source, out, block_size=block, **common)
        outputs.append(read_output(out))
    assert outputs[0].shape == (1, 3, 50, 42)
    np.testing.assert_array_equal(outputs[0], outputs[1])  # the blocks change nothing
    # Each voxel holds the model's output on the coarse section at the coarse voxel it lies in.  Away from the
    # borders (where the volume's mirror and the coarse one differ) that is the whole coarse section's output.
    coarse = whole_volume(load_checkpoint(ckpt).model, downsample_sections(data, 2))
    (hy, hx), (cy, cx) = plan.tiling.halo[0][1:], coarse.shape[-2:]
    inner = (slice(None), slice(None), slice(hy, cy - hy), slice(hx, cx - hx))
    fine = outputs[0][..., ::2, ::2]
    np.testing.assert_allclose(fine[inner], coarse[inner], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(outputs[0][..., 1::2, 1::2], fine[..., : 25, : 21])

    native = tmp_path / "native.zarr"
    predict(source, native, block_size=(2, 32, 32), downsample=1, **common)
    assert np.abs(read_output(native) - outputs[0]).max() > 0.01
    with pytest.raises(ConfigError, match="multiple of the model's in-plane downsampling 2"):
        plan_prediction(source, checkpoint=ckpt, block_size=(2, 33, 32))
    unknown = write_volume(data, name="unknown.zarr", voxel_size=(1.0, 1.0, 1.0))
    assert plan_prediction(unknown, checkpoint=ckpt).downsample == 1  # no voxel size: the volume's own voxels
    at10 = write_volume(data, name="at10.zarr", voxel_size=(10.0, 10.0, 10.0))
    assert plan_prediction(at10, checkpoint=ckpt).downsample == 1  # coarser than the model: as it is


def _count_opens() -> None:
    """Worker side: count emseg.io.open_volume calls (a wrapper around the real function)."""
    import emseg.io

    real = getattr(emseg.io.open_volume, "real", emseg.io.open_volume)

    def counted(*args, **kwargs):
        counted.calls.append(str(args[0]))  # type: ignore[attr-defined]
        return real(*args, **kwargs)

    counted.calls = []  # type: ignore[attr-defined]
    counted.real = real  # type: ignore[attr-defined]
    emseg.io.open_volume = counted


def _opens_and_restore() -> list[str]:
    import emseg.io

    calls = list(emseg.io.open_volume.calls)
    emseg.io.open_volume = emseg.io.open_volume.real
    return calls


def test_a_worker_opens_each_volume_once_per_run(checkpoints, write_volume, tmp_path, cluster2):
    """Opening a volume reads and checks its metadata (~3-4 ms on a local disk): a worker keeps
    the input and output it opened for the run instead of reopening them for every block, and a new
    run (here: over the same paths, overwritten) opens them afresh."""
    ckpt = checkpoints(2)
    source = write_volume(smooth_volume((8, 40, 36)))
    out = tmp_path / "out.zarr"
    common = dict(checkpoint=ckpt, block_size=(1, 16, 16), tile_size=(1, 16, 16), chunks=(1, 16, 16), progress=False,
                  client=cluster2, overwrite=True)
    for _ in range(2):
        cluster2.client.run(_count_opens)
        report = predict(source, out, **common)
        opens = cluster2.client.run(_opens_and_restore)
        assert report.computed == 8 * 3 * 3
        for calls in opens.values():  # 72 blocks on 2 workers
            assert sorted(calls) == sorted([str(source.resolve()), str(out.resolve())]), calls
        assert read_output(out).std() > 0


def test_rerun_resumes_and_other_parameters_are_refused(checkpoints, write_volume, tmp_path, cluster2):
    ckpt = checkpoints(2)
    source = write_volume(smooth_volume((4, 32, 32), seed=4))
    out = tmp_path / "out.zarr"
    args = dict(checkpoint=ckpt, block_size=(1, 32, 32), tile_size=(1, 16, 16), progress=False, client=cluster2)
    first = predict(source, out, **args)
    expected = read_output(out)
    # forget two blocks, as if the run had been killed before they finished
    markers = zarr.open_array(str(Ledger(out, "predict").path), mode="r+")
    markers[1] = ""
    markers[3] = ""
    zarr.open_array(str(out / "0"), mode="r+")[:, 1] = 0
    again = predict(source, out, **args)
    assert (first.computed, again.computed, again.skipped) == (4, 2, 2)
    np.testing.assert_array_equal(read_output(out), expected)
    assert predict(source, out, **args).computed == 0
    with pytest.raises(ResumeMismatchError, match=r"differs in: batch_size"):
        predict(source, out, batch_size=2, **args)
    with pytest.raises(ResumeMismatchError, match=r"differs in: checkpoint_sha256"):
        predict(source, out, **{**args, "checkpoint": checkpoints(2, seed=1)})
    assert predict(source, out, batch_size=2, overwrite=True, **args).computed == 4


def test_nan_in_float_input_is_an_invalid_data_error(checkpoints, write_volume, tmp_path, cluster2):
    data = smooth_volume((2, 32, 32), dtype="float32")
    data[1, 20, 20] = np.nan
    source = write_volume(data)
    out = tmp_path / "out.zarr"
    with pytest.raises(InvalidDataError, match=r"block 1 .* NaN/inf voxel.*other blocks are kept"):
        predict(source, out, checkpoint=checkpoints(2), block_size=(1, 32, 32), tile_size=(1, 16, 16),
                client=cluster2, progress=False)
    assert Ledger(out, "predict").done().keys() == {0}
    assert read_status(out)["status"] == "incomplete"


def test_an_unreadable_chunk_is_an_invalid_data_error(checkpoints, write_volume, tmp_path, cluster2):
    source = write_volume(smooth_volume((2, 32, 32)))
    chunk = source / "0" / "c" / "0" / "1" / "0"
    assert chunk.is_file()
    chunk.write_bytes(b"not a blosc frame")
    with pytest.raises(InvalidDataError, match=r"cannot read"):
        predict(source, tmp_path / "out.zarr", checkpoint=checkpoints(2), block_size=(1, 32, 32),
                tile_size=(1, 16, 16), client=cluster2, progress=False)


def test_model_channels_must_match_the_volume(checkpoints, write_volume):
    source = write_volume(np.stack([smooth_volume((2, 32, 32))] * 2))
    with pytest.raises(VolumeShapeError, match=r"has 2 channel\(s\) but the model .* expects 1"):
        plan_prediction(source, checkpoint=checkpoints(2))
    plan = plan_prediction(source, checkpoint=checkpoints(2, in_channels=2))
    assert plan.out_channels == 1


def test_block_smaller_than_a_tile_is_refused(checkpoints, write_volume):
    source = write_volume(smooth_volume((4, 64, 64)))
    with pytest.raises(GeometryError, match=r"smaller than the model's tile core \(1, 32, 32\)"):
        plan_prediction(source, checkpoint=checkpoints(2), tile_size=(1, 32, 32), block_size=(1, 16, 16))
    with pytest.raises(GeometryError, match=r"not a multiple of the output chunk shape"):
        plan_prediction(source, checkpoint=checkpoints(2), tile_size=(1, 16, 16), block_size=(1, 48, 48),
                        chunks=(1, 32, 32))


def test_volume_smaller_than_the_context_is_refused(checkpoints, write_volume):
    source = write_volume(smooth_volume((4, 64, 64)))
    with pytest.raises(GeometryError, match=r"too small for the model.*axes \[0\]"):
        plan_prediction(source, checkpoint=checkpoints(3))


def test_small_volume_gets_one_clipped_tile(checkpoints, write_volume):
    source = write_volume(smooth_volume((3, 21, 30)))
    plan = plan_prediction(source, checkpoint=checkpoints(2))
    assert plan.tiling.tile_shape == (1, 24, 32) and len(plan.grid) == 1 and plan.chunks == (3, 21, 30)


def test_logits_need_a_float_output_and_options_are_checked(checkpoints, write_volume):
    source = write_volume(smooth_volume((2, 32, 32)))
    with pytest.raises(ConfigError, match="raw logits"):
        plan_prediction(source, checkpoint=checkpoints(2, activation="none"))
    assert plan_prediction(source, checkpoint=checkpoints(2, activation="none"), dtype="float16").dtype == "float16"
    with pytest.raises(ConfigError, match="--batch-size"):
        plan_prediction(source, checkpoint=checkpoints(2), batch_size=0)


def test_existing_foreign_output_and_missing_bundled_model(checkpoints, write_volume, tmp_path, monkeypatch):
    source = write_volume(smooth_volume((2, 32, 32)))
    other = write_volume(smooth_volume((2, 32, 32)), name="other.zarr")
    with pytest.raises(OutputExistsError, match="not an emseg prediction"):
        predict(source, other, checkpoint=checkpoints(2), progress=False)
    # where the plan looks for the bundled models
    monkeypatch.setattr(sys.modules["emseg.workflows.predict.plan"], "BUNDLED", tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="no --model given and no bundled model installed"):
        default_checkpoint()


def test_dry_run_plans_without_writing(checkpoints, write_volume, tmp_path):
    source = write_volume(smooth_volume((6, 64, 64)))
    out = tmp_path / "out.zarr"
    report = predict(source, out, checkpoint=checkpoints(2), tile_size=(1, 32, 32), block_size=(2, 64, 32),
                     tta=True, dry_run=True)
    assert report.dry_run and not out.exists()
    plan = report.plan
    assert len(plan.grid) == 6 and plan.tiles == 6 * 2 * 2
    # 4 tiles of 72x72 input per block (batch 4), 4 flips
    assert plan.computed_voxels == 6 * 4 * 72 * 72 * 4 and plan.output_voxels == 6 * 64 * 64
    text = report.summary()
    for word in ("blocks     6", "halo       0x20x20", "computed", "MiB per block"):
        assert word in text


def _peak_rss(client) -> int:
    def peak() -> int:
        # VmHWM: this process's own high-water mark (ru_maxrss would include the parent's RSS at fork)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    return max(client.run(peak).values())


@pytest.mark.slow
def test_worker_peak_memory_does_not_grow_with_the_volume(checkpoints, write_volume):
    from emseg.cluster import connect

    ckpt = checkpoints(2)
    peaks = []
    for factor, shape in ((1, (2, 128, 128)), (8, (4, 256, 256))):
        source = write_volume(smooth_volume(shape, seed=factor), name=f"vol{factor}.zarr")
        with connect(workers=1) as connection:
            predict(source, source.with_name(f"out{factor}.zarr"), checkpoint=ckpt, block_size=(2, 128, 128),
                    tile_size=(1, 64, 64), client=connection, progress=False)
            peaks.append(_peak_rss(connection.client))
    assert peaks[1] < 1.5 * peaks[0], peaks


def test_the_plan_resolves_every_option_and_fingerprints_their_dump(checkpoints, write_volume):
    from emseg.config import PredictOptions

    source = write_volume(smooth_volume((4, 64, 64)))
    options = PredictOptions(tile_size=(1, 32, 32), dtype="float16")
    plan = plan_prediction(source, options, checkpoint=checkpoints(2), batch_size=2)
    resolved = plan.options
    assert all(getattr(resolved, name) is not None for name in PredictOptions.model_fields)  # no default left open
    assert resolved.precision != "auto" and resolved.batch_size == 2 and resolved.dtype == "float16"
    assert resolved.block_size == plan.grid.block_shape and resolved.tile_size == plan.tiling.tile_shape
    fingerprint = resolved.fingerprint()
    assert {k: plan.params[k] for k in fingerprint} == fingerprint  # params = the resolved options' dump + facts
    # the same run from keywords alone, and from the resolved options: the same params (a rerun resumes)
    assert plan_prediction(source, checkpoint=checkpoints(2), tile_size=(1, 32, 32), dtype="float16",
                           batch_size=2).params == plan.params
    assert plan_prediction(source, resolved).params == plan.params


def test_cpu_default_batch_is_one_2d_tile(write_volume):
    """On a CPU one 604^2 tile per pass ran 1.5x the voxels/s of two (cache): the automatic batch is 1 there."""
    from emseg.workflows.predict import BUNDLED

    source = write_volume(smooth_volume((4, 1024, 1024)))  # 4 nm: the bundled model sees 512^2 sections at 8 nm
    plan = plan_prediction(source, checkpoint=BUNDLED, device="cpu")
    assert plan.downsample == 2 and plan.tiling.input_shape[1:] == (604, 604) and plan.options.batch_size == 1


@pytest.mark.parametrize(("shape", "input_chunks", "depth"), [
    ((256, 1024, 1024), (32, 256, 256), 32),  # `emseg import`'s chunks: one block per chunk in z
    ((128, 1024, 1024), (32, 256, 256), 16),  # 32-deep blocks would leave 16: the deepest divisor that leaves 32
    ((32, 1024, 1024), (32, 256, 256), 4),    # a small volume keeps many small blocks, for the balance
    ((256, 1024, 1024), (1, 1024, 1024), 4),  # section-wise chunks: the default depth
])
def test_2d_blocks_follow_the_input_z_chunks(checkpoints, tmp_path, shape, input_chunks, depth):
    """A 4-section block of a 32-deep chunked input decompressed each chunk 8 times; blocks as deep as
    the chunks (while 32 blocks are left, for the balance between workers) decompress it once.  The values do not
    depend on the block shape (the tiles are on one global grid: see the whole-volume tests above)."""
    from emseg.io import create_volume, mark_complete

    source = tmp_path / "vol.zarr"
    create_volume(source, shape=shape, dtype="uint8", chunks=input_chunks, voxel_size=(40.0, 4.0, 4.0))
    mark_complete(source)  # planning reads no voxels: an empty store will do
    plan = plan_prediction(source, checkpoint=checkpoints(2), device="cpu")
    assert plan.grid.block_shape == (depth, 512, 512) and plan.chunks == (4, 256, 256)
    assert len(plan.grid) >= 32
    assert plan_prediction(source, checkpoint=checkpoints(2), device="cpu",
                           block_size=(4, 512, 512)).grid.block_shape == (4, 512, 512)  # an explicit block wins
