"""What an untrusted storage operator and a malicious or broken member can try, and
what p2pfed does about it (docs/design.md, section 8). Federations come from tests/factory.py:
real protocol, numpy models instead of nnU-Net, milliseconds per tick.

Storage attacks are made on a finished federation (3 sites, 2 FFE rounds); a site then
merges the attacked round again from the shared storage: it must refuse, naming the
object, and merge nothing. Member misbehaviour happens in round 1 of a fresh federation:
every site must exclude the same contribution, naming the site, and merge the others."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
import threading
import time

import numpy as np
import pytest

import factory
import safetensors.numpy
from factory import NumpyTrainer
from p2pfed import crypto, epochs, layout, node, objects, shards
from p2pfed import federation as fedmod
from p2pfed.crypto import Identity, sign_record
from p2pfed.errors import FederationHalted, IntegrityError
from p2pfed.merge import asym_fedavg
from p2pfed.protocol import CLOCK_SKEW_S
from p2pfed.protocol.phases import merge
from p2pfed.cli.app import app
from p2pfed.verify import verify_storage
from typer.testing import CliRunner


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    fed = factory.make(root)
    fed.run_all()
    return fed


@pytest.fixture
def fed(finished, tmp_path):
    """A private copy of the finished federation (site homes repointed at the copy)."""
    shutil.copytree(finished.root, tmp_path, dirs_exist_ok=True)
    for config in (tmp_path / "home" / "sites").glob("*/site.json"):
        config.write_text(config.read_text().replace(str(finished.root), str(tmp_path)))
    return factory.Fed(tmp_path, finished.url.replace(str(finished.root), str(tmp_path)), finished.sites)


def refused(fed, r: int, match: str | None, site: str = "site0", merged: bool = False):
    """`site` re-merges round r: refused with `match`. Unless the attack is on another
    site's merge record (checked after merging), no merge of the round is left behind."""
    with pytest.raises(IntegrityError, match=match) as exc:
        fed.remerge(site, r)
    assert merged or not (fed.home / "sites" / site / "work" / "merged" / f"{r:05d}" / "merged.json").exists()
    return exc.value


def bad_keys(fed, site: str = "site0") -> dict[str, str]:
    home, _, view = node.open_site(fed.home, site)
    return {f.key: f.detail for f in verify_storage(view, home.identity()) if not f.ok}


