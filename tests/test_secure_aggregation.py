"""Secure aggregation (docs/design.md 7.8): the arithmetic (pure), then real federations
of tiny models (tests/factory.py): what a member can read, dropouts, tampering,
asym groups and DP."""
from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import factory
from conftest import new_bucket
from p2pfed import crypto, layout, node, secagg, status
from p2pfed.errors import FederationHalted, IntegrityError
from p2pfed.shards import from_shards, read_shard
from p2pfed.site import SiteHome
from test_attacks import bad_keys
from test_chain import final_models


# --------------------------------------------------------------------------- the arithmetic
def test_the_fixed_point_sum_equals_the_float64_weighted_mean_within_1e_9():
    rng = np.random.default_rng(0)
    xs = [(0.05 * rng.standard_normal(20_000)).astype(np.float32) for _ in range(5)]
    w = np.array([3, 5, 7, 11, 10_000_000], dtype=np.float64)  # a huge case count cannot overflow
    total = np.zeros(20_000, dtype=np.uint64)
    for x, wi in zip(xs, w):
        np.add(total, secagg.encode(x, wi / w.sum())[0], out=total)
    exact = sum(x.astype(np.float64) * wi for x, wi in zip(xs, w)) / w.sum()
    got = secagg.decode(total, 1.0)
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 1e-9


def test_values_outside_the_clip_range_are_clipped_and_counted():
    words, clipped = secagg.encode(np.array([1.0, 5000.0, -1e6, np.float32(secagg.CLIP)], np.float32), 1.0)
    assert clipped == 2
    assert list(secagg.decode(words, 1.0)) == [1.0, secagg.CLIP, -secagg.CLIP, secagg.CLIP]


def test_pairwise_masks_cancel_in_the_sum_and_each_masked_upload_looks_random():
    sites, lab, n = ["a", "b", "c"], secagg.label("w", (1000,)), 1000
    keys = {s: crypto.mask_keypair() for s in sites}
    seeds = {s: crypto.random_seed() for s in sites}
    x = {s: secagg.encode(np.full(n, 0.25, np.float32), 1 / 3)[0] for s in sites}
    total = np.zeros(n, np.uint64)
    for s in sites:
        peers = {p: crypto.pair_mask_key(keys[s][0], keys[p][1], b"ctx" + "".join(sorted((s, p))).encode())
                 for p in sites if p != s}
        y = secagg.Masker(secagg.mask_keys(s, peers, crypto.self_mask_key(seeds[s], b"self" + s.encode()))).apply(x[s], lab)
        assert np.count_nonzero(y == x[s]) == 0 and len(np.unique(y >> np.uint64(56))) > 200  # spread over 2^64
        np.add(total, y, out=total)
    unmask = secagg.Masker([(crypto.self_mask_key(seeds[s], b"self" + s.encode()), 1) for s in sites])
    assert np.allclose(secagg.decode(unmask.apply(total, lab, direction=-1), 1.0), 0.25, atol=1e-14)


def test_mask_streams_are_seekable_and_shamir_needs_the_threshold():
    key = b"k" * 32
    assert (crypto.keystream_u64(key, b"t", 0, 100)[37:61] == crypto.keystream_u64(key, b"t", 37, 24)).all()
    secret = crypto.mask_keypair()[0]
    shares = crypto.split_secret(secret, 3, 5)
    assert crypto.combine_secret({1: shares[0], 4: shares[3], 5: shares[4]}) == secret
    assert crypto.combine_secret({1: shares[0], 4: shares[3]}) != secret  # below the threshold


def test_dp_noise_is_a_rounded_gaussian_of_the_asked_std():
    draws = secagg.noise(b"n" * 32, b"t", 200_000, 1000.0)
    assert draws.dtype == np.int64 and abs(draws.mean()) < 10 and abs(draws.std() / 1000 - 1) < 0.01
    assert not (draws == secagg.noise(b"m" * 32, b"t", 200_000, 1000.0)).all()


# --------------------------------------------------------------------------- helpers
def local_model(fed, site: str, r: int) -> dict[str, np.ndarray]:
    """What `site` trained in round r, from its own checkpoint (the round cache)."""
    folder = fed.home / "sites" / site / "work" / "rounds" / f"{r:05d}"
    return from_shards([p.read_bytes() for p in sorted(folder.glob("*.safetensors"))], site=site)


