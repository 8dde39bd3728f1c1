"""Storage requests and wall time of an idle tick, by number of sites and backend.

An idle tick is what cron runs most of the time: nothing to do but look. Two states,
on the numpy federation of tests/factory.py (the real protocol without nnU-Net):
- waiting:  asym, every site but the last has committed round 1 and waits for it;
- finished: every site has finished (the tick only confirms it).
Each measured tick runs in a fresh process, as cron runs it; storage requests
(get, exists, list, put) are counted inside that process. Backends: a local folder
and the S3-protocol server of the tests (moto, on loopback).

    python benchmarks/idle_requests.py [--sites 3 5 10] [--backends local s3] [--ticks 3]

To measure another checkout (say, the previous protocol), run this script with
PYTHONPATH=<checkout>:<checkout>/tests: the federation and the ticks then come from it."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
if str(TESTS) not in sys.path:
    sys.path.append(str(TESTS))

import factory  # noqa: E402  (tests/factory.py of the checkout on PYTHONPATH)

# One tick of `site`, with every storage request counted (printed to stderr as JSON).
PROBE = """
import collections, json, sys, time
from p2pfed import storage
counts = collections.Counter()
for name in ("get", "exists", "list_prefix", "put_new"):
    def wrap(fn, name=name):
        def counted(self, *a, **k):
            counts[name] += 1
            return fn(self, *a, **k)
        return counted
    setattr(storage.Storage, name, wrap(getattr(storage.Storage, name)))
import factory
started = time.perf_counter()
factory.main(sys.argv[1], sys.argv[2])
print(json.dumps({"counts": counts, "tick_s": time.perf_counter() - started}), file=sys.stderr)
"""


def s3_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(TESTS / "s3_server.py")], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    endpoint = f"http://127.0.0.1:{int(proc.stdout.readline())}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_ENDPOINT_URL=endpoint,
                      AWS_DEFAULT_REGION="us-east-1")
    return proc, endpoint


def storage_url(backend: str, root: Path, endpoint: str | None) -> str | None:
    if backend == "local":
        return None
    import boto3

    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/fed"


def federation(state: str, n: int, backend: str, endpoint: str | None) -> factory.Fed:
    root = Path(tempfile.mkdtemp(prefix=f"p2pfed-idle-{state}-{n}-"))
    fed = factory.make(root, storage_url(backend, root, endpoint), n=n, endpoint=endpoint, mode="asym", rounds=2)
    if state == "finished":
        fed.run_all()
    elif state == "in round":  # every site but the last committed round 1: the state cron sees most
        for site in fed.sites * 3:
            fed.run(site, stop_after="plan")
        for site in fed.sites[:-1]:
            fed.run(site)
    else:  # waiting for the last site's first tick (its case-count declaration)
        for site in fed.sites[:-1]:
            fed.run(site)
    return fed


def idle_ticks(fed: factory.Fed, site: str, ticks: int) -> dict:
    walls, inside, requests = [], [], None
    for _ in range(ticks):
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", PROBE, str(fed.home), site], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, cwd=fed.root, check=True)
        walls.append(time.perf_counter() - started)
        probe = json.loads(proc.stderr.strip().splitlines()[-1])
        inside.append(probe["tick_s"])
        report = json.loads(proc.stdout)
        assert not report["actions"], f"not an idle tick: {report['actions']}"
        requests = probe["counts"]
    return {"requests": sum(requests.values()), "by_kind": dict(requests),
            "wall_s": round(statistics.median(walls), 3), "tick_s": round(statistics.median(inside), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, nargs="+", default=[3, 5, 10])
    ap.add_argument("--backends", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    ap.add_argument("--ticks", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    server, endpoint = s3_server() if "s3" in args.backends else (None, None)
    rows = []
    try:
        for backend in args.backends:
            for n in args.sites:
                for state in ("waiting", "in round", "finished"):
                    fed = federation(state, n, backend, endpoint if backend == "s3" else None)
                    rows.append({"backend": backend, "sites": n, "state": state,
                                 **idle_ticks(fed, fed.sites[0], args.ticks)})
    finally:
        if server:
            server.kill()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'backend':8} {'sites':>5} {'state':9} {'requests':>8} {'tick s':>7} {'wall s':>7}  by kind")
    for r in rows:
        print(f"{r['backend']:8} {r['sites']:>5} {r['state']:9} {r['requests']:>8} {r['tick_s']:>7} {r['wall_s']:>7}  "
              f"{r['by_kind']}")


if __name__ == "__main__":
    main()
