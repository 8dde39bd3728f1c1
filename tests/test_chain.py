"""Seals and merges in a hash chain, squat-proof fixed-name keys, exclusion reasons inside
envelopes (docs/design.md 7.2, 7.3, 7.7, 8.6). Federations come from tests/factory.py:
the real protocol, numpy models instead of nnU-Net."""
from __future__ import annotations

import json

import pytest

import factory
from factory import NumpyTrainer
from p2pfed import crypto, layout, node, status
from p2pfed.cli.app import app
from p2pfed.crypto import Identity, sign_record
from p2pfed.errors import FederationHalted, IntegrityError
from test_attacks import absurd_cases, bad_keys, fed, finished, race_to_seal_round_1, refused  # noqa: F401 (fixtures)
from typer.testing import CliRunner


def body_of(fed, key: str) -> dict:
    return json.loads(fed.storage.get(key))["body"]


def sha_of(fed, key: str) -> str:
    return crypto.sha256_hex(fed.storage.get(key))


def identity(fed, site: str) -> Identity:
    return node.open_site(fed.home, site)[0].identity()


def final_models(fed) -> dict[str, str]:
    return {s: fed.merged_record(s, 2)["own"] for s in fed.sites}


# --------------------------------------------------------------------------- the chain
def test_seals_and_merge_records_form_a_hash_chain_every_site_keeps(fed):
    start, seals = sha_of(fed, layout.FINGERPRINT_SEAL), [sha_of(fed, layout.seal(r)) for r in range(3)]
    assert [body_of(fed, layout.seal(r))["previous"] for r in range(3)] == [start, *seals[:2]]
    results = {r: fed.merged_record("site0", r)["result"] for r in (1, 2)}
    for s in fed.sites:
        for r in (1, 2):
            record = body_of(fed, layout.merged(r, s))
            assert record["seal"] == seals[r] and record["result"] == results[r]
            assert record["previous"] == (None if r == 1 else results[1])
        kept = json.loads((fed.home / "sites" / s / "work" / "chain.json").read_text())
        assert kept["seals"]["start"]["sha256"] == start
        assert [kept["seals"][str(r)]["sha256"] for r in range(3)] == seals
        assert kept["merges"]["2"] == results[2]
    assert bad_keys(fed) == {}
    from p2pfed.protocol.view import head_hash
    heads = {status.build(*_status_args(fed, s))["chain_head"]["short"] for s in fed.sites}
    assert heads == {head_hash(2, seals[2], results[2])} and len(heads.pop()) == 19  # "xxxx xxxx xxxx xxxx"
    public = CliRunner().invoke(app, ["status", "--storage", fed.url, "--json"])
    assert json.loads(public.output)["chain_head"]["short"] == head_hash(2, seals[2], results[2])


def _status_args(fed, site):
    from p2pfed.protocol.view import Chain
    home, config, f = node.open_site(fed.home, site)
    return f, home.identity(), {**home.state(), "chain": Chain(home).data}


def test_a_seal_on_another_chain_is_refused_naming_its_author(fed):
    """A participant signs a round-2 seal that does not follow round 1's: refused, named."""
    body = body_of(fed, layout.seal(2))
    fed.path(layout.seal(2)).write_bytes(sign_record(body | {"previous": "0" * 64}, identity(fed, body["author"])))
    exc = refused(fed, 2, "names another previous seal than the one this site kept")
    assert f"sealed by {body['author']}" in exc.message
    assert bad_keys(fed)[layout.seal(2)].startswith("round 2: the seal names previous ")


def test_a_seal_without_a_previous_seal_is_refused_naming_its_author(fed):
    """The same seal naming no previous one is not even a seal (its schema): the site that
    adopted the real one says it is gone, and names the signer of what is there now."""
    body = body_of(fed, layout.seal(2))
    fed.path(layout.seal(2)).write_bytes(sign_record(body | {"previous": None}, identity(fed, body["author"])))
    refused(fed, 2, rf"body.previous: expected a string, got null \(signed by member '{body['author']}'\)")
    assert "body.previous" in bad_keys(fed)[layout.seal(2)]


