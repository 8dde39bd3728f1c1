"""Shared fixtures: two real S3 servers on loopback (moto's, and SeaweedFS, a production
object store), storage backends, site homes."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).parent

# The suite runs in two xdist workers on two cores, and nnU-Net in their child processes:
# with torch's default of a thread per core each, epochs ran several times slower than with
# one thread per process (measured with benchmarks/quality.py, which does the same).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def s3_endpoint():
    """Start the loopback S3 server once per session; set AWS_* for this process and children."""
    proc = subprocess.Popen([sys.executable, str(HERE / "s3_server.py")], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    port = int(proc.stdout.readline())
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1")
    yield endpoint
    proc.kill()
    proc.wait()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def seaweedfs():
    """A real SeaweedFS (`weed server`: master, volume, filer, S3 gateway) on free loopback
    ports for the session; SIGKILLed and its data folder deleted at the end."""
    import seaweed

    weed = seaweed.server()
    yield weed.endpoint
    weed.stop()


@pytest.fixture
def on_seaweedfs(seaweedfs, monkeypatch):
    """Point this test (and the processes it starts) at SeaweedFS instead of moto."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweedfs)
    return seaweedfs


def new_bucket(endpoint: str) -> str:
    import boto3

    name = f"p2pfed-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}/fed"


S3_SERVERS = {"moto": "s3_endpoint", "seaweedfs": "on_seaweedfs"}  # param -> fixture giving its endpoint


@pytest.fixture(params=["local", *S3_SERVERS])
def storage_url(request, tmp_path):
    """A fresh, empty storage location on each backend; AWS_ENDPOINT_URL points at its server."""
    if request.param == "local":
        return str(tmp_path / "shared")
    return new_bucket(request.getfixturevalue(S3_SERVERS[request.param]))


@pytest.fixture(params=list(S3_SERVERS))
def s3_server(request):
    """The endpoint of each real S3 server in turn (moto, SeaweedFS), AWS_* set for it."""
    return request.getfixturevalue(S3_SERVERS[request.param])
