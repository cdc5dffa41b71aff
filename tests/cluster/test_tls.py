"""Every Dask cluster emseg starts requires the run's own TLS key pair: another user of the machine
cannot join the scheduler or talk to a worker or nanny.

The intruder is a real second process, run as the unprivileged user ``nobody`` where the tests run
as root (as the same user otherwise: TLS does not care who holds the key).  It tries every port the
run listens on over plain TCP, over TLS with a key pair of its own and over TLS without a
certificate.  The same intruder given the run's key pair does get in and runs code, so a refusal is
the credentials' doing and not, say, a port it could not reach.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import dask
import pytest

from emseg.cluster import connect
from emseg.cluster.tls import private_directory

INTRUDER = r'''
import asyncio, json, os, ssl, sys
from distributed import Client
from distributed.comm import connect
from distributed.security import Security


async def identity(address, args):
    try:
        comm = await connect(address, timeout=10, **args)  # a TLS handshake on a loaded machine can take seconds
    except Exception as e:
        return f"refused ({type(e).__name__}: {str(e)[:200]})"
    try:
        await comm.write({"op": "identity"})
        reply = await asyncio.wait_for(comm.read(), 3)
        return "joined" if isinstance(reply, dict) and "type" in reply else f"refused (reply {reply!r:.80})"
    except Exception as e:
        return f"refused ({type(e).__name__}: {str(e)[:200]})"
    finally:
        comm.abort()


def no_certificate():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return {"ssl_context": ctx}


async def attempts(port, credentials):
    tries = {"tcp": (f"tcp://127.0.0.1:{port}", {}),
             "tls-own-key": (f"tls://127.0.0.1:{port}", Security.temporary().get_connection_args("client")),
             "tls-no-certificate": (f"tls://127.0.0.1:{port}", no_certificate())}
    if credentials:
        tries = {"tls-run-key": (f"tls://127.0.0.1:{port}", credentials.get_connection_args("client"))}
    outcomes = await asyncio.gather(*(identity(address, args) for address, args in tries.values()))
    return dict(zip(tries, outcomes))


async def attack(ports, credentials):  # every port and every way at once: a plain TCP try waits out its timeout
    return dict(zip(ports, await asyncio.gather(*(attempts(p, credentials) for p in ports))))


for line in sys.stdin:
    request = json.loads(line)
    credentials = None
    if request.get("credentials"):
        d = request["credentials"]
        credentials = Security(tls_ca_file=f"{d}/ca.pem", tls_client_cert=f"{d}/cert.pem",
                               tls_client_key=f"{d}/key.pem", require_encryption=True)
    result = {"uid": os.getuid(), "ports": asyncio.run(attack(request["ports"], credentials))}
    if credentials and request.get("scheduler"):
        with Client(request["scheduler"], security=credentials, timeout=10) as client:
            result["scheduler_uid"] = client.run_on_scheduler(os.getuid)
            result["worker_uids"] = sorted(client.run(os.getuid).values())
    print(json.dumps(result), flush=True)
'''


class Intruder:
    """The intruder process (started once, Python and distributed already imported when asked)."""

    def __init__(self, home: Path) -> None:
        prefix: list[str] = []
        if os.geteuid() == 0 and shutil.which("setpriv"):
            nobody = pwd.getpwnam("nobody")
            os.chown(home, nobody.pw_uid, nobody.pw_gid)
            prefix = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "PYTHONWARNINGS": "ignore"}
        self.proc = subprocess.Popen([*prefix, sys.executable, "-c", INTRUDER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=home)

    def attack(self, ports: list[int], credentials: Path | None = None, scheduler: str | None = None) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"ports": ports, "credentials": str(credentials or ""),
                                          "scheduler": scheduler}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.kill()
            pytest.fail(f"the intruder process died: {self.proc.stderr.read() if self.proc.stderr else ''}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def intruder() -> Iterator[Intruder]:
    home = Path(tempfile.mkdtemp(prefix="emseg-intruder-"))  # not under tmp_path: that is private to root
    person = Intruder(home)
    try:
        yield person
    finally:
        person.close()
        shutil.rmtree(home, ignore_errors=True)


def other_uid_expected() -> bool:
    return os.geteuid() == 0 and shutil.which("setpriv") is not None


def port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def assert_all_refused(result: dict) -> None:
    for p, tries in result["ports"].items():
        for how, outcome in tries.items():
            assert outcome.startswith("refused"), f"port {p}, {how}: {outcome}"
    if other_uid_expected():
        assert result["uid"] != 0, "the intruder should have run as another user"


def test_local_cluster_lets_only_the_runs_key_in(intruder: Intruder) -> None:
    with connect(workers=1) as connection:
        client = connection.client
        scheduler = client.scheduler.address
        workers = client.scheduler_info()["workers"]
        addresses = [scheduler, *workers, *(w["nanny"] for w in workers.values())]
        assert all(a.startswith("tls://127.0.0.1:") for a in addresses), addresses
        ports = [port(a) for a in addresses]

        refused = intruder.attack(ports)
        assert_all_refused(refused)

        # control: the same intruder holding the run's key pair gets in and runs code on every server
        security = client.security
        with private_directory(Path(tempfile.gettempdir())) as creds:
            (creds / "ca.pem").write_text(security.tls_ca_file)
            (creds / "cert.pem").write_text(security.tls_client_cert)
            (creds / "key.pem").write_text(security.tls_client_key)
            if other_uid_expected():
                for f in (creds, *creds.iterdir()):
                    os.chown(f, pwd.getpwnam("nobody").pw_uid, -1)
            admitted = intruder.attack(ports, credentials=creds, scheduler=scheduler)
            # --scheduler: joining a TLS cluster with the TLS settings of one's own Dask configuration
            tls = {"distributed.comm.require-encryption": True, "distributed.comm.tls.ca-file": str(creds / "ca.pem"),
                   "distributed.comm.tls.client.cert": str(creds / "cert.pem"),
                   "distributed.comm.tls.client.key": str(creds / "key.pem")}
            with dask.config.set(tls), connect(scheduler=scheduler) as joined:
                assert joined.client.submit(os.getpid, pure=False).result() in client.run(os.getpid).values()
    assert all(outcome == "joined" for tries in admitted["ports"].values() for outcome in tries.values()), admitted
    assert admitted["scheduler_uid"] == os.getuid() and admitted["worker_uids"] == [os.getuid()]


def test_security_false_is_plain_tcp_and_the_scheduler_serves_only_its_health_check(tmp_path: Path) -> None:
    from urllib.error import HTTPError
    from urllib.request import urlopen

    profile = tmp_path / "plain.yaml"
    profile.write_text("kind: local\nworkers: 1\nsecurity: false\n")
    with connect(profile) as connection:
        assert connection.client.scheduler.address.startswith("tcp://127.0.0.1:")
        http = connection.client.scheduler_info()["services"]["dashboard"]
        assert urlopen(f"http://127.0.0.1:{http}/health", timeout=10).read() == b"ok"
        for page in ("info/main/workers.html", "json/counts.json", "metrics"):
            with pytest.raises(HTTPError) as refused:
                urlopen(f"http://127.0.0.1:{http}/{page}", timeout=10)
            assert refused.value.code == 404, page


def listening_ports(pid: int) -> set[int]:
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    pids = {p.pid for p in procs}
    return {c.laddr.port for c in psutil.net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids and c.laddr.ip == "127.0.0.1"}


def tiny_model(root: Path) -> Path:
    """A seeded, untrained 2-D U-Net small enough that the run's time is the cluster's."""
    import torch

    from emseg.models import build
    from emseg.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build("unet", ndim=2, in_channels=1, out_channels=1, base_channels=4, depth=2, padding="valid",
                  batch_norm=False, dropout=0.0)
    save_checkpoint(model, root / "model", normalization={"mean": 0.6, "std": 0.15})
    return root / "model"


@pytest.mark.slow
def test_segment_run_refuses_another_user(intruder: Intruder, tmp_path: Path) -> None:
    """``emseg segment`` with the default cluster: while it runs, every port it listens on refuses the intruder."""
    emseg = [sys.executable, "-c", "from emseg.cli import main; main()"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    volume = tmp_path / "vol.zarr"
    subprocess.run([*emseg, "synth", "--shape", "16,256,256", "--voxel-size", "40,4,4", "--chunks", "4,256,256",
                    "--no-progress", str(volume)], check=True, capture_output=True, env=env, timeout=120)
    proc = subprocess.Popen([*emseg, "segment", str(volume), "-o", str(tmp_path / "seg.zarr"), "--workers", "2",
                             "--model", str(tiny_model(tmp_path)), "--block-size", "4,256,256", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    attacked: set[int] = set()
    results = []
    try:
        while proc.poll() is None:
            ports = listening_ports(proc.pid)
            if len(ports - attacked) and len(ports) >= 5:  # scheduler (+ its health check), 2 nannies, 2 workers
                results.append(intruder.attack(sorted(ports - attacked)))
                attacked |= ports
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert len(attacked) >= 5, f"the run ended before its ports were seen ({sorted(attacked)})"
    for result in results:
        assert_all_refused(result)
    handshakes = [o for r in results for tries in r["ports"].values() for h, o in tries.items() if h == "tls-own-key"]
    assert any("SSL" in o or "certificate" in o.lower() for o in handshakes), handshakes  # TLS servers said no


@pytest.mark.cluster
def test_slurm_cluster_lets_only_the_runs_key_in(slurm: None, intruder: Intruder, tmp_path: Path) -> None:
    """A SLURM run: scheduler and worker refuse the intruder; the workers' copy of the key is private
    to the user while the run lasts and gone after it."""
    import yaml

    from .conftest import TEST_PROFILE, wait_queue_empty

    data = yaml.safe_load(TEST_PROFILE.read_text())
    data["slurm"].update(log_directory=str(tmp_path / "jobs"), maximum_jobs=1)
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump(data))
    with connect(profile) as connection:
        client = connection.client
        workers = client.scheduler_info()["workers"]
        addresses = [client.scheduler.address, *workers]
        assert all(a.startswith("tls://127.0.0.1:") for a in addresses), addresses
        assert_all_refused(intruder.attack([port(a) for a in addresses]))
        (credentials,) = (tmp_path / "jobs").glob(".emseg-tls-*")
        assert credentials.stat().st_mode & 0o777 == 0o700
        files = list(credentials.iterdir())
        assert files and all(f.stat().st_mode & 0o777 == 0o600 for f in files), files
        assert any("PRIVATE KEY" in f.read_text() for f in files)
    assert not credentials.exists()
    assert wait_queue_empty() == []