# --------------------------------------------------------------------------- storage operator
def test_a_flipped_byte_in_any_round_object_is_refused_and_named(fed):
    """Shards, metadata, commits, the seal and every site's merge record of round 2."""
    round_keys = [k for k in factory.keys(fed) if k.startswith("rounds/00002/")]
    assert len(round_keys) == 3 * 3 + 1 + 3
    for key in round_keys:
        path = fed.path(key)
        original = path.read_bytes()
        damaged = bytearray(original)
        damaged[len(damaged) // 2] ^= 0x20
        path.write_bytes(bytes(damaged))
        if "/merged/" in key:  # a fixed-name record: junk there does not count, it is reported
            other = "site1" if key.endswith("site0.json") else "site0"
            fed.remerge(other, 2)
            assert any(line.startswith(f"{key}: ") for line in fed.run(other).junk), key
        else:
            culprit = refused(fed, 2, None)
            assert key in culprit.message, (key, culprit.message)
        assert key in bad_keys(fed), key
        path.write_bytes(original)
    fed.remerge("site0", 2)  # restored: merges again
    assert bad_keys(fed) == {}


def test_an_object_moved_to_another_round_is_refused(fed):
    meta, commit = layout.meta(2, "site1"), layout.commit(2, "site1")
    fed.path(meta).write_bytes(fed.path(layout.meta(1, "site1")).read_bytes())
    refused(fed, 2, f"{meta}: not the metadata the commit lists")
    assert "field 'name' is 'rounds/00001/site1/meta.p2pf'" in bad_keys(fed)[meta]
    fed.path(commit).write_bytes(fed.path(layout.commit(1, "site1")).read_bytes())
    refused(fed, 2, f"{commit}: field 'name' is 'rounds/00001/site1/COMMIT.json'")


def test_an_older_seal_replayed_is_refused(fed):
    fed.path(layout.seal(2)).write_bytes(fed.path(layout.seal(1)).read_bytes())
    refused(fed, 2, "field 'name' is 'rounds/00001/SEAL.json', expected 'rounds/00002/SEAL.json'")


def test_a_seal_that_moves_its_round_opening_is_refused(fed):
    """opened_at is fixed by the previous seal's sealed_at; a seal that claims another
    (to make an early deadline seal look late) is refused, by every site."""
    body = json.loads(fed.path(layout.seal(2)).read_text())["body"]
    author = node.open_site(fed.home, body["author"])[0].identity()
    fed.path(layout.seal(2)).write_bytes(sign_record(body | {"opened_at": body["opened_at"] - 86400}, author))
    refused(fed, 2, "rounds/00002/SEAL.json: claims round 2 opened at")


def test_an_object_from_another_federation_is_refused(fed, tmp_path_factory):
    """Same site names, same keys paths, another federation: its signatures do not verify."""
    other = factory.make(tmp_path_factory.mktemp("other"))
    other.run_all()
    key = layout.commit(2, "site1")
    fed.path(key).write_bytes(other.path(key).read_bytes())
    refused(fed, 2, f"{key}: bad signature")
    assert "bad signature (claims to be from site1)" in bad_keys(fed)[key]


@pytest.mark.parametrize("victim", ["shard", "commit"])
def test_a_deleted_shard_or_commit_is_refused(fed, victim):
    commit = json.loads(fed.path(layout.commit(2, "site2")).read_text())["body"]
    key = commit["shards"][0]["key"] if victim == "shard" else layout.commit(2, "site2")
    fed.path(key).unlink()
    expect = f"{key}: listed by rounds/00002/site2/COMMIT.json but missing" if victim == "shard" \
        else f"{key}: missing or not the commit the seal lists"
    refused(fed, 2, expect)
    lister = layout.commit(2, "site2") if victim == "shard" else layout.seal(2)
    assert bad_keys(fed)[lister] == f"{lister}: lists {key}, which is missing or differs"


def test_a_forged_signature_is_refused(fed):
    """A merge record 'from site1' signed with a key that is not site1's: it does not
    count (site2 merges and agrees with the rest), the tick and verify name it."""
    key = layout.merged(2, "site1")
    body = json.loads(fed.path(key).read_text())["body"]
    fed.path(key).write_bytes(sign_record({**body, "result": "0" * 64}, Identity.generate("site1")))
    fed.remerge("site2", 2)
    assert f"{key}: {key}: bad signature (claims to be from site1)" in fed.run("site2").junk
    assert "bad signature (claims to be from site1)" in bad_keys(fed)[key]


def test_a_member_signing_for_another_site_is_refused(fed):
    """site1 writes site2's commit: as itself, or claiming to be site2 in the body."""
    key = layout.commit(2, "site2")
    body = json.loads(fed.path(key).read_text())["body"]
    me = node.open_site(fed.home, "site1")[0].identity()
    for forged, why in ((body | {"author": "site1"}, "field 'author' is 'site1', expected 'site2'"),
                        (body, "signed by 'site1' on behalf of 'site2'")):
        fed.path(key).write_bytes(sign_record(forged, me))
        view = fed.tick("site0").view
        assert "site2" not in view.commits(2) and view.junk[key].endswith(why)  # it does not count
        refused(fed, 2, f"{key}: missing or not the commit the seal lists \\(junk: {key}: {why}\\)")


def test_an_equivocating_seal_is_caught_by_the_merge_comparison(tmp_path):
    """Quorum 2 of 3: a seal of any two commits is valid. The operator keeps such a seal
    that lost the race (it saw the bytes) and shows it to site2 only: site2's merge
    differs from what the others published, and the federation halts."""
    fed = factory.make(tmp_path, rounds=1, quorum=2, deadline_s=0)
    for s in fed.sites * 4:
        fed.run(s, stop_after="upload")  # plans agreed, round 0 sealed, all three committed round 1
    fed.run("site0")  # seals all three
    fed.run("site1")
    seal = json.loads(fed.path(layout.seal(1)).read_text())["body"]
    assert sorted(seal["contributions"]) == fed.sites
    lost = seal | {"author": "site1", "reason": "deadline",
                   "contributions": {k: v for k, v in seal["contributions"].items() if k != "site0"}}
    fed.path(layout.seal(1)).write_bytes(sign_record(lost, node.open_site(fed.home, "site1")[0].identity()))
    with pytest.raises(FederationHalted, match="round 1: the merge computed by site0 differs from site2's"):
        fed.run("site2")
    # the fork is in the storage for anyone to see: verify fails with exit 7, naming the round
    result = CliRunner().invoke(app, ["verify", "--site", "site0", "--home", str(fed.home)])
    assert result.exit_code == 7 and "round 1: sites merged differently (site0: " in result.output


# --------------------------------------------------------------------------- members
def raw_shard(weights: dict, dtype=np.float32) -> bytes:
    """A shard as a patched node could write it: any dtype and values, no checks."""
    meta = json.dumps({"names": {k: [k] for k in weights}, "version": 1}, sort_keys=True, separators=(",", ":"))
    return safetensors.numpy.save({k: np.asarray(v, dtype) for k, v in weights.items()},
                                  metadata={shards.METADATA_KEY: meta})


def forge(fed, site: str, r: int, blobs=None, meta=None, commit=None) -> None:
    """Write `site`'s round-r contribution as a patched or malicious node would: validly
    signed, with shards blobs(trained weights), and meta and commit fields overridden."""
    tick = fed.tick(site, stop_after="merge")
    tick.run()  # planned, and round r-1 merged: the base this contribution names
    weights, base = merge.merged_weights(tick, r - 1)
    weights = factory.trained(weights, site, r)
    refs = []
    for blob in (blobs(weights) if blobs else shards.to_shards(weights)):
        key = layout.shard(r, site, crypto.sha256_hex(blob))
        env = objects.put_envelope(tick.fed, key, "shard", blob, tick.me, tick.view.recipients(), round=r)
        refs.append({"key": key, "sha256": crypto.sha256_hex(env)})
    meta = {"round": r, "base": base, "cases": factory.cases_of(site), "epoch": r - 1, "metrics": {}, **(meta or {})}
    env = objects.put_envelope(tick.fed, layout.meta(r, site), "meta", crypto.canonical_json(meta), tick.me,
                               tick.view.recipients(), round=r)
    body = {"round": r, "base": base, "shards": refs,
            "meta": {"key": layout.meta(r, site), "sha256": crypto.sha256_hex(env)}, **(commit or {})}
    objects.put_record(tick.fed, layout.commit(r, site), "commit", body, tick.me)


def nan_weights(w):
    return [raw_shard({**w, "head.weight": np.full((2, 4), np.nan)})]


def float16(w):
    return [raw_shard(w, np.float16)]


class WrongShape(NumpyTrainer):
    def train(self, r, base):
        result = super().train(r, base)
        return replace(result, weights={**result.weights, "head.weight": np.zeros((3, 4), np.float32)})


class MissingTensor(NumpyTrainer):
    def train(self, r, base):
        result = super().train(r, base)
        return replace(result, weights={k: v for k, v in result.weights.items() if k != "encoder.bias"})


def absurd_cases(value):
    class AbsurdCases(NumpyTrainer):
        def train(self, r, base):
            return replace(super().train(r, base), cases=value)
    return AbsurdCases


def scaled(factor):
    class Scaled(NumpyTrainer):
        """A 'poisoned' update: the base model times `factor` (finite, right shapes)."""
        def train(self, r, base):
            result = super().train(r, base)
            return replace(result, weights={k: v * np.float32(factor) for k, v in result.weights.items()})
    return Scaled


def honest_merge(fed, r: int, sites) -> str:
    """The model hash of merging only `sites`' round-r contributions (FFE, case weights)."""
    base = merge.merged_weights(fed.tick("site0"), r - 1)[0]
    models = {s: factory.trained(base, s, r) for s in sites}
    merged = asym_fedavg(models, {s: factory.cases_of(s) for s in sites})[sorted(sites)[0]]
    return crypto.model_hash([shards.shard_hash(b) for b in shards.to_shards(merged)])


@pytest.mark.parametrize("attack, why", [
    (dict(blobs=nan_weights), "site 'site1': tensor 'head.weight' has non-finite values"),
    (dict(blobs=float16), "site 'site1' shard 0: tensor 'encoder.bias' has dtype F16, expected F32"),
    (WrongShape, "site 'site1': tensor 'head.weight' has shape [3, 4], the agreed model [2, 4]"),
    (MissingTensor, "site 'site1': lacks 1 tensor(s) of the agreed model, e.g. 'encoder.bias'"),
    (dict(commit={"base": "f" * 64}, meta={"base": "f" * 64}),
     "site 'site1': round 1 contribution is built on another base model"),
    (dict(meta={"round": 7}), "site 'site1': round 1 metadata disagrees with its commit"),
    (absurd_cases(0), "site 'site1': rounds/00001/site1/meta.p2pf: payload.cases: 0 is outside 1..10000000"),
    (absurd_cases(10 ** 9), "site 'site1': rounds/00001/site1/meta.p2pf: payload.cases: 1000000000 is outside"),
    (absurd_cases(True), "site 'site1': rounds/00001/site1/meta.p2pf: payload.cases: expected an integer, got a boolean"),
    (absurd_cases(2.5), "site 'site1': rounds/00001/site1/meta.p2pf: payload.cases: expected an integer, got 2.5"),
], ids=["nan", "float16", "wrong-shape", "missing-tensor", "other-base", "meta-round", "cases-0", "cases-1e9",
        "cases-bool", "cases-float"])  # stable ids: pytest-xdist's workers must collect the same names
def test_a_broken_member_is_excluded_by_every_site_and_named(tmp_path, attack, why):
    fed = factory.make(tmp_path, rounds=1)
    if isinstance(attack, dict):
        forge_round_1(fed, **attack)
        attack = NumpyTrainer
    fed.run_all({"site1": attack})
    records = [fed.merged_record(s, 1) for s in fed.sites]
    assert all(rec == records[0] | {"own": rec["own"]} for rec in records)  # every site agrees
    assert list(records[0]["excluded"]) == ["site1"] and records[0]["excluded"]["site1"].startswith(why)
    assert records[0]["per_site"]["site0"] == honest_merge(fed, 1, ["site0", "site2"])


def forge_round_1(fed, **attack) -> None:
    """Every site planned, round 0 sealed, and site1's round 1 contribution forged."""
    fed.prepare()
    fed.run("site0", stop_after="initial model")
    forge(fed, "site1", 1, **attack)


MALFORMED_COMMITS = [
    ({"meta": None}, "site 'site1': round 1 commit.meta: expected an object, got null"),
    ({"shards": {"0": "x"}}, "site 'site1': round 1 commit.shards: expected a list, got an object"),
    ({"shards": [{"key": "rounds/00001/site2/" + "0" * 64 + ".shard", "sha256": "0" * 64}]},
     "site 'site1': round 1 commit lists a shard elsewhere"),
]


@pytest.mark.parametrize("commit, why", MALFORMED_COMMITS, ids=["no-meta", "shards-not-a-list", "shard-elsewhere"])
def test_a_malformed_commit_is_never_sealed_and_verify_names_it(tmp_path, commit, why):
    fed = factory.make(tmp_path, rounds=1, quorum=2, deadline_s=0)
    forge_round_1(fed, commit=commit)
    for s in ("site0", "site2"):
        fed.run(s, stop_after="upload")
    report = fed.run("site0", stop_after="seal")  # quorum 2, deadline passed: sealed without site1
    assert "sealed rounds/00001/SEAL.json" in report.actions
    seal = json.loads(fed.path(layout.seal(1)).read_text())["body"]
    assert sorted(seal["contributions"]) == ["site0", "site2"]
    assert bad_keys(fed)[layout.commit(1, "site1")].startswith(why)


@pytest.mark.parametrize("commit, why", MALFORMED_COMMITS[:2], ids=["no-meta", "shards-not-a-list"])
def test_a_malformed_commit_sealed_by_its_author_is_excluded_by_every_site(tmp_path, commit, why):
    """Its author seals it anyway (valid: all three committed): every site excludes it."""
    fed = factory.make(tmp_path, rounds=1)
    forge_round_1(fed, commit=commit)
    for s in ("site0", "site2"):
        fed.run(s, stop_after="upload")
    tick = fed.tick("site1")
    body = {"round": 1, "contributions": {s: sha for s, (sha, _) in tick.view.commits(1).items()},
            "reason": "all", "opened_at": tick.view.opened_at(1), "sealed_at": int(time.time()),
            "previous": tick.view.previous_seal(1)}
    objects.put_record(tick.fed, layout.seal(1), "seal", body, tick.me)
    fed.run_all()
    records = [fed.merged_record(s, 1) for s in fed.sites]
    assert all(rec["result"] == records[0]["result"] for rec in records)
    assert list(records[0]["excluded"]) == ["site1"] and records[0]["excluded"]["site1"].startswith(why)


def test_max_update_norm_excludes_outsized_updates_and_is_off_by_default(tmp_path):
    bounded = factory.make(tmp_path / "on", rounds=1, max_update_norm=0.5)
    bounded.run_all({"site2": scaled(100.0)})
    excluded = bounded.merged_record("site0", 1)["excluded"]
    assert list(excluded) == ["site2"] and "site 'site2': update norm" in excluded["site2"]
    assert "exceeds max_update_norm 0.5 x the merged model's norm" in excluded["site2"]
    assert bounded.merged_record("site0", 1)["per_site"]["site0"] == honest_merge(bounded, 1, ["site0", "site1"])
    unbounded = factory.make(tmp_path / "off", rounds=1)
    unbounded.run_all({"site2": scaled(100.0)})
    assert unbounded.merged_record("site0", 1)["excluded"] == {}
    honest = factory.make(tmp_path / "honest", rounds=1, max_update_norm=0.5)
    honest.run_all()  # ordinary training steps stay within the bound
    assert honest.merged_record("site0", 1)["excluded"] == {}


def test_a_member_with_another_plan_halts_the_federation_naming_both(tmp_path):
    class OtherPlan(NumpyTrainer):
        plans = {**factory.PLANS, "configurations": {"2d": {"patch_size": [48, 32], "batch_size": 2}}}

    fed = factory.make(tmp_path)
    # site2 is the first to see every plan hash (the declarations take the first sweep):
    # it names itself and the differing site
    with pytest.raises(FederationHalted, match=r"plans of site2 and site1 differ in: configurations\.2d\."
                                                r"patch_size\[0\]: 32 != 48"):
        fed.run_all({"site1": OtherPlan})


# --------------------------------------------------------------------------- races and clocks
def race_to_seal_round_1(fed) -> list[str]:
    """Every site commits round 1, then all tick at once; returns the sites that sealed."""
    for s in fed.sites * 5:
        fed.run(s, stop_after="upload")  # declared, plans agreed, round 0 sealed, every site committed round 1
    ticks = [fed.tick(s) for s in fed.sites]
    start = threading.Barrier(len(ticks))

    def race(tick):
        start.wait()
        tick.run()

    threads = [threading.Thread(target=race, args=(t,)) for t in ticks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [t.site for t in ticks if "sealed rounds/00001/SEAL.json" in t.report.actions]


def test_ten_sites_race_to_seal_one_round(tmp_path):
    """(Racing create-only writes on the S3 server: tests/test_storage.py.)"""
    fed = factory.make(tmp_path, n=10, rounds=1)
    winners = race_to_seal_round_1(fed)
    assert len(winners) == 1
    fed.run_all()
    seal = json.loads(fed.storage.get(layout.seal(1)))
    assert seal["signer"] == winners[0] and sorted(seal["body"]["contributions"]) == sorted(fed.sites)
    assert len({fed.merged_record(s, 1)["result"] for s in fed.sites}) == 1


def test_clocks_skewed_by_minutes_still_seal(tmp_path, monkeypatch):
    """Quorum 2 of 3, one-hour deadline, site0 five minutes fast, site1 five minutes slow,
    site2 away after planning: site0's deadline seal is accepted by everyone. A seal
    dated before the deadline by more than the allowed skew is refused."""
    fed = factory.make(tmp_path, rounds=1, quorum=2, deadline_s=3600)
    now, skew = time.time(), {"site0": 300, "site1": -300, "site2": 0}
    clock = {"t": now, "site": "site0"}
    monkeypatch.setattr(time, "time", lambda: clock["t"] + skew[clock["site"]])

    def run(site, **options):
        clock["site"] = site
        return fed.run(site, **options)

    for _ in range(3):
        for s in fed.sites:
            run(s, stop_after="plan")
    run("site0")  # round 0 sealed by site0's fast clock: round 1 opens at now + 300
    assert run("site1").message.startswith("round 1/1: waiting for site2")
    clock["t"] = now + 3600  # site0's clock: one hour after it opened round 1
    assert "sealed rounds/00001/SEAL.json" in run("site0").actions
    for s in fed.sites:
        assert run(s).finished
    assert len({fed.merged_record(s, 1)["result"] for s in fed.sites}) == 1
    body = json.loads(fed.path(layout.seal(1)).read_text())["body"]
    assert body["reason"] == "deadline" and sorted(body["contributions"]) == ["site0", "site1"]
    early = body | {"sealed_at": body["opened_at"] + 3600 - CLOCK_SKEW_S - 1}
    fed.path(layout.seal(1)).write_bytes(sign_record(early, node.open_site(fed.home, "site0")[0].identity()))
    refused(fed, 1, "sealed with 2 contributions before the deadline", site="site1")


def test_junk_under_epochs_and_joins_is_ignored_by_ticks_and_named_by_verify(fed):
    """Anyone with write access can drop files there; a key that is not an epoch record's
    or join request's name is not membership: ticks go on, verify reports it."""
    for junk in ("epochs/notes.txt", "joins/site9/x.json"):
        fed.path(junk).parent.mkdir(parents=True, exist_ok=True)
        fed.path(junk).write_bytes(b"junk")
    assert fed.run("site0").finished
    assert bad_keys(fed) == {"epochs/notes.txt": "epochs/notes.txt: not an object of the p2pfed protocol",
                             "joins/site9/x.json": "joins/site9/x.json: not an object of the p2pfed protocol"}


def test_symbolic_links_in_a_shared_folder_are_refused(fed, tmp_path_factory):
    """The operator of a shared folder links an object, or a round's folder, elsewhere:
    reads through it are refused naming the link, and nothing is written outside."""
    outside = tmp_path_factory.mktemp("outside")
    commit = fed.path(layout.commit(2, "site1"))
    (outside / "COMMIT.json").write_bytes(commit.read_bytes())
    commit.unlink()
    commit.symlink_to(outside / "COMMIT.json")
    refused(fed, 2, "rounds/00002/site1/COMMIT.json is a symbolic link in the shared folder")
    fed.path("rounds/00003").symlink_to(outside, target_is_directory=True)
    with pytest.raises(IntegrityError, match="rounds/00003 is a symbolic link"):
        fed.storage.put_new("rounds/00003/SEAL.json", b"x")
    assert sorted(p.name for p in outside.iterdir()) == ["COMMIT.json"]


def test_a_flood_of_join_requests_costs_a_started_site_no_reads(fed, monkeypatch):
    """Anyone with write access can write join requests; once a site has started, its
    ticks never read them (one listing of the epoch log and of the open round, the genesis and the
    chain head's seal is all)."""
    for i in range(50):
        fed.path(layout.join_request(f"spam{i}")).write_bytes(b"junk" * 1000)
    read = []
    real_get = type(fed.storage).get
    monkeypatch.setattr(type(fed.storage), "get", lambda self, key: read.append(key) or real_get(self, key))
    assert fed.run("site0").finished
    assert not [k for k in read if k.startswith("joins/")] and read == ["federation.json", layout.seal(2)]


def test_a_site_admitted_under_other_keys_shares_nothing(tmp_path):
    """The founder, then the only member, admits an impostor's keys under site1's name
    (here: epoch 1 is replaced, proposal and approval, before site1's first tick). site1
    refuses to take part, naming the epoch, and writes nothing to the storage."""
    fed = factory.make(tmp_path)
    founder = node.open_site(fed.home, "site0")[0].identity()
    shared = fedmod.load(fed.storage)
    genesis, change = shared.log.chain[0], {"op": epochs.ADMIT, "site": "site1"}
    impostor = Identity.generate("site1").public()
    key, data = epochs.proposal(shared.id, genesis, change, epochs.changed(genesis, change, impostor), founder)
    fed.path(key).write_bytes(data)
    akey, adata = epochs.approval(shared.id, 1, 0, crypto.sha256_hex(data), founder)
    fed.path(akey).write_bytes(adata)
    before = factory.keys(fed)
    with pytest.raises(IntegrityError, match="epoch 1 of the membership log holds keys for 'site1' that are not"):
        fed.run("site1")
    assert factory.keys(fed) == before


def test_an_asym_site_that_missed_rounds_adopts_the_shared_layers(tmp_path):
    """Asym, quorum 2 of 3: site2 plans, then is away while site0 and site1 finish.
    Back, it merges each round it missed from the sealed contributions (once), keeps
    its own model with every layer the contributors share adopted (here: all of them,
    so it ends with their merged model), and every site agrees on every merge."""
    fed = factory.make(tmp_path, mode="asym", rounds=2, quorum=2, deadline_s=0)
    for s in fed.sites:
        fed.run(s, stop_after="plan")
    for _ in range(3):
        for s in ("site0", "site1"):
            fed.run(s)
    assert fed.run("site2").finished
    for r in (1, 2):
        records = {s: fed.merged_record(s, r) for s in fed.sites}
        assert sorted(records["site0"]["per_site"]) == ["site0", "site1"]
        assert len({rec["result"] for rec in records.values()}) == 1
        assert records["site2"]["own"] == records["site0"]["per_site"]["site0"]