def merged_model(fed, site: str, r: int) -> dict[str, np.ndarray]:
    folder = fed.home / "sites" / site / "work" / "merged" / f"{r:05d}"
    return from_shards([p.read_bytes() for p in sorted(folder.glob("*.safetensors"))], site=site)


def plain_merge(fed, r: int, sites) -> dict[str, np.ndarray]:
    """The float64 merge weighted by case counts, of the sites' own checkpoints."""
    w = {s: factory.cases_of(s) for s in sites}
    models = {s: local_model(fed, s, r) for s in sites}
    return {k: sum(models[s][k].astype(np.float64) * w[s] for s in sites) / sum(w.values()) for k in models[sites[0]]}


def equals_plain(a: dict, b: dict) -> bool:
    """Whether merged model `a` (float32, as every merge ends) is a float32 rounding of a
    value within 1e-9 relative of the float64 merge `b`: off by at most half a float32
    ulp plus 1e-9. (Exact float32 equality fails at ties: a float64 merge of float32
    values often lies exactly halfway between two float32 numbers.)"""
    return all((np.abs(a[k] - b[k]) <= 0.5 * np.spacing(np.abs(a[k])) + 1e-9 * np.abs(b[k])).all() for k in b)


def readable_tensors(fed, reader: str):
    """Every tensor a member holding `reader`'s keys can read in the storage: plain shards
    as weights, masked words decoded as fixed point, both at any weight share."""
    me = SiteHome(fed.home, reader).identity()
    f = node.open_site(fed.home, reader)[2]
    for key in factory.keys(fed):
        blob = fed.storage.get(key)
        try:
            plain = crypto.open_sealed(blob, reader=me, authors=f.authors(key), name=key)[1]
        except IntegrityError:
            continue  # not an envelope, or not for this member
        for dtype in ("F32", "U64"):
            try:
                items = read_shard(plain, key, dtype)
            except Exception:
                continue
            for _, item in items:
                if dtype == "F32":
                    yield key, item.array.astype(np.float64)
                else:  # undo any share a site could have been given
                    for share in (1.0, 5 / 18, 6 / 18, 7 / 18, 1 / 3):
                        yield key, secagg.decode(item.array.ravel(), 1 / share).reshape(item.array.shape)


def leaks(fed, reader: str) -> list[str]:
    """Keys where `reader` finds a tensor within 1e-3 of another site's trained one."""
    theirs = [a for s in fed.sites if s != reader for r in (1, 2) for a in local_model(fed, s, r).values()]
    return sorted({key for key, a in readable_tensors(fed, reader) for b in theirs
                   if a.shape == b.shape and np.abs(a - b).max() < 1e-3})


# --------------------------------------------------------------------------- federations
def test_a_member_reading_the_whole_bucket_finds_no_other_sites_weights(tmp_path, s3_endpoint):
    """Three sites with secure aggregation on the S3-protocol server. Holding site0's
    private keys and reading every object, no tensor is within 1e-3 of site1's or site2's
    own trained weights; without secure aggregation the same scan finds them. The merged
    model equals the plain float64 merge of the checkpoints within 1e-9, at every site."""
    fed = factory.make(tmp_path / "secure", new_bucket(s3_endpoint), n=3, endpoint=s3_endpoint,
                       secure_aggregation=True)
    fed.run_all()
    assert leaks(fed, "site0") == []
    for r in (1, 2):
        want = plain_merge(fed, r, fed.sites)
        assert all(equals_plain(merged_model(fed, s, r), want) for s in fed.sites)
        assert len({fed.merged_record(s, r)["result"] for s in fed.sites}) == 1
    assert len(set(final_models(fed).values())) == 1
    plain = factory.make(tmp_path / "plain", new_bucket(s3_endpoint), n=3, endpoint=s3_endpoint)
    plain.run_all()
    assert any(k.endswith(".shard") and "/site1/" in k for k in leaks(plain, "site0"))  # the scan can find


def tick_process(fed, site: str, crash: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "P2PFED_CRASH_AT": crash} if crash else None
    return subprocess.run([sys.executable, str(Path(factory.__file__)), str(fed.home), site],
                          capture_output=True, text=True, env=env, timeout=120)


def sweep(fed, sites, times: int = 1) -> None:
    for _ in range(times):
        for s in sites:
            fed.run(s)


