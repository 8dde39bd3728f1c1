"""Bounded influence of one member (issue 11, attacks 2 and 5; docs/design.md 7.2, 7.3, 8.4).

- A site's merge weight is the case count it declared once, before training
  (`declarations/<site>.p2pf`), never what a round's metadata claims.
- `--max-weight-share S` caps every contributor's share of a merge's weight.
- A member that gives one recipient a broken content key halts every site, naming
  the author and the recipient; storage tampering still reads as tampering."""
from __future__ import annotations

import base64
import hashlib
import json
import random
from dataclasses import replace
from fractions import Fraction

import numpy as np
import pytest
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from typer.testing import CliRunner

import factory
from factory import NumpyTrainer
from p2pfed import crypto, federation, layout, node, objects, shards, status
from p2pfed.cli.app import app
from p2pfed.crypto import Identity
from p2pfed.errors import FederationHalted, IntegrityError, UsageError
from p2pfed.merge import asym_fedavg
from p2pfed.protocol.phases import merge, rounds

def declared_payload(fed, site: str) -> dict:
    tick = fed.tick("site0")
    key = layout.declaration(site)
    return json.loads(objects.read_envelope(tick.fed, key, "declaration", tick.me, author=site)[1])


def merged_with(fed, r: int, weights: dict) -> str:
    """The model hash of merging every site's round-r contribution with `weights` (FFE)."""
    base = merge.merged_weights(fed.tick("site0"), r - 1)[0]
    models = {s: factory.trained(base, s, r) for s in fed.sites}
    out = asym_fedavg(models, weights)[sorted(fed.sites)[0]]
    return crypto.model_hash([shards.shard_hash(b) for b in shards.to_shards(out)])


# --------------------------------------------------------------------------- declarations
def test_every_site_declares_its_cases_once_and_every_merge_weighs_by_them(tmp_path):
    fed = factory.make(tmp_path, rounds=2)
    fed.run_all()
    for site in fed.sites:
        assert declared_payload(fed, site) == {"cases": factory.cases_of(site)}
    record = fed.merged_record("site1", 2)
    assert record["excluded"] == {}
    assert record["per_site"]["site1"] == merged_with(fed, 2, {s: factory.cases_of(s) for s in fed.sites})


def test_no_site_goes_on_before_every_participant_has_declared(tmp_path):
    fed = factory.make(tmp_path)
    report = fed.run("site0")
    assert (report.phase, report.waiting_for) == ("declare", ["site1", "site2"])
    assert "site1, site2" in report.message
    report = fed.run("site1")
    assert report.waiting_for == ["site2"]
    assert not [k for k in factory.keys(fed) if k.startswith(("fingerprints/site", "plans/", "rounds/"))]
    fed.run("site2")
    assert fed.run("site0").phase != "declare"


def claims(cases):
    class Claims(NumpyTrainer):
        """A member that declared its true count, then claims another one in round 1."""
        def train(self, r, base):
            result = super().train(r, base)
            return replace(result, cases=cases) if r == 1 else result
    return Claims


def test_a_round_claim_other_than_the_declaration_is_excluded_by_every_site(tmp_path):
    """Attack 2: a member claims 10**7 cases (in range) for one round to decide the merge alone."""
    fed = factory.make(tmp_path, rounds=1)
    fed.run_all({"site1": claims(10 ** 7)})
    why = "site 'site1': round 1 metadata claims 10000000 cases, it declared 6"
    for site in fed.sites:
        record = fed.merged_record(site, 1)
        assert record["excluded"] == {"site1": why}
        assert sorted(record["per_site"]) == ["site0", "site2"]


@pytest.mark.parametrize("payload, wrong", [
    ({"cases": 0}, "payload.cases: 0 is outside 1..10000000"),
    ({"cases": 10 ** 7 + 1}, "payload.cases: 10000001 is outside 1..10000000"),
    ({"cases": True}, "payload.cases: expected an integer, got a boolean"),
    ({"cases": 2.5}, "payload.cases: expected an integer, got 2.5"),
    ({"cases": "7"}, "payload.cases: expected an integer, got a string"),
    ({}, "payload: lacks field 'cases'"),
    ([6], "payload: expected an object, got a list"),
], ids=str)
def test_an_out_of_range_declaration_is_refused_naming_the_site(tmp_path, payload, wrong):
    """A member declares an absurd count (as a patched node would): no merge uses it."""
    fed = factory.make(tmp_path, rounds=1)
    fed.run("site0")  # the start seal: the participants are the recipients
    site1 = fed.tick("site1")
    objects.put_envelope(site1.fed, layout.declaration("site1"), "declaration", crypto.canonical_json(payload),
                         site1.me, site1.view.recipients())
    fed.run_all()
    why = f"site 'site1': declarations/site1.p2pf: {wrong}; none of its contributions is merged"
    for site in fed.sites:
        assert fed.merged_record(site, 1)["excluded"] == {"site1": why}
    home, _, f = node.open_site(fed.home, "site0")
    assert status.build(f, home.identity())["declared"]["site1"] == {"error": why}