def test_an_early_deadline_seal_names_the_participant_that_wrote_it(tmp_path):
    fed = factory.make(tmp_path, rounds=1, quorum=2, deadline_s=3600)
    for s in fed.sites * 4:
        fed.run(s, stop_after="upload")  # every site committed round 1; nobody may seal early
    tick = fed.tick("site1")
    early = {"round": 1, "contributions": {s: sha for s, (sha, _) in tick.view.commits(1).items() if s != "site2"},
             "reason": "deadline", "opened_at": tick.view.opened_at(1), "sealed_at": tick.view.opened_at(1),
             "previous": tick.view.previous_seal(1)}
    from p2pfed import objects
    objects.put_record(tick.fed, layout.seal(1), "seal", early, tick.me)
    with pytest.raises(IntegrityError, match=r"rounds/00001/SEAL.json: sealed with 2 contributions before the "
                                             r"deadline \(sealed by site1\)"):
        fed.run("site0")


def test_a_replaced_or_deleted_head_seal_is_caught_even_after_the_end(fed, monkeypatch):
    """The operator swaps the last seal for another validly signed one (one it kept from
    a lost race) or deletes it: a finished site's next tick says so, with one read of it."""
    body = body_of(fed, layout.seal(2))
    original = fed.path(layout.seal(2)).read_bytes()
    fed.path(layout.seal(2)).write_bytes(sign_record(body | {"sealed_at": body["sealed_at"] + 1},
                                                     identity(fed, body["author"])))
    read = []
    real_get = type(fed.storage).get
    monkeypatch.setattr(type(fed.storage), "get", lambda self, key: read.append(key) or real_get(self, key))
    with pytest.raises(IntegrityError, match=r"rounds/00002/SEAL.json: the seal of round 2 differs from the one "
                                             r"this site adopted"):
        fed.run("site1")
    assert read == ["federation.json", layout.seal(2)]
    fed.path(layout.seal(2)).unlink()
    with pytest.raises(IntegrityError, match="the seal of round 2, which this site adopted, is gone"):
        fed.run("site1")
    fed.path(layout.seal(2)).write_bytes(original)
    assert fed.run("site1").finished


@pytest.mark.parametrize("field", ["seal", "previous", "result"])
def test_a_merge_record_off_the_chain_halts_naming_both_sites_and_what_differs(fed, field):
    """site2 (a patched node, or the operator showing it another history) publishes a
    round-2 merge record naming another seal, another previous result or another result:
    site0 halts naming both sites and the field; verify fails with exit 7 naming the round."""
    key = layout.merged(2, "site2")
    fed.path(key).write_bytes(sign_record(body_of(fed, key) | {field: "0" * 64}, identity(fed, "site2")))
    with pytest.raises(FederationHalted, match=rf"round 2: the merge computed by site2 differs from site0's "
                                               rf"\({field} 0000000000000000 != "):
        fed.remerge("site0", 2)
    result = CliRunner().invoke(app, ["verify", "--site", "site1", "--home", str(fed.home)])
    assert result.exit_code == 7 and "round 2: sites merged differently (site0: " in result.output


# --------------------------------------------------------------------------- squatting
JUNK_KEYS = [layout.FINGERPRINT_SEAL, layout.summary("site1"), layout.histogram("site2"), layout.plan("site1"),
             layout.plan_hash("site1"), layout.seal(0),
             layout.commit(1, "site1"), layout.meta(1, "site1"), layout.seal(1), layout.merged(1, "site2"),
             layout.final_metrics("site2")]