def four_sites(tmp_path):
    """Four sites, quorum 3 and no deadline: a round may go on as soon as three are in."""
    fed = factory.make(tmp_path, n=4, secure_aggregation=True, quorum=3, deadline_s=0)
    fed.prepare(stop_after="initial model", sweeps=4)
    return fed


def finish_alike(fed) -> None:
    fed.run_all()
    assert len(set(final_models(fed).values())) == 1
    for r in (1, 2):
        sites = sorted(json.loads((fed.home / "sites/site0/work/seals" / f"{r:05d}.json").read_text())["contributions"])
        assert all(equals_plain(merged_model(fed, s, r), plain_merge(fed, r, sites)) for s in fed.sites)


def test_a_site_absent_from_a_round_leaves_it_recoverable(tmp_path):
    """site3 is away for all of round 1 (no key material): the others key-seal, seal and
    merge without it; it catches up, and every site ends with the same model."""
    fed = four_sites(tmp_path)
    sweep(fed, ["site0", "site1", "site2"], 3)
    seal = json.loads((fed.home / "sites/site0/work/seals/00001.json").read_text())
    assert sorted(seal["contributions"]) == ["site0", "site1", "site2"]
    finish_alike(fed)


@pytest.mark.parametrize("committed", [False, True])
def test_a_site_killed_after_its_masked_upload_leaves_the_round_recoverable(tmp_path, committed):
    """site3 published key material (it is in the key seal), uploaded its masked shards and
    was SIGKILLed before its commit (it dropped out: its mask key is reconstructed), or it
    committed and then went away (it contributed and never revealed: the others' reveals
    suffice). It comes back later; every site ends with the same model."""
    fed = four_sites(tmp_path)
    for s in fed.sites:  # all four publish key material and train: the key seal lists all
        fed.run(s, stop_after="train")
    if committed:
        assert "committed round 1" in fed.run("site3").actions
    else:
        assert tick_process(fed, "site3", "commit").returncode == -9
    assert "site3" in json.loads(fed.path(layout.key_seal(1)).read_text())["body"]["keys"]
    assert any(k.endswith(".masked") and "/site3/" in k for k in factory.keys(fed))
    sweep(fed, ["site0", "site1", "site2"], 3)
    seal = json.loads((fed.home / "sites/site0/work/seals/00001.json").read_text())
    assert ("site3" in seal["contributions"]) == committed
    assert not fed.storage.exists(layout.reveal(1, "site3"))
    assert (fed.home / "sites/site0/work/merged/00001/merged.json").exists()
    finish_alike(fed)


def test_below_the_threshold_a_round_waits_with_a_clear_message(tmp_path):
    """Three sites: one away means two contributions, which would reveal each other: the
    round is not sealed, and the tick says why."""
    fed = factory.make(tmp_path, n=3, secure_aggregation=True, quorum=2, deadline_s=0)
    fed.prepare(stop_after="initial model", sweeps=4)
    sweep(fed, ["site0", "site1"], 2)
    report = fed.run("site0")
    assert report.phase == "round" and "waiting for the key material of site2 (secure aggregation: 3 may go on" \
        in report.message
    assert not fed.storage.exists(layout.seal(1))


@pytest.mark.parametrize("mode", ["ffe", "asym"])
def test_key_material_whose_layout_does_not_fit_the_mode_is_refused_naming_its_author(tmp_path, mode):
    """FFE key material lists no layout (every site masks the base model); asym key
    material lists its own. site1 publishes, signed, the other form: the round does not
    take it, and waits naming site1 and what is wrong."""
    from p2pfed.protocol import secure

    fed = factory.make(tmp_path, n=3, secure_aggregation=True, mode=mode)
    fed.prepare(stop_after="initial model", sweeps=4)
    t = fed.tick("site1")
    own = secure.layout_of(t.trainer.initial_weights())
    payload = secure._make_secrets(t, 1, own)["payload"]
    payload["layout"] = own if mode == "ffe" else None
    t.write.envelope(layout.secagg_keys(1, "site1"), "keys", crypto.canonical_json(payload), round=1)
    t.save(keys_published=1)
    sweep(fed, ["site0", "site2"], 2)
    report = fed.run("site0")
    why = "lists a tensor layout (FFE" if mode == "ffe" else "lacks its tensor layout"
    assert report.phase == "round" and "site 'site1': round 1 key material " + why in report.message, report.message
    assert not fed.storage.exists(layout.key_seal(1))


