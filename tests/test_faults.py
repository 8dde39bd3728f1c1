"""Storage faults and crashes (docs/design.md, section 8), on federations from tests/factory.py
(the real protocol, numpy models instead of nnU-Net).

- A federation on SeaweedFS (a real distributed object store) equals one on a folder.
- A federation through tests/fault_proxy.py (5xx errors, throttling, connection resets,
  timeouts, slow responses, writes whose response is lost) in front of the S3-protocol
  server finishes, with exactly the objects and models of a run without faults.
- SIGKILL right after every single storage write of a whole federation, each tick in
  its own process as cron runs it: the next tick recovers, and verify passes.
  (Named crash points inside training and the final export: tests/test_rounds.py;
  random moments, many runs: benchmarks/soak.py.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import factory
from conftest import new_bucket
from fault_proxy import FAULTS, FaultProxy
from p2pfed import node, storage
from p2pfed.verify import verify_storage

# about one request in seven; every fault costs the client a few hundred ms of backoff.
# (A read is one HTTP request since reads are ranged; s3fs used to send a HEAD first.)
RATES = {"error": 0.02, "throttle": 0.02, "reset": 0.03, "timeout": 0.01, "slow": 0.02, "lost": 0.04}


def final_models(fed) -> dict[str, str]:
    return {s: json.loads((fed.home / "sites" / s / "state.json").read_text())["final_model"] for s in fed.sites}


def all_verified(fed) -> bool:
    home, _, view = node.open_site(fed.home, fed.sites[-1])
    return all(f.ok for f in verify_storage(view, home.identity()))


def test_a_federation_through_faulty_storage_loses_and_duplicates_nothing(s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)
    monkeypatch.setattr(storage, "TIMEOUT_S", 1.0)
    # 3 rounds: ticks are lean now (a few requests each), and the proxy must see enough
    clean = factory.make(tmp_path / "clean", new_bucket(s3_endpoint), n=2, rounds=3)
    clean.run_all()
    proxy = FaultProxy(s3_endpoint, RATES, seed=7, hang_s=1.5)
    try:
        faulty = factory.make(tmp_path / "faulty", new_bucket(s3_endpoint), n=2, endpoint=proxy.url, rounds=3)
        faulty.run_all()
        assert all_verified(faulty)
        assert factory.keys(faulty) == factory.keys(clean)  # nothing lost, nothing twice
    finally:
        proxy.close()
    assert final_models(faulty) == final_models(clean)
    assert set(proxy.counts) == set(FAULTS) | {"ok"} and proxy.injected >= 25, proxy.counts


def test_a_federation_on_seaweedfs_matches_one_on_a_folder(on_seaweedfs, tmp_path):
    """The whole protocol on a production object store: every site's merge of every round
    agrees, verify passes, and objects and final models equal a run on a local folder."""
    local = factory.make(tmp_path / "local", n=3)
    local.run_all()
    fed = factory.make(tmp_path / "seaweedfs", new_bucket(on_seaweedfs), n=3, endpoint=on_seaweedfs)
    fed.run_all()
    for r in (1, 2):
        records = [fed.merged_record(s, r) for s in fed.sites]
        assert len({rec["result"] for rec in records}) == 1
        assert all(set(rec["per_site"]) == set(fed.sites) and set(rec["per_site"].values()) == {rec["own"]}
                   for rec in records)
    assert all_verified(fed)
    assert factory.keys(fed) == factory.keys(local)
    assert final_models(fed) == final_models(local)


def tick(fed, site: str, crash: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "P2PFED_CRASH_AT": crash} if crash else None
    return subprocess.run([sys.executable, str(Path(factory.__file__)), str(fed.home), site],
                          capture_output=True, text=True, env=env, timeout=120)


def kill_after_every_write(fed, limit: int) -> int:
    """Tick every site, each tick process SIGKILLed right after its first write, until all
    have finished; returns how many ticks were killed (at most `limit`)."""
    kills, finished = 0, set()
    while finished != set(fed.sites):
        for site in fed.sites:
            while (proc := tick(fed, site, "write:1")).returncode == -9:
                kills += 1
            assert proc.returncode == 0, proc.stderr
            if json.loads(proc.stdout)["finished"]:
                finished.add(site)
        assert kills < limit
    return kills


def test_sigkill_after_every_write_is_recovered_by_the_next_tick(tmp_path):
    """Every tick process dies right after its first storage write, until a tick writes
    nothing: each of the federation's writes is followed by a SIGKILL once."""
    fed = factory.make(tmp_path, n=2)
    kills = kill_after_every_write(fed, limit=100)
    writes = len(factory.keys(fed)) - len(factory.keys(factory.make(tmp_path / "empty", n=2)))
    assert kills >= writes  # a kill after every object the tick wrote (retries add more)
    assert all_verified(fed)
    assert len(set(final_models(fed).values())) == 1