@pytest.mark.parametrize("key", JUNK_KEYS)
def test_junk_at_a_fixed_key_before_its_owner_writes_costs_a_slot_not_the_federation(tmp_path, finished, key):
    """Anyone with write access, and no key, writes junk where an object will go before
    its owner writes it: the federation finishes with the same models as without it, the
    object is in the next slot, and verify and status name the junk."""
    fed = factory.make(tmp_path)
    fed.storage.put_new(key, b"junk, no signature")
    fed.run_all()
    assert final_models(fed) == final_models(finished)
    assert fed.storage.exists(key + ".1")  # the owner's object went to the next slot
    assert bad_keys(fed) == {key: f"{key}: not JSON (Expecting value: line 1 column 1 (char 0))"} if not key.endswith(".p2pf") \
        else list(bad_keys(fed)) == [key]
    assert fed.run("site0").finished
    home, _, f = node.open_site(fed.home, "site0")
    if key not in (layout.summary("site1"), layout.histogram("site2")):  # status reads every other kind
        assert list(status.build(f, home.identity())["junk"]) == [key]


def test_a_foreign_seal_in_slot_0_and_a_race_still_give_one_seal_for_everyone(tmp_path):
    """A seal signed by a stranger sits in round 1's slot 0; four participants race to seal:
    exactly one wins, in slot 1, and every site adopts it and merges alike."""
    fed = factory.make(tmp_path, n=4, rounds=1)
    stranger = Identity.generate("site0")
    fed.storage.put_new(layout.seal(1), sign_record({"kind": "seal", "name": layout.seal(1)}, stranger))
    winners = race_to_seal_round_1(fed)
    assert len(winners) == 1
    fed.run_all()
    assert json.loads(fed.storage.get(layout.slot(layout.seal(1), 1)))["signer"] == winners[0]
    assert len({fed.merged_record(s, 1)["result"] for s in fed.sites}) == 1
    assert "bad signature (claims to be from site0)" in bad_keys(fed)[layout.seal(1)]


def test_every_slot_taken_by_junk_ends_in_one_clear_error(tmp_path):
    fed = factory.make(tmp_path, rounds=1)
    key = layout.commit(1, "site1")
    for i in range(layout.MAX_SLOTS):
        fed.storage.put_new(layout.slot(key, i), b"junk")
    fed.prepare()
    fed.run("site0", stop_after="initial model")
    with pytest.raises(IntegrityError, match=rf"{key}: all 8 slots hold objects that do not count \(junk: "):
        fed.run("site1")


# --------------------------------------------------------------------------- exclusion reasons
def test_exclusion_reasons_are_only_in_envelopes_yet_members_see_them(tmp_path):
    fed = factory.make(tmp_path, rounds=1)
    actions = []
    for _ in range(12):
        reports = [fed.run(s, absurd_cases(0) if s == "site1" else NumpyTrainer) for s in fed.sites]
        actions += [a for r in reports for a in r.actions]
        if all(r.finished for r in reports):
            break
    why = "site 'site1': rounds/00001/site1/meta.p2pf: payload.cases: 0 is outside 1..10000000"
    assert f"merged round 1 (excluded {why})" in actions
    records = [k for k in factory.keys(fed) if not k.endswith((".p2pf", ".shard")) and ".p2pf." not in k]
    for key in records:
        text = fed.storage.get(key).decode()
        assert "outside" not in text and "payload.cases" not in text, key
    record = body_of(fed, layout.merged(1, "site0"))
    assert record["excluded"] == ["site1"] and record["reasons"]["key"] == layout.merge_reasons(1, "site0")
    home, _, f = node.open_site(fed.home, "site2")
    assert status.build(f, home.identity())["rounds"][1]["excluded"] == {"site1": why}
    assert status.build(f, None)["rounds"][1]["excluded"] == {"site1": None}
    assert fed.merged_record("site0", 1)["excluded"] == {"site1": why}  # the site home keeps them
    assert bad_keys(fed) == {layout.meta(1, "site1"): why}  # verify names the member's malformed metadata