# --------------------------------------------------------------------------- attacks
@pytest.fixture
def sealed(tmp_path):
    """Round 1 of a three-site secure federation is sealed; nobody has revealed yet."""
    from p2pfed.protocol.phases import rounds

    fed = factory.make(tmp_path, n=3, secure_aggregation=True)
    fed.prepare(stop_after="initial model", sweeps=4)
    for _ in range(2):
        for s in fed.sites:
            fed.run(s, stop_after="upload")
    rounds.seal(fed.tick("site0"), 1)  # the seal step alone: no tick goes on to merge
    assert fed.storage.exists(layout.seal(1)) and not any("reveal" in k for k in factory.keys(fed))
    return fed


def test_a_member_revealing_a_wrong_share_is_caught_and_named(sealed):
    """site1 reveals a share that is not the one site0 dealt it: site2 halts naming site1."""
    t = sealed.tick("site1")
    body = {"round": 1, "seal": t.view.seal_sha(1),
            "shares": {d: {"kind": "seed", "share": crypto.b64(b"\x01" * 16)} for d in sealed.sites}}
    t.write.envelope(layout.reveal(1, "site1"), "reveal", crypto.canonical_json(body), round=1)
    for s in ("site0", "site2"):
        with pytest.raises(FederationHalted, match="round 1: site1 revealed a wrong share of site0's seed"):
            sealed.run(s)


def test_a_reveal_for_the_wrong_kind_of_secret_is_refused(sealed):
    """Revealing the mask-key share of a site that contributed (with its seed, it would
    unmask that site's upload) is refused, naming the revealer."""
    t = sealed.tick("site1")
    from p2pfed.protocol import secure

    keys = secure._u1(t, 1)
    share = crypto.decrypt_share(keys["site0"].shares["site1"]["sealed"], t.me, secure._ctx(t, 1, "site0", "site1"))
    body = {"round": 1, "seal": t.view.seal_sha(1), "shares": {"site0": {"kind": "mask", "share": crypto.b64(share[:32])}}}
    t.write.envelope(layout.reveal(1, "site1"), "reveal", crypto.canonical_json(body), round=1)
    with pytest.raises(FederationHalted, match="round 1: site1 revealed the mask share of site0, where only its "
                                               "seed share may be revealed"):
        sealed.run("site0")


@pytest.mark.parametrize("what", ["masked", "keyseal"])
def test_tampered_secure_objects_are_named(sealed, what):
    """The storage flips a byte in a masked shard or the key seal: the next site to read
    it stops naming the object, and it merges nothing."""
    key = {"masked": next(k for k in factory.keys(sealed) if k.endswith(".masked") and "/site1/" in k),
           "keyseal": layout.key_seal(1)}[what]
    if what == "keyseal":  # every site kept the key seal it verified: one that has not yet reads the stored one
        for s in sealed.sites:
            (sealed.home / "sites" / s / "work" / "seals" / "00001.keys.json").unlink()
    _flip(sealed, key)
    with pytest.raises(IntegrityError) as exc:
        for s in sealed.sites:  # the first sites reveal, and wait for enough reveals
            sealed.run(s)
    assert key in exc.value.message
    assert not (sealed.home / "sites" / s / "work/merged/00001/merged.json").exists()


def test_key_material_changed_after_the_key_seal_is_not_read_again_and_verify_names_it(sealed):
    """Every site verified the key material the key seal lists, and keeps it: the storage
    changing it afterwards changes nothing (the round merges, the same at every site), and
    `verify` names the object. A site that had not checked it yet stops naming it."""
    key = layout.secagg_keys(1, "site1")
    _flip(sealed, key)
    assert key in bad_keys(sealed)
    first = sealed.home / "sites" / "site2" / "work" / "seals" / "00001.keys.json"
    first.rename(first.with_suffix(".kept"))  # site2 as a site that has not checked the key seal yet
    with pytest.raises(IntegrityError, match=re.escape(key)):
        sealed.run("site2")
    first.with_suffix(".kept").rename(first)
    for _ in range(3):
        for s in sealed.sites:
            sealed.run(s)
    models = [merged_model(sealed, s, 1) for s in sealed.sites]
    assert models[0] and all(m.keys() == models[0].keys() and all(np.array_equal(m[k], models[0][k]) for k in m)
                             for m in models[1:])