def test_a_site_whose_own_count_is_out_of_range_declares_nothing(tmp_path):
    class Empty(NumpyTrainer):
        def cases(self):
            return 0
    fed = factory.make(tmp_path)
    with pytest.raises(Exception, match=r"this site has 0 training cases; a declaration needs 1\.\.10000000") as exc:
        fed.run("site0", Empty)
    assert exc.value.exit_code == 4
    assert not fed.storage.exists(layout.declaration("site0"))


def test_status_shows_members_the_declared_cases_and_shares_and_the_storage_nothing(tmp_path):
    fed = factory.make(tmp_path, rounds=1, max_weight_share=0.34)
    fed.run_all()
    doc = status.document(str(fed.home), "site0", None, None)
    assert doc["declared"] == {"site0": {"cases": 5, "share": 0.32}, "site1": {"cases": 6, "share": 0.34},
                               "site2": {"cases": 7, "share": 0.34}}
    text = CliRunner().invoke(app, ["status", "--site", "site0", "--home", str(fed.home)], terminal_width=200)
    assert text.exit_code == 0 and "5 (32.0%)" in text.stdout and "7 (34.0%)" in text.stdout
    assert "weighting cases (max share 0.34), layers subset" in text.stdout
    assert "momentum" not in text.stdout  # --optimizer-state local, the default: nothing to say
    public = status.document(None, None, fed.url, None)
    assert public["declared"] is None
    assert all(e["cases"] is None for r in public["rounds"] for e in r["sites"].values())
    shown = CliRunner().invoke(app, ["status", "--storage", fed.url], terminal_width=200).stdout
    assert "declared" not in shown and "32.0%" not in shown


def _labelled(tmp_path, n: int):
    raw = tmp_path / "raw" / "Dataset001_X"
    (raw / "labelsTr").mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0},
                                                  "numTraining": n, "file_ending": ".nii.gz"}))
    for i in range(n):
        (raw / "labelsTr" / f"c{i:03d}.nii.gz").write_bytes(b"")
    return tmp_path / "raw", tmp_path / "pre"


@pytest.mark.parametrize("n", [5, 7, 9, 23])
def test_nnunet_fold_cases_are_those_of_nnunets_own_split(tmp_path, n):
    """Declared before preprocessing: the same count nnU-Net's do_split trains on."""
    from p2pfed.nnunet.trainer import fold_cases

    crossval = pytest.importorskip("nnunetv2.utilities.crossval_split")
    raw, pre = _labelled(tmp_path, n)
    splits = crossval.generate_crossval_split([f"c{i:03d}" for i in range(n)], seed=12345, n_splits=5)
    assert [fold_cases(str(raw), str(pre), "1", f) for f in range(5)] == [len(s["train"]) for s in splits]
    assert fold_cases(str(raw), str(pre), "1", 5) == int(n * 0.8)  # beyond the splits: nnU-Net's 80:20


def test_nnunet_fold_cases_follow_a_custom_splits_file(tmp_path):
    from p2pfed.nnunet.trainer import fold_cases

    raw, pre = _labelled(tmp_path, 4)
    (pre / "Dataset001_X").mkdir(parents=True)
    (pre / "Dataset001_X" / "splits_final.json").write_text(json.dumps([{"train": ["c000", "c001", "c002"],
                                                                         "val": ["c003"]}]))
    assert fold_cases(str(raw), str(pre), "1", 0) == 3
    assert fold_cases(str(raw), str(pre), "1", 1) == 3  # int(4 * 0.8)


# --------------------------------------------------------------------------- the cap
def capped(cases, cap):
    from p2pfed.merge import capped_weights

    weights = capped_weights(cases, cap)
    total = sum(weights.values())
    return {s: w / total for s, w in weights.items()}, weights


