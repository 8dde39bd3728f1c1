"""Soak: a federation on a SeaweedFS cluster that loses a storage node mid-round.

One master, three volume servers and a filer with the S3 gateway on loopback
(tests/seaweed.py), replication 001: every object is stored twice, on two volume servers.
Once the first site has committed round --kill-round, a volume server that holds a copy of
the bucket is SIGKILLed; it is restarted --down-sweeps sweeps later. Meanwhile ticks go
on: a tick that fails with a StorageError is simply run again at the next sweep, as cron
would. At the end the federation must have finished with `verify` clean, every object
readable, and the same objects and final models as the same federation on a local folder,
even after the other server holding the first copies is killed too (so the restarted one
must serve its copies).

Uses the nnU-Net-free federation of tests/factory.py (the real protocol, numpy models).
Prints figures; exits non-zero if an invariant breaks.

    python benchmarks/seaweed_soak.py --sites 3 --rounds 6 --kill-round 2 --down-sweeps 2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

import factory  # noqa: E402
import seaweed  # noqa: E402
from conftest import new_bucket  # noqa: E402
from p2pfed import node  # noqa: E402
from p2pfed.errors import StorageError  # noqa: E402
from p2pfed.verify import verify_storage  # noqa: E402


def final_models(fed) -> dict[str, str]:
    return {s: json.loads((fed.home / "sites" / s / "state.json").read_text())["final_model"] for s in fed.sites}


def holder(weed: seaweed.Weed, bucket: str, volumes: int, but: str | None = None) -> str:
    """A volume server with a copy of the bucket's data (each bucket is a collection)."""
    for i in range(volumes):
        if f"volume{i}" != but and list((weed.root / f"volume{i}").glob(f"{bucket}_*.dat")):
            return f"volume{i}"
    raise SystemExit(f"no volume server other than {but} holds {bucket}")


def wait_nodes(weed: seaweed.Weed, n: int, timeout: float = 120) -> float:
    """Seconds until the master counts n volume servers."""
    started = time.monotonic()
    while len(weed.data_nodes()) != n:
        if time.monotonic() - started > timeout:
            raise SystemExit(f"the master did not count {n} volume servers within {timeout:.0f} s")
        time.sleep(0.5)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--kill-round", type=int, default=2, help="kill once the first site committed this round")
    parser.add_argument("--down-sweeps", type=int, default=2, help="sweeps of ticks before the restart")
    parser.add_argument("--volumes", type=int, default=3)
    args = parser.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="soak", AWS_SECRET_ACCESS_KEY="soak", AWS_DEFAULT_REGION="us-east-1")
    started = time.monotonic()
    weed = seaweed.cluster(volumes=args.volumes, replication="001")
    print(f"cluster up in {time.monotonic() - started:.1f} s: 1 master, {args.volumes} volume servers, "
          f"filer + S3 at {weed.endpoint}, replication 001", flush=True)
    stats, errors = Counter(), Counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = factory.make(Path(tmp) / "local", n=args.sites, rounds=args.rounds)
            local.run_all()
            url = new_bucket(weed.endpoint)
            fed = factory.make(Path(tmp) / "seaweedfs", url, n=args.sites, endpoint=weed.endpoint,
                               rounds=args.rounds)
            trigger = f"rounds/{args.kill_round:05d}/{fed.sites[0]}/COMMIT.json"
            killed, down_since, finished, sweep = None, None, set(), 0
            run_started = time.monotonic()
            while finished != set(fed.sites):
                sweep += 1
                if sweep > 40 * args.rounds:
                    raise SystemExit("no progress: the federation did not finish")
                for site in fed.sites:
                    if site in finished:
                        continue
                    t = time.monotonic()
                    try:
                        if fed.run(site).finished:
                            finished.add(site)
                        stats["ticks"] += 1
                    except StorageError as exc:  # cron runs the next tick; so do we
                        stats["failed_ticks"] += 1
                        errors[exc.message.split(" (")[0][:90]] += 1
                    stats["down_tick_s" if down_since else "tick_s"] += time.monotonic() - t
                    stats["down_ticks" if down_since else "up_ticks"] += 1
                    if killed is None and fed.storage.exists(trigger):
                        killed, down_since = holder(weed, url.split("/")[2], args.volumes), sweep
                        weed.kill(killed)
                        killed_at = time.monotonic()
                        print(f"sweep {sweep}: {site} committed round {args.kill_round}; killed {killed}",
                              flush=True)
                if down_since and sweep - down_since >= args.down_sweeps:
                    print(f"sweep {sweep}: {time.monotonic() - killed_at:.0f} s after the kill the master counts "
                          f"{len(weed.data_nodes())} of {args.volumes} volume servers", flush=True)
                    weed.start(killed)
                    down_since = None
                    print(f"sweep {sweep}: restarted {killed}; counted by the master after "
                          f"{wait_nodes(weed, args.volumes):.1f} s", flush=True)
            wall = time.monotonic() - run_started
            if killed is None:
                raise SystemExit(f"round {args.kill_round} never committed: nothing was killed")
            if down_since:
                raise SystemExit("the federation finished before the restart: use fewer --down-sweeps")
            # The restarted server must serve its copies: lose the other copy of the old objects.
            other = holder(weed, url.split("/")[2], args.volumes, but=killed)
            weed.kill(other)
            t = time.monotonic()
            home, _, view = node.open_site(fed.home, fed.sites[0])
            bad = [f for f in verify_storage(view, home.identity()) if not f.ok]
            keys = factory.keys(fed)
            unreadable = [k for k in keys if not isinstance(fed.storage.get(k), bytes)]
            check_s = time.monotonic() - t
            same_objects = keys == factory.keys(local)
            same_models = final_models(fed) == final_models(local) and len(set(final_models(fed).values())) == 1
    finally:
        weed.stop()
    print(f"\n{args.sites} sites, {args.rounds} rounds on SeaweedFS in {wall:.0f} s ({sweep} sweeps); "
          f"volume server down for {args.down_sweeps} sweeps from round {args.kill_round}")
    print(f"ticks: {stats['ticks']} ok, {stats['failed_ticks']} failed with a storage error "
          f"(next tick went on); mean tick {stats['tick_s'] / max(stats['up_ticks'], 1):.2f} s with all nodes up, "
          f"{stats['down_tick_s'] / max(stats['down_ticks'], 1):.2f} s with one down")
    for message, n in errors.most_common():
        print(f"  {n} x {message}")
    print(f"then {other} (the other copy of the objects written before the loss) killed too: "
          f"verify and reading every object took {check_s:.1f} s")
    print(f"objects: {len(keys)}, unreadable {len(unreadable)}, verify bad {len(bad)}; "
          f"same objects as on a folder: {same_objects}; same final model everywhere: {same_models}")
    if bad or unreadable or not same_objects or not same_models:
        raise SystemExit("invariant broken")
    print("nothing lost: verify passed, every object readable, models equal to the folder run")


if __name__ == "__main__":
    main()
