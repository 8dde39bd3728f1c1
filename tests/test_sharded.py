"""Sharded aggregation of secure rounds (docs/design.md 7.9), on federations of tiny
models (tests/factory.py): slices summed by their owners, agreed by hash, recovered
when an owner is missing or wrong."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

import factory
from conftest import new_bucket
from p2pfed import crypto, layout, secagg
from p2pfed.merge import Layer
from p2pfed.shards import one_shard
from test_chain import final_models
from test_secure_aggregation import equals_plain, merged_model, plain_merge, sweep


def slice_sums(fed, r: int) -> dict[int, list[str]]:
    """slice -> the sites that published a sum of it."""
    out: dict[int, list[str]] = {}
    for key in factory.keys(fed):
        parsed = layout.kind_of(key)
        if parsed and parsed[0] == "slice-hash" and layout.round_of(key) == r:
            out.setdefault(int(key.split("/")[3]), []).append(parsed[2])
    return out


def seal_of(fed, r: int) -> dict:
    return json.loads(fed.storage.get(layout.seal(r)))["body"]


@pytest.mark.parametrize("backend", ["local", "seaweedfs"])
def test_ten_sites_with_one_dropped_mid_round_end_bit_identical(tmp_path, request, backend):
    """Ten sites, sharded by default (--sharded-from 8), on a folder and on SeaweedFS (a
    production object store). All ten commit round 1; once it is sealed, the first owner
    of slice 0 goes away: it neither reveals nor sums its slices. One deadline after the
    seal the next site of each of its slices' ranking sums them; every site merges the
    same model, equal to the float64 merge of the ten contributions; the site comes back
    and catches up."""
    from p2pfed.protocol.phases import rounds

    endpoint = request.getfixturevalue("on_seaweedfs") if backend == "seaweedfs" else None
    fed = factory.make(tmp_path, endpoint and new_bucket(endpoint), n=10, endpoint=endpoint,
                       secure_aggregation=True, deadline_s=1)
    fed.prepare(stop_after="initial model", sweeps=4)
    for _ in range(2):
        for s in fed.sites:
            fed.run(s, stop_after="upload")
    rounds.seal(fed.tick("site0"), 1)
    assert sorted(seal_of(fed, 1)["contributions"]) == fed.sites
    seal_sha = crypto.sha256_hex(fed.storage.get(layout.seal(1)))
    gone = secagg.owners(seal_sha, 0, fed.sites)[0]
    others = [s for s in fed.sites if s != gone]
    time.sleep(1.1)  # one deadline after the seal: the next in rank steps in for it
    sweep(fed, others, 3)
    sums = slice_sums(fed, 1)
    ranked = {j: secagg.owners(seal_sha, j, fed.sites) for j in sums}
    assert len(sums) == 10 and all(gone not in s for s in sums.values())
    orphans = [j for j in sums if gone in ranked[j][:2]]
    assert 0 in orphans and all(set(sums[j]) - set(ranked[j][:2]) for j in orphans)  # summed further down
    want = plain_merge(fed, 1, fed.sites)
    assert all(equals_plain(merged_model(fed, s, 1), want) for s in others)
    fed.run_all()
    assert len(set(final_models(fed).values())) == 1


def test_an_owner_publishing_a_wrong_sum_is_outvoted_by_the_next_in_rank(tmp_path):
    """Four sites, sharded. The first owner of slice 0 publishes a sum that is not the
    one the masks give (a broken or cheating node): the second owner's differs, so the
    third sums it too and the two honest sums agree. Every site merges the right model."""
    fed = factory.make(tmp_path, n=4, secure_aggregation=True, sharded_from=2)
    fed.prepare(stop_after="initial model", sweeps=4)
    from p2pfed.protocol.phases import rounds

    for _ in range(2):
        for s in fed.sites:
            fed.run(s, stop_after="upload")
    rounds.seal(fed.tick("site0"), 1)
    seal_sha = crypto.sha256_hex(fed.path(layout.seal(1)).read_bytes())
    bad = secagg.owners(seal_sha, 0, fed.sites)[0]
    t = fed.tick(bad)
    blob = one_shard([("g000000@000000000000", Layer(("g000000@000000000000",), np.zeros(3, np.float32)))])
    key = layout.slice_sum(1, 0, bad)
    sha = t.write.envelope(key, "slice", blob, round=1)
    t.write.record(layout.slice_hash(1, 0, bad), "slice-hash",
                   {"round": 1, "slice": 0, "sha256": crypto.sha256_hex(blob), "sum": {"key": key, "sha256": sha}})
    fed.run_all()
    assert set(slice_sums(fed, 1)[0]) == set(secagg.owners(seal_sha, 0, fed.sites)[:3])
    want = plain_merge(fed, 1, fed.sites)
    assert all(equals_plain(merged_model(fed, s, 1), want) for s in fed.sites)
    assert len(set(final_models(fed).values())) == 1


def test_a_tampered_slice_sum_is_read_from_the_other_owner(tmp_path):
    """The storage flips a byte in one owner's stored sum of a slice: readers take the
    other owner's copy, whose hash the two agreed on."""
    fed = factory.make(tmp_path, n=4, secure_aggregation=True, sharded_from=2, rounds=1)
    fed.prepare(stop_after="initial model", sweeps=4)
    for _ in range(3):
        for s in fed.sites[:3]:  # site3 waits: it reads the slices last
            fed.run(s)
        fed.run("site3", stop_after="upload")
    sums = slice_sums(fed, 1)
    seal_sha = crypto.sha256_hex(fed.path(layout.seal(1)).read_bytes())
    j = min(j for j, by in sums.items() if len(by) >= 2)
    first = next(s for s in secagg.owners(seal_sha, j, fed.sites) if s in sums[j])  # the copy readers try first
    path = fed.path(layout.slice_sum(1, j, first))
    data = bytearray(path.read_bytes())
    data[-5] ^= 1
    path.write_bytes(bytes(data))
    fed.run_all()
    want = plain_merge(fed, 1, fed.sites)
    assert all(equals_plain(merged_model(fed, s, 1), want) for s in fed.sites)


def test_slices_cover_every_word_once_and_owners_spread_evenly():
    secure = {("a", (7, 3)): ["s0", "s1", "s2"], ("b", (5,)): ["s0", "s1", "s2"], ("c", (100,)): ["s0", "s1", "s2"]}
    for n in (1, 3, 10, 126):
        cuts = secagg.slices(secure, n)
        assert len(cuts) == n
        covered = sorted((g, w) for cut in cuts for g, a, b in cut for w in range(a, b))
        assert covered == [(g, w) for g, size in enumerate((21, 5, 100)) for w in range(size)]
        assert max(sum(b - a for _, a, b in cut) for cut in cuts) <= -(-126 // n)
    sites = [f"site{i}" for i in range(50)]
    for n_sites, n_slices in ((50, 50), (50, 75), (50, 130), (49, 49), (49, 60), (3, 10)):
        first = [secagg.owners("ab" * 32, j, sites[:n_sites])[:2] for j in range(n_slices)]
        load = [sum(s in pair for pair in first) for s in sites[:n_sites]]
        assert sum(load) == 2 * n_slices and max(load) - min(load) <= 1  # 2S/n slices each, to within one
    ranked = [secagg.owners("ab" * 32, j, sites) for j in range(50)]
    assert all(sorted(r) == sorted(sites) for r in ranked)
    assert secagg.owners("cd" * 32, 0, sites) != ranked[0]  # the order follows the seal
    assert secagg.owners("ab" * 32, 3, sites) == secagg.owners("ab" * 32, 3, list(reversed(sites)))