def test_the_cap_water_fills_exactly():
    shares, weights = capped({"a": 1, "b": 1, "c": 98}, Fraction(1, 2))
    assert shares == {"a": Fraction(1, 4), "b": Fraction(1, 4), "c": Fraction(1, 2)}
    assert weights["a"] == 1 and weights["b"] == 1  # uncapped sites keep their integer counts
    shares, _ = capped({"site0": 5, "site1": 6, "site2": 7}, Fraction(34, 100))  # capping site2 pushes site1 over
    assert shares == {"site0": Fraction(8, 25), "site1": Fraction(17, 50), "site2": Fraction(17, 50)}
    assert capped({"a": 3, "b": 4}, Fraction(9, 10))[1] == {"a": 3, "b": 4}  # not binding: the counts as they are
    assert capped({"a": 3, "b": 4}, None)[1] == {"a": 3, "b": 4}


@pytest.mark.parametrize("cap", [Fraction(1, 4), Fraction(1, 3)])
def test_an_infeasible_or_tight_cap_gives_uniform_weights(cap):
    """3 sites cannot each hold at most 1/4 of the weight: uniform is the closest."""
    assert capped({"a": 1, "b": 2, "c": 1000}, cap)[1] == {"a": 1, "b": 1, "c": 1}


def test_capped_shares_hold_for_random_federations_and_ignore_input_order():
    from p2pfed.merge import as_merge_weights, capped_weights

    rng = random.Random(11)
    for _ in range(300):
        n = rng.randint(1, 12)
        cases = {f"s{i}": rng.choice([1, 2, 5, 40, 10 ** 7, rng.randint(1, 500)]) for i in range(n)}
        cap = Fraction(rng.randint(1, 100), 100)
        shares, weights = capped(cases, cap)
        assert sum(shares.values()) == 1
        if cap * n > 1:
            assert all(v <= cap for v in shares.values())
            free = [s for s in cases if shares[s] < cap]
            assert all(weights[s] == cases[s] for s in free)  # proportions of the uncapped kept
        items = list(cases.items())
        rng.shuffle(items)
        assert as_merge_weights(capped_weights(dict(items), cap)) == as_merge_weights(weights)
        assert list(as_merge_weights(capped_weights(dict(items), cap))) == sorted(cases)


@pytest.mark.parametrize("value", [0, -0.1, 1.5])
def test_max_weight_share_outside_0_1_is_refused(value):
    with pytest.raises(UsageError, match=r"--max-weight-share must be in \(0, 1\]"):
        federation.Settings(max_weight_share=value)


def test_init_signs_max_weight_share_into_the_federation(tmp_path):
    from test_membership import raw_dataset

    raw = raw_dataset(tmp_path / "raw", 1)
    result = CliRunner().invoke(app, ["init", str(tmp_path / "shared"), "--site", "a", "--dataset", "1",
                                      "--nnunet-raw", str(raw), "--nnunet-preprocessed", str(tmp_path / "pre"),
                                      "--nnunet-results", str(tmp_path / "res"), "--home", str(tmp_path / "home"),
                                      "--max-weight-share", "0.4"])
    assert result.exit_code == 0, result.output
    fed = federation.load(factory.open_storage(str(tmp_path / "shared")))
    assert fed.settings.max_weight_share == 0.4


def test_a_capped_merge_uses_the_capped_weights_and_is_the_same_at_every_site(tmp_path):
    fed = factory.make(tmp_path, rounds=2, max_weight_share=0.34)
    fed.run_all()
    c = Fraction(34, 100) * 5 / (1 - 2 * Fraction(34, 100))  # site1 and site2 capped
    want = merged_with(fed, 2, {"site0": 5, "site1": float(c), "site2": float(c)})
    assert want != merged_with(fed, 2, {s: factory.cases_of(s) for s in fed.sites})
    results = {fed.merged_record(s, 2)["result"] for s in fed.sites}
    assert len(results) == 1
    assert {fed.merged_record(s, 2)["own"] for s in fed.sites} == {want}


