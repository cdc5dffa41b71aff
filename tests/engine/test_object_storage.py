"""Outputs on object storage: a real S3 server (moto, server mode) on 127.0.0.1, reached through
AWS_ENDPOINT_URL like any S3-compatible endpoint."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import s3fs
import tifffile
from click.testing import CliRunner

from emseg.cli import cli
from emseg.engine import lock, objectlock
from emseg.errors import IncompleteOutputError, OutputInUseError, VolumeNotFoundError
from emseg.io import create_volume, mark_complete, open_volume, read_status
from tests.conftest import tree_digest

ROOT = Path(__file__).resolve().parents[2]


def _fs() -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def _put_lock(url: str, record: dict) -> None:
    _fs().pipe_file(objectlock.lock_url(url)[len("s3://"):], json.dumps(record).encode())


def test_object_lock_excludes_a_live_run_and_takes_over_a_dead_one(s3_bucket: str) -> None:
    out = f"{s3_bucket}/out.zarr"
    key = objectlock.lock_url(out)
    assert key == f"{out}/.emseg-lock"  # inside the output: nothing is written beside it
    # a live run on another host, heartbeat fresh: refused, naming the lock object
    _put_lock(out, {"host": "node-7", "pid": 123, "command": "segment", "token": "x", "since": time.time()})
    with pytest.raises(OutputInUseError, match=r"pid 123 on node-7.*\.emseg-lock"):
        lock.acquire(out, "predict")
    # ... until its heartbeat is older than stale_s (by the store's clock)
    time.sleep(2.5)  # LastModified and Date have whole seconds
    lock.acquire(out, "predict", stale_s=1.0)
    mine = json.loads(_fs().cat_file(key[len("s3://"):]))
    assert mine["pid"] == os.getpid() and mine["host"] == socket.gethostname()
    lock.acquire(out, "label")  # re-entrant in the process
    lock.release(out)
    assert _fs().exists(key[len("s3://"):])
    lock.release(out)
    assert not _fs().exists(key[len("s3://"):])
    # a run of this host that was killed (its pid is gone): taken over at once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _put_lock(out, {"host": socket.gethostname(), "pid": dead.pid, "command": "segment", "token": "y",
                    "since": time.time()})
    lock.acquire(out, "segment")
    lock.release(out)


def test_two_takers_of_one_lock_object_get_one_lock(s3_bucket: str) -> None:
    """If-None-Match: the second PUT of a lock that exists fails even when both raced past a read."""
    out = f"{s3_bucket}/race.zarr"
    fs, bucket, key = objectlock._client(objectlock.lock_url(out))
    first = objectlock._call(fs, "put_object", out, Bucket=bucket, Key=key, Body=b"{}", IfNoneMatch="*")
    second = objectlock._call(fs, "put_object", out, Bucket=bucket, Key=key, Body=b"{}", IfNoneMatch="*")
    assert first is not None and second is None
    stale = objectlock._call(fs, "put_object", out, Bucket=bucket, Key=key, Body=b"{}", IfMatch='"0000"')
    assert stale is None  # a takeover on an ETag that changed meanwhile loses


def _tif(tmp_path: Path) -> Path:
    path = tmp_path / "x.tif"
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 255, (4, 32, 32), dtype=np.uint8), photometric="minisblack")
    return path


def test_import_to_s3_writes_only_inside_the_output(s3_bucket: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    tif = _tif(tmp_path)
    url = f"{s3_bucket}/x.zarr"
    result = CliRunner().invoke(cli, ["import", str(tif), url, "--voxel-size", "50,4,4", "--no-progress"])
    assert result.exit_code == 0, result.output
    volume = open_volume(url)
    assert np.array_equal(volume.read(volume.roi), tifffile.imread(tif)) and volume.voxel_size == (50.0, 4.0, 4.0)
    keys = _fs().find(s3_bucket[len("s3://"):])
    assert keys and all(k.startswith(url[len("s3://"):] + "/") for k in keys)
    assert not any(k.endswith(".emseg-lock") for k in keys)  # released
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.tif"]  # no local "s3:" folder
    again = CliRunner().invoke(cli, ["import", str(tif), url, "--no-progress"])
    assert again.exit_code == 1 and "already exists" in again.stderr


def _segment(args: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", "from emseg.cli import main; main()", "segment", *args, "--workers", "1",
                             "--block-size", "1,256,256", "--no-progress"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


@pytest.mark.slow
def test_segment_s3_to_s3_matches_local_and_resumes_after_sigkill(s3_bucket: str, shared_data: Path,
                                                                  tmp_path: Path) -> None:
    raw = tifffile.imread(shared_data / "isbi2012" / "test-volume.tif")[:2, :256, :256]  # 2 blocks to predict, then the labelling stages
    local_in = tmp_path / "in.zarr"
    volume = create_volume(local_in, shape=raw.shape, dtype="uint8", chunks=(2, 64, 64), voxel_size=(50, 4, 4))
    volume.write(volume.roi, raw)
    mark_complete(local_in)
    fs = _fs()
    bucket = s3_bucket[len("s3://"):]
    fs.put(str(local_in), f"{bucket}/in.zarr", recursive=True)
    inputs = {k: fs.info(k)["ETag"] for k in fs.find(f"{bucket}/in.zarr")}

    # the local run (the reference) beside the first bucket run, which is killed once it writes
    local = _segment([str(local_in), "-o", str(tmp_path / "out.zarr")], tmp_path)
    out = f"{s3_bucket}/out.zarr"
    work = tmp_path / "cwd"
    work.mkdir()
    first = _segment([f"{s3_bucket}/in.zarr", "-o", out], work)
    deadline = time.monotonic() + 600
    while not fs.find(f"{bucket}/out.zarr/0/c"):  # killed once prediction chunks are being written
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert fs.exists(f"{bucket}/out.zarr/.emseg-lock")  # the dead run's lock is left behind: it died mid-run
    # the segments, the run's last stage, are never taken for finished; the prediction is refused as well,
    # unless its 2 blocks were done before the kill landed (the poll above takes up to half a second)
    with pytest.raises((IncompleteOutputError, VolumeNotFoundError)):
        open_volume(f"{out}/labels/segments")
    if read_status(out).get("status") != "complete":
        with pytest.raises(IncompleteOutputError, match="half-written"):
            open_volume(out)

    assert local.wait(timeout=900) == 0, local.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
    second = _segment([f"{s3_bucket}/in.zarr", "-o", out], work)
    assert second.wait(timeout=900) == 0, second.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
    assert "took over the lock" in second.stderr.read().decode()  # type: ignore[union-attr]

    expected = open_volume(tmp_path / "out.zarr" / "labels" / "segments")
    got = open_volume(f"{out}/labels/segments")
    assert np.array_equal(got.read(got.roi), expected.read(expected.roi))
    assert got.voxel_size == (50.0, 4.0, 4.0)
    keys = fs.find(bucket)
    assert all(k.startswith((f"{bucket}/in.zarr/", f"{bucket}/out.zarr/")) for k in keys)
    assert {k: fs.info(k)["ETag"] for k in keys if k.startswith(f"{bucket}/in.zarr/")} == inputs  # input untouched
    assert not any(k.endswith(".emseg-lock") for k in keys)
    assert list(work.iterdir()) == []  # nothing written locally


def test_a_missing_bucket_or_an_unreachable_endpoint_is_one_error_line(s3_endpoint: str, make_volume,
                                                                        tmp_path: Path, monkeypatch) -> None:
    volume = make_volume(shape=(2, 64, 64), chunks=(1, 64, 64))
    before = tree_digest(volume)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    missing = CliRunner().invoke(cli, ["segment", str(volume), "-o", "s3://no-such-bucket/out.zarr", "--no-progress"])
    assert missing.exit_code == 1 and missing.stderr.count("\n") == 1, missing.output
    assert missing.stderr.startswith("Error: s3://no-such-bucket/out.zarr") and "no such bucket" in missing.stderr
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "PYTHONPATH": str(ROOT)}
    unreachable = subprocess.run([sys.executable, "-c", "from emseg.cli import main; main()", "segment", str(volume),
                                  "-o", "s3://bucket/out.zarr", "--no-progress"], env=env, capture_output=True, text=True,
                                 timeout=300)
    assert unreachable.returncode == 1 and unreachable.stderr.count("\n") == 1, unreachable.stderr[-2000:]
    assert unreachable.stderr.startswith("Error: s3://bucket/out.zarr") and "connect" in unreachable.stderr
    assert list(work.iterdir()) == [] and tree_digest(volume) == before  # nothing written here, the input untouched


def test_a_read_only_bucket_is_one_error_line_and_nothing_is_written(s3_bucket: str, make_volume,
                                                                     tmp_path: Path) -> None:
    """Credentials that may read the bucket but not write it (an IAM policy the S3 server enforces)."""
    import boto3
    import moto.settings

    bucket = s3_bucket[len("s3://"):]
    iam = boto3.client("iam")
    user = f"reader-{bucket}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="read-only", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"],
                                               "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    volume = make_volume(shape=(2, 64, 64), chunks=(1, 64, 64))
    before = tree_digest(volume)
    work = tmp_path / "cwd"
    work.mkdir()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
           "PYTHONPATH": str(ROOT)}
    saved = moto.settings.INITIAL_NO_AUTH_ACTION_COUNT
    moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # the in-process server checks signatures and policies from now
    try:
        result = subprocess.run([sys.executable, "-c", "from emseg.cli import main; main()", "segment", str(volume),
                                 "-o", f"{s3_bucket}/out.zarr", "--no-progress"], env=env, capture_output=True,
                                text=True, cwd=work, timeout=300)
    finally:
        moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = saved
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert result.stderr.startswith(f"Error: {s3_bucket}/out.zarr") and "read-only" in result.stderr, result.stderr
    assert _fs().find(bucket) == []  # nothing written in the bucket, nothing here, the input untouched
    assert list(work.iterdir()) == [] and tree_digest(volume) == before