def _flip(fed, key: str) -> None:
    data = bytearray(fed.path(key).read_bytes())
    data[len(data) // 2] ^= 1
    fed.path(key).write_bytes(bytes(data))


JUNK_KEYS = [layout.secagg_keys(1, "site1"), layout.key_seal(1), layout.reveal(1, "site2")]


@pytest.mark.parametrize("key", JUNK_KEYS)
def test_junk_at_a_secure_aggregation_key_costs_a_slot(tmp_path, key):
    fed = factory.make(tmp_path, n=3, secure_aggregation=True)
    fed.storage.put_new(key, b"junk, no signature")
    fed.run_all()
    assert fed.storage.exists(key + ".1") and len(set(final_models(fed).values())) == 1


# --------------------------------------------------------------------------- asym and DP
class TwoHeads(factory.NumpyTrainer):
    """site2 and site3 have a larger head than site0 and site1: each head is shared by two."""

    def initial_weights(self):
        return self._reshape(super().initial_weights())

    def train(self, r, base):
        return super().train(r, base if base is not None else self._reshape(factory.model(factory.cases_of(self.site))))

    def _reshape(self, weights):
        if self.site in ("site2", "site3"):
            weights = {**weights, "head.weight": np.full((3, 4), 0.5, np.float32)}
        return weights


def test_asym_merges_securely_only_tensors_shared_by_three_or_more(tmp_path):
    """Asym, four sites: the encoder (all four) is merged securely; each head is shared by
    two sites only, so it stays as its site trained it, and status says so."""
    fed = factory.make(tmp_path, n=4, mode="asym", secure_aggregation=True)
    fed.run_all({s: TwoHeads for s in fed.sites})
    for r in (1, 2):
        models = {s: local_model(fed, s, r) for s in fed.sites}
        w = {s: factory.cases_of(s) for s in fed.sites}
        enc = sum(models[s]["encoder.weight"].astype(np.float64) * w[s] for s in fed.sites) / sum(w.values())
        for s in fed.sites:
            merged = merged_model(fed, s, r)
            assert np.abs(merged["encoder.weight"] - enc).max() < 1e-6
            assert (merged["head.weight"] == models[s]["head.weight"]).all()
    home, _, f = node.open_site(fed.home, "site0")
    assert "head.weight" in " ".join(status.build(f, home.identity())["secure_aggregation"]["kept_local"])


def test_dp_adds_the_configured_noise_and_status_reports_epsilon(tmp_path):
    """DP on: each update is clipped to dp_clip and the sum carries noise of std
    noise_multiplier x dp_clip / n; status shows the epsilon spent."""
    fed = factory.make(tmp_path, n=3, secure_aggregation=True, weighting="uniform", dp_clip=0.05,
                       dp_noise_multiplier=1.0)
    fed.run_all()
    home, _, f = node.open_site(fed.home, "site0")
    dp = status.build(f, home.identity())["secure_aggregation"]["dp"]
    assert dp["rounds"] == 2 and 1 < dp["epsilon"] < 100 and dp["delta"] == 1e-5
    assert len(set(final_models(fed).values())) == 1
    models = {s: local_model(fed, s, 1) for s in fed.sites}
    merged = merged_model(fed, "site0", 1)
    off = np.concatenate([(merged[k] - sum(models[s][k] for s in fed.sites) / 3).ravel() for k in merged])
    assert 0.3 < off.std() / (1.0 * 0.05 / 3) < 3  # noise of the configured std, not none, not more


def test_sigkill_after_every_write_of_a_secure_round_is_recovered(tmp_path):
    """From round 1 on, every tick process dies right after its first storage write, until
    a tick writes nothing: key material, key seal, masked shards, commits, the seal,
    reveals and merge records each survive a SIGKILL right after they are written
    (tests/test_faults.py does the whole plain protocol)."""
    from test_faults import all_verified, kill_after_every_write

    fed = factory.make(tmp_path, n=3, rounds=1, secure_aggregation=True)
    fed.prepare(stop_after="initial model", sweeps=4)  # in-process: the crashes are for the secure round
    kills = kill_after_every_write(fed, limit=150)
    assert kills >= len([k for k in factory.keys(fed) if layout.round_of(k) == 1])
    assert all_verified(fed)
    assert len({fed.merged_record(s, 1)["own"] for s in fed.sites}) == 1