# --------------------------------------------------------------------------- a cheating author
def forged(fed, key: str, kind: str, payload: bytes, author: Identity, recipients, victim: str, how: str,
           **binding) -> bytes:
    """What a patched node writes: a validly signed envelope whose wrapped key for `victim`
    is not the content key every other recipient gets (another key, or junk)."""
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    content, other = AESGCM.generate_key(bit_length=256), AESGCM.generate_key(bit_length=256)
    wrapped = {s: base64.b64encode(suite.encrypt(other if s == victim else content,
                                                 X25519PublicKey.from_public_bytes(pub.encrypt_key),
                                                 info=crypto.KEYWRAP_INFO + s.encode())).decode()
               for s, pub in sorted(recipients.items())}
    if how == "junk":
        wrapped[victim] = base64.b64encode(b"\x07" * 80).decode()
    header = {**binding, "federation": fed.id, "kind": kind, "name": key, "author": author.site,
              "plaintext_sha256": crypto.sha256_hex(payload), "plaintext_size": len(payload),
              "chunk_size": crypto.CHUNK_SIZE, "recipients": wrapped}
    if hasattr(crypto, "key_commitment"):  # the new header field; the test also runs on older code
        header["key_commitment"] = crypto.key_commitment(content)
    head = crypto.canonical_json(header)
    prefix = crypto.PREFIX.pack(crypto.MAGIC, crypto.FORMAT_VERSION, crypto.SUITE_ID, len(head)) + head
    chunk = AESGCM(content).encrypt(b"\x00" * 11 + b"\x01", payload, hashlib.sha256(prefix).digest())
    return prefix + author.sign(crypto.ENVELOPE_DOMAIN + prefix) + chunk


def all_halt(fed, sweeps: int = 6) -> dict[str, FederationHalted]:
    """Tick every site round-robin until each one halts; site -> its FederationHalted."""
    halted = {}
    for _ in range(sweeps):
        for site in fed.sites:
            if site in halted:
                continue
            try:
                fed.run(site)
            except FederationHalted as exc:
                halted[site] = exc
        if len(halted) == len(fed.sites):
            return halted
    raise AssertionError(f"only {sorted(halted)} halted")


HALT = ("site2 reports that site1 gave it a content key that does not open {key}; "
        "site1 cheated or site2 lies, for a person to decide")


@pytest.mark.parametrize("how", ["other key", "junk"])
def test_a_member_that_gives_one_recipient_a_broken_key_in_a_round_halts_every_site(tmp_path, how):
    """Attack 5: site1's round 1 metadata opens for site0, not for site2."""
    fed = factory.make(tmp_path, rounds=2)
    fed.prepare("initial model", sweeps=4)
    fed.run("site1", stop_after="train")
    tick = fed.tick("site1")
    _, meta, base = rounds.cached_training(tick, 1)
    payload = crypto.canonical_json({**meta, "round": 1, "base": base})
    key = layout.meta(1, "site1")
    fed.storage.put_new(key, forged(tick.fed, key, "meta", payload, tick.me, tick.view.recipients(), "site2", how,
                                    round=1))
    halted = all_halt(fed)
    for site, exc in halted.items():
        assert exc.message == HALT.format(key=key), site
        assert exc.exit_code == 7
    assert fed.storage.exists(layout.complaint(key, "site2"))
    assert not fed.storage.exists(layout.merged(1, "site2"))


def test_a_broken_key_in_the_fingerprint_exchange_halts_every_site_with_exit_7(tmp_path):
    fed = factory.make(tmp_path)
    fed.run("site0", stop_after="declare")
    fed.run("site2", stop_after="declare")
    tick = fed.tick("site1", stop_after="declare")
    tick.run()
    key = layout.summary("site1")
    payload = crypto.canonical_json(NumpyTrainer("site1", tick.home).summary())
    fed.storage.put_new(key, forged(tick.fed, key, "summary", payload, tick.me, tick.view.recipients(), "site2",
                                    "other key"))
    runner = CliRunner()
    for _ in range(3):
        for site in fed.sites:
            try:
                fed.run(site)
            except FederationHalted:
                pass
    for site in fed.sites:  # as cron runs it: one line, exit 7, naming both
        result = runner.invoke(app, ["round", "--site", site, "--home", str(fed.home)], terminal_width=400)
        assert result.exit_code == 7, (site, result.output)
        assert HALT.format(key=key) in " ".join(result.output.split()), site


