"""Soak: many federations, each tick killed with SIGKILL at a random moment (or right after
a random storage write), optionally through the fault-injecting S3 proxy. Every next
tick must recover; at the end `verify` must pass and all sites must hold the same final
model. Prints figures; asserts nothing beyond those invariants.

Uses the nnU-Net-free federation of tests/factory.py (the real protocol, numpy models).

    python benchmarks/soak.py --runs 20 --sites 3 --rounds 3 [--s3 --fault-rate 0.1]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

import factory  # noqa: E402
from p2pfed import node  # noqa: E402
from p2pfed.verify import verify_storage  # noqa: E402


def tick(fed, site: str, env: dict, kill_after: float | None) -> int:
    proc = subprocess.Popen([sys.executable, str(TESTS / "factory.py"), str(fed.home), site],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return -9
    if proc.returncode == 0 and json.loads(out)["finished"]:
        return 1
    if proc.returncode not in (0, -9):
        raise SystemExit(f"tick of {site} failed ({proc.returncode}): {err.strip().splitlines()[-1:]}")
    return proc.returncode


def one_run(root: Path, args, rng: random.Random, url: str | None, endpoint: str | None) -> Counter:
    fed = factory.make(root, url, n=args.sites, endpoint=endpoint, rounds=args.rounds)
    stats, finished = Counter(), set()
    while finished != set(fed.sites):
        for site in fed.sites:
            if site in finished:
                continue
            env, kill_after = dict(os.environ), None
            if rng.random() < args.kill_rate:
                if rng.random() < 0.5:
                    env["P2PFED_CRASH_AT"] = f"write:{rng.randint(1, 4)}"
                else:
                    kill_after = rng.uniform(0.05, args.max_delay)
            started = time.monotonic()
            rc = tick(fed, site, env, kill_after)
            stats["tick_s"] += time.monotonic() - started
            stats["ticks"] += 1
            stats["killed"] += rc == -9
            if rc == 1:
                finished.add(site)
        if stats["ticks"] > 400 * args.sites:
            raise SystemExit("no progress: the federation did not finish")
    home, _, view = node.open_site(fed.home, fed.sites[0])
    bad = [f for f in verify_storage(view, home.identity()) if not f.ok]
    models = {json.loads((fed.home / "sites" / s / "state.json").read_text())["final_model"] for s in fed.sites}
    if bad or len(models) != 1:
        raise SystemExit(f"invariant broken in {root}: {len(bad)} bad objects, {len(models)} final models")
    stats["objects"] = len(factory.keys(fed))
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kill-rate", type=float, default=0.5, help="share of ticks that are killed")
    parser.add_argument("--max-delay", type=float, default=1.5, help="latest random kill, seconds into a tick")
    parser.add_argument("--s3", action="store_true", help="the S3-protocol test server instead of a folder")
    parser.add_argument("--fault-rate", type=float, default=0.0, help="share of S3 requests given a fault")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng, total = random.Random(args.seed), Counter()
    server = proxy = None
    if args.s3:
        from conftest import new_bucket
        from fault_proxy import FAULTS, FaultProxy

        server = subprocess.Popen([sys.executable, str(TESTS / "s3_server.py")], stdout=subprocess.PIPE, text=True)
        upstream = f"http://127.0.0.1:{int(server.stdout.readline())}"
        os.environ.update(AWS_ACCESS_KEY_ID="soak", AWS_SECRET_ACCESS_KEY="soak", AWS_DEFAULT_REGION="us-east-1",
                          P2PFED_STORAGE_BACKOFF="0.05", P2PFED_STORAGE_TIMEOUT="2")
        proxy = FaultProxy(upstream, {f: args.fault_rate / len(FAULTS) for f in FAULTS}, seed=args.seed, hang_s=2.5)
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.runs):
                url = new_bucket(upstream) if args.s3 else None
                stats = one_run(Path(tmp) / f"run{i}", args, rng, url, proxy.url if proxy else None)
                total.update(stats)
                print(f"run {i + 1}/{args.runs}: {stats['ticks']} ticks, {stats['killed']} killed, "
                      f"{stats['objects']} objects, verify ok, one final model", flush=True)
    finally:
        if server:
            proxy.close()
            server.kill()
    wall = time.monotonic() - started
    print(f"\n{args.runs} federations ({args.sites} sites, {args.rounds} rounds) in {wall:.0f} s")
    print(f"ticks: {total['ticks']}, killed: {total['killed']} "
          f"({100 * total['killed'] / max(total['ticks'], 1):.0f} %), mean tick {total['tick_s'] / max(total['ticks'], 1):.2f} s")
    if proxy:
        print(f"S3 requests: {sum(proxy.counts.values())}, faults injected: {dict(proxy.counts)}")
    print("every run recovered: verify passed and all sites hold the same final model")


if __name__ == "__main__":
    main()