def test_storage_tampering_with_a_wrapped_key_still_reads_as_tampering(tmp_path):
    """The storage swaps site2's wrapped key in site1's summary: the signature breaks, so
    the object is junk (it counts as absent and is reported as tampering), no complaint is
    filed, and site1 publishes its summary again in the next slot: the federation goes on."""
    fed = factory.make(tmp_path)
    fed.prepare("declare", sweeps=1)
    for site in ("site0", "site1"):
        fed.run(site, stop_after="fingerprint")  # their summaries are out; site2 reads them next
    key = layout.summary("site1")
    blob = fed.path(key).read_bytes()
    _, _, _, hlen = crypto.PREFIX.unpack_from(blob)
    head = blob[crypto.PREFIX.size:crypto.PREFIX.size + hlen]
    wrapped = json.loads(head)["recipients"]["site2"]
    swapped = wrapped[:10] + ("A" if wrapped[10] != "A" else "B") + wrapped[11:]
    fed.path(key).write_bytes(blob.replace(wrapped.encode(), swapped.encode()))
    report = fed.run("site2")
    assert f"{key}: {key}: bad signature (claims to be from site1)" in report.junk
    assert "site1" in report.waiting_for
    fed.run_all()
    assert fed.storage.exists(key + ".1")  # site1's summary, published again
    assert not [k for k in factory.keys(fed) if "_complaints" in k]


def test_a_complaint_not_signed_by_the_participant_it_names_is_ignored(tmp_path):
    fed = factory.make(tmp_path, rounds=1)
    fed.run("site0")
    site0, stranger = fed.tick("site0"), Identity.generate("site2")
    target = layout.meta(1, "site1")
    body = {"object": target, "accused": "site1", "federation": site0.fed.id, "kind": "complaint",
            "name": layout.complaint(target, "site2"), "author": "site2"}
    fed.storage.put_new(layout.complaint(target, "site2"), crypto.sign_record(body, stranger))  # foreign key
    objects.put_record(site0.fed, layout.complaint(target, "site0"), "complaint",  # names site0: signer ok,
                       {"object": target, "accused": "site0"}, site0.me)  # but accuses itself
    fed.storage.put_new(layout.complaint(layout.summary("site1"), "site1"), b"junk")
    fed.run_all()
    assert all(fed.tick(s).state.get("finished") for s in fed.sites)


def test_a_version_1_envelope_is_refused_and_the_commitment_is_checked():
    a, b = Identity.generate("a"), Identity.generate("b")
    members = {"a": a.public(), "b": b.public()}
    blob = crypto.seal(b"x", header={"federation": "f", "kind": "t", "name": "obj"}, author=a, recipients=members)
    head = crypto.read_header(blob, "obj")
    assert head["key_commitment"] and crypto.FORMAT_VERSION == 2
    old = blob[:4] + b"\x01" + blob[5:]
    with pytest.raises(IntegrityError, match="unsupported envelope version 1"):
        crypto.open_sealed(old, reader=b, authors=members, name="obj")

    class Fed:
        id = "f"
    bad = forged(Fed, "obj", "t", b"x", a, members, "b", "other key")
    assert crypto.open_sealed(bad, reader=a, authors=members, name="obj")[1] == b"x"
    with pytest.raises(IntegrityError) as exc:
        crypto.open_sealed(bad, reader=b, authors=members, name="obj")
    assert (exc.value.author, exc.value.recipient, exc.value.key, exc.value.exit_code) == ("a", "b", "obj", 7)


@pytest.mark.parametrize("state, says", [("reset", "SGD momentum reset at every merge"),
                                         ("merged", "SGD momentum merged with the weights")])
def test_status_says_what_each_merge_does_to_the_momentum(tmp_path, state, says):
    fed = factory.make(tmp_path, rounds=1, optimizer_state=state)
    text = CliRunner().invoke(app, ["status", "--site", "site0", "--home", str(fed.home)], terminal_width=200)
    assert text.exit_code == 0 and f"layers subset, {says}" in text.stdout


def test_the_learning_rate_is_a_signed_setting_that_status_shows(tmp_path):
    """--learning-rate is signed into federation.json, and status shows it (the round's use
    of it: test_nnunet_train.py::test_learning_rate_setting_starts_polylr_there)."""
    from p2pfed import node

    fed = factory.make(tmp_path, rounds=1, learning_rate=0.03)
    text = CliRunner().invoke(app, ["status", "--site", "site0", "--home", str(fed.home)], terminal_width=200)
    assert text.exit_code == 0 and "x 250 iterations from learning rate 0.03;" in text.stdout
    _, _, federation = node.open_site(fed.home, "site0")
    assert federation.settings.learning_rate == 0.03
    assert "from learning rate" not in CliRunner().invoke(  # unset: the trainer's own, not shown
        app, ["status", "--site", "site0", "--home", str(factory.make(tmp_path / "b", rounds=1).home)],
        terminal_width=200).stdout
