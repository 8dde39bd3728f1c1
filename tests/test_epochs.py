"""Membership as a signed, epoch-numbered log (docs/design.md 7.1): admissions need a
quorum of the previous epoch's members, nothing outside the chain is membership, and
every site refuses a rolled back or forked history (issue 11, attacks 4 and 12)."""
from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

import factory
from p2pfed import crypto, epochs, layout, node, objects
from p2pfed import federation as fedmod
from p2pfed.cli.app import app
from p2pfed.crypto import Identity, sign_record
from p2pfed.errors import IntegrityError, SetupError
from p2pfed.verify import verify_storage
from test_membership import fed_fp

runner = CliRunner()


def cli(*args, ok=True):
    result = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def me(fed, site: str) -> Identity:
    return node.open_site(fed.home, site)[0].identity()


def members(fed) -> list[str]:
    return sorted(fedmod.load(fed.storage).members)


def admit(fed, name: str, by: str, fp: str, ok=True):
    return cli("admit", name, "--site", by, "--fingerprint", fp, "--home", fed.home, ok=ok)


def forge(fed, by: Identity, change: dict, who=None, approvers=()) -> str:
    """What a patched node would write: a proposal for the next epoch, signed by `by`,
    with its approval and those of `approvers`. Returns the proposal's key."""
    shared = fedmod.load(fed.storage)
    head = shared.log.head
    key, data = epochs.proposal(shared.id, head, change, epochs.changed(head, change, who), by)
    fed.storage.put_new(key, data)
    for a in (by, *approvers):
        fed.storage.put_new(*epochs.approval(shared.id, head.number + 1, 0, crypto.sha256_hex(data), a))
    return key


# --------------------------------------------------------------------------- quorum
def test_one_member_alone_cannot_admit_when_the_quorum_needs_two(tmp_path):
    """Three members (quorum: 2). The first admit proposes and says what is missing; the
    site is no member until a second member approves the same proposal."""
    fed = factory.make(tmp_path, n=3, sites=4)
    fp = factory.join(fed, "site3").public().fingerprint()
    first = admit(fed, "site3", "site0", fp).stdout
    assert members(fed) == ["site0", "site1", "site2"]
    assert "Approved epoch 3: admit 'site3'" in first
    assert "1 of 2 approvals, 1 more needed from site1, site2." in first
    report = fed.run("site3")
    assert report.phase == "joining" and "waiting for a member to admit 'site3'" in report.message
    again = admit(fed, "site3", "site0", fp).stdout  # the same member again adds nothing
    assert "1 of 2 approvals" in again and members(fed) == ["site0", "site1", "site2"]
    second = admit(fed, "site3", "site1", fp).stdout
    assert "Approved epoch 3: admit 'site3'" in second and "it is in force (2 of 2 approvals: site0, site1)" in second
    assert members(fed) == ["site0", "site1", "site2", "site3"]
    assert "already a member" in admit(fed, "site3", "site2", fp).stdout


def test_status_shows_the_epoch_in_force_and_what_waits_for_approvals(tmp_path):
    """A member reading `p2pfed status` sees the membership epoch and an open admission
    with the approvals it has and needs; once in force, the proposal is gone."""
    fed = factory.make(tmp_path, n=3, sites=4)
    fp = factory.join(fed, "site3").public().fingerprint()
    admit(fed, "site3", "site0", fp)
    shown = " ".join(cli("status", "--site", "site1", "--home", fed.home).stdout.split())
    epoch = fedmod.load(fed.storage).log.chain[-1]
    assert f"membership epoch 2 ({epoch.sha256[:12]}), 3 members" in shown
    assert "proposed: admit 'site3' from round 0, 1 of 2 approvals (site0)" in shown
    admit(fed, "site3", "site1", fp)
    doc = json.loads(cli("status", "--site", "site1", "--home", fed.home, "--json").stdout)
    assert doc["epoch"]["number"] == 3 and doc["epoch"]["members"] == ["site0", "site1", "site2", "site3"]
    assert doc["proposals"] == []
    assert {m["site"]: m["admitted_by"] for m in doc["members"]}["site3"] == "site0, site1"  # the approvers


def test_the_admission_quorum_is_a_setting_and_never_below_a_majority(tmp_path):
    assert [epochs.quorum(None, n) for n in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]
    assert [epochs.quorum(1, n) for n in (1, 3, 5)] == [1, 2, 3]  # raised to a majority
    assert [epochs.quorum(3, n) for n in (1, 2, 3, 5)] == [1, 2, 3, 3]
    fed = factory.make(tmp_path, n=3, sites=4, admission_quorum=3)
    fp = factory.join(fed, "site3").public().fingerprint()
    admit(fed, "site3", "site0", fp)
    assert "1 more needed from site2" in admit(fed, "site3", "site1", fp).stdout
    assert members(fed) == ["site0", "site1", "site2"]
    assert "in force (3 of 3 approvals" in admit(fed, "site3", "site2", fp).stdout
    assert members(fed) == ["site0", "site1", "site2", "site3"]


def test_a_single_member_writing_a_whole_epoch_does_not_change_membership(tmp_path):
    """A patched member writes a proposal admitting its accomplice and approves it: with
    one approval of the two needed it is an open proposal, nothing more, for every reader."""
    fed = factory.make(tmp_path, n=3, sites=4)
    mallory = Identity.generate("mallory")
    key = forge(fed, me(fed, "site0"), {"op": epochs.ADMIT, "site": "mallory"}, mallory.public())
    shared = fedmod.load(fed.storage)
    assert "mallory" not in shared.members
    assert [(p.key, p.approvers, p.missing) for p in shared.log.open] == [(key, ("site0",), 1)]
    # nor can it remove an honest member alone
    fed2 = factory.make(tmp_path / "b", n=3)
    forge(fed2, me(fed2, "site0"), {"op": epochs.REMOVE, "site": "site2"})
    assert members(fed2) == ["site0", "site1", "site2"]
    assert fed2.run("site2").phase != "joining"


def test_a_member_record_outside_the_epoch_chain_is_ignored_whoever_signed_it(tmp_path):
    """Attack 4: a member signs a `members/<site>.json` record for its accomplice (what
    admitted a site before the epoch log), and the operator drops junk at an epoch key.
    Neither is membership: the accomplice is not admitted, ticks go on, verify names both."""
    fed = factory.make(tmp_path, n=2, sites=3)
    shared = fedmod.load(fed.storage)
    mallory = Identity.generate("mallory")
    body = {"kind": "member", "federation": shared.id, "name": "members/mallory.json", "site": "mallory",
            "identity": mallory.public().to_json(), "author": "site0", "created": 0}
    fed.storage.put_new("members/mallory.json", sign_record(body, me(fed, "site0")))
    fed.storage.put_new("epochs/00002/r00000/site1.json", b"junk")
    assert "mallory" not in fedmod.load(fed.storage).members
    assert fed.run("site1").phase == "joining"  # waits for a third member, no halt
    bad = {f.key: f.detail for f in verify_storage(fedmod.load(fed.storage), me(fed, "site0")) if not f.ok}
    assert bad == {"members/mallory.json": "members/mallory.json: not an object of the p2pfed protocol",
                   "epochs/00002/r00000/site1.json":
                   "epochs/00002/r00000/site1.json: not JSON (Expecting value: line 1 column 1 (char 0))"}


def test_a_new_start_seal_after_the_old_one_is_deleted_holds_no_forged_member(tmp_path):
    """Attack 4: after the start, a member signs a member record for its accomplice; the
    operator deletes the start seal. A site that has not started yet seals again: with
    the chain's members only, and that seal pins their epoch."""
    fed = factory.make(tmp_path, n=3)
    fed.run("site0", stop_after="start")
    shared = fedmod.load(fed.storage)
    mallory = Identity.generate("mallory")
    body = {"kind": "member", "federation": shared.id, "name": "members/mallory.json", "site": "mallory",
            "identity": mallory.public().to_json(), "author": "site0", "created": 0}
    fed.storage.put_new("members/mallory.json", sign_record(body, me(fed, "site0")))
    fed.path("fingerprints/SEAL.json").unlink()
    fed.run("site1", stop_after="start")
    seal = json.loads(fed.path("fingerprints/SEAL.json").read_text())["body"]
    assert seal["participants"] == ["site0", "site1", "site2"]
    assert (seal["epoch"], seal["epoch_sha256"]) == (2, shared.log.head.sha256)


def test_a_one_approval_epoch_written_after_the_start_adds_no_participant(tmp_path):
    """The same with the epoch log: the member proposes and approves its accomplice's
    admission itself (one approval of two); a re-sealed start still lists the chain's members."""
    fed = factory.make(tmp_path, n=3)
    fed.run("site0", stop_after="start")
    mallory = Identity.generate("mallory")
    forge(fed, me(fed, "site0"), {"op": epochs.ADMIT, "site": "mallory"}, mallory.public())
    fed.path(layout.FINGERPRINT_SEAL).unlink()
    fed.run("site2", stop_after="start")
    seal = json.loads(fed.path(layout.FINGERPRINT_SEAL).read_text())["body"]
    assert seal["participants"] == ["site0", "site1", "site2"] and seal["epoch"] == 2


# --------------------------------------------------------------------------- competing proposals
def test_competing_proposals_resolve_to_one_epoch_for_every_site(tmp_path):
    """Two members propose different admissions for epoch 3. `admit` will not split the
    votes (it names the open proposal); a racing node's second proposal loses once the
    first has its quorum, and every site reads the same member set."""
    fed = factory.make(tmp_path, n=3, sites=5)
    fp3 = factory.join(fed, "site3").public().fingerprint()
    site4 = factory.join(fed, "site4")
    admit(fed, "site3", "site0", fp3)
    split = admit(fed, "site4", "site2", site4.public().fingerprint(), ok=False)
    assert split.exit_code == 3 and "epoch 3 is already proposed: admit 'site3' by site0" in split.output
    lost = forge(fed, me(fed, "site2"), {"op": epochs.ADMIT, "site": "site4"}, site4.public())
    admit(fed, "site3", "site1", fp3)
    for s in fed.sites:
        shared = node.open_site(fed.home, s)[2]
        assert sorted(shared.members) == ["site0", "site1", "site2", "site3"]
        assert shared.log.ignored[lost].startswith(f"{lost}: lost epoch 3 to epochs/00003/r00000/site0.json")
    # site2's approval slot of epoch 3 is spent on the loser; site4 is epoch 4 (3 of 4 approvals)
    out = admit(fed, "site4", "site2", site4.public().fingerprint()).stdout
    assert "Approved epoch 4: admit 'site4'" in out and "1 of 3 approvals, 2 more needed" in out


# --------------------------------------------------------------------------- history kept by each site
def test_a_rolled_back_epoch_log_is_refused_on_the_next_tick(tmp_path):
    """A site keeps the verified chain; the operator deleting an epoch's approvals (or
    the whole log) later is refused by the tick and by the CLI, exit 6."""
    fed = factory.make(tmp_path, n=3)
    fed.run("site0", stop_after="start")
    fed.path(layout.epoch_approval(2, 0, "site1")).unlink()
    with pytest.raises(IntegrityError, match="epoch 2 disappeared from the shared storage"):
        fed.run("site0")
    result = cli("status", "--site", "site0", "--home", fed.home, ok=False)
    assert result.exit_code == 6 and "epoch 2 disappeared" in result.output


def test_an_equivocating_member_and_the_operator_cannot_show_two_sites_two_member_sets(tmp_path):
    """site1 signs approvals for two competing proposals of epoch 3; the operator shows
    site0 one and site2 the other. site0 starts the federation on its epoch 3; site2 finds
    the start seal pinning an epoch that is not in its chain and refuses, and site0 refuses
    the swapped history once it reads it (status re-reads the log)."""
    fed = factory.make(tmp_path, n=3, sites=4)
    s0, s1, s2 = (me(fed, s) for s in ("site0", "site1", "site2"))
    site3, site4 = factory.join(fed, "site3"), factory.join(fed, "site4")
    shared = fedmod.load(fed.storage)
    head = shared.log.head
    a = {"op": epochs.ADMIT, "site": "site3"}
    b = {"op": epochs.ADMIT, "site": "site4"}
    key_a, data_a = epochs.proposal(shared.id, head, a, epochs.changed(head, a, site3.public()), s0)
    key_b, data_b = epochs.proposal(shared.id, head, b, epochs.changed(head, b, site4.public()), s2)
    for key, data in ((key_a, data_a), (key_b, data_b)):
        fed.storage.put_new(key, data)
    fed.storage.put_new(*epochs.approval(shared.id, 3, 0, crypto.sha256_hex(data_a), s0))
    fed.storage.put_new(*epochs.approval(shared.id, 3, 0, crypto.sha256_hex(data_b), s2))
    vote = fed.path(layout.epoch_approval(3, 0, "site1"))
    vote.parent.mkdir(parents=True, exist_ok=True)
    vote.write_bytes(epochs.approval(shared.id, 3, 0, crypto.sha256_hex(data_a), s1)[1])
    fed.run("site0", stop_after="start")  # site0: epoch 3 admits site3; it seals the start
    vote.write_bytes(epochs.approval(shared.id, 3, 0, crypto.sha256_hex(data_b), s1)[1])
    with pytest.raises(IntegrityError, match="pins epoch 3 .*not one of this site's membership chain"):
        fed.run("site2")
    result = cli("status", "--site", "site0", "--home", fed.home, ok=False)
    assert result.exit_code == 6 and "epoch 3 differs from the one this site verified" in result.output


def test_a_start_seal_that_pins_another_member_set_is_refused(tmp_path):
    """A member seals the start with the right participants but another epoch's hash."""
    fed = factory.make(tmp_path, n=2)
    shared = fedmod.load(fed.storage)
    objects.put_record(shared, layout.FINGERPRINT_SEAL, "fingerprint-seal",
                       {"participants": ["site0", "site1"], "sealed_at": 0, "epoch": 1,
                        "epoch_sha256": shared.log.chain[0].sha256}, me(fed, "site0"))
    with pytest.raises(IntegrityError, match="pins epoch 1 .*not one of this site's membership chain"):
        fed.run("site1")


def test_a_non_member_cannot_propose_and_admit_outside_the_chain_is_refused(tmp_path):
    fed = factory.make(tmp_path, n=2, sites=3)
    factory.join(fed, "site2")
    result = admit(fed, "site1", "site2", "00" * 32, ok=False)
    assert result.exit_code == 3 and "site 'site2' is not a member" in result.output
    with pytest.raises(SetupError, match="not a member"):
        fedmod.admit(fedmod.load(fed.storage), "site2", Identity.generate("x"), "00" * 32)


# --------------------------------------------------------------------------- remove, rotate-keys
def sweep(fed, sites, times=12) -> dict:
    """Tick `sites` round-robin `times` times; the last report of each."""
    reports = {}
    for _ in range(times):
        for s in sites:
            reports[s] = fed.run(s)
    return reports


def envelopes(fed, since: int) -> list[str]:
    """Keys of every envelope of round `since` and later, and the final metrics."""
    return [k for k in factory.keys(fed) if layout.kind_of(k)[1]
            and (k.startswith("final/") or (layout.round_of(k) or -1) >= since)]


def opens(fed, key: str, reader: Identity) -> bool:
    shared = fedmod.load(fed.storage)
    kind, _, author = layout.kind_of(key)
    try:
        objects.read_envelope(shared, key, kind, reader, author=author, blob=fed.storage.get(key))
        return True
    except IntegrityError:
        return False


def test_a_removed_site_cannot_open_anything_written_after_its_removal(tmp_path):
    """Round 0 is open; site0 and site1 remove site2 (2 of 3): it applies from round 2.
    site2 takes part in round 1, then stops; rounds 2..4 are sealed by site0 and site1
    alone, every envelope from round 2 on is encrypted to them only, and they agree."""
    fed = factory.make(tmp_path, n=3, rounds=4)
    fed.prepare()
    first = cli("remove", "site2", "--site", "site0", "--home", fed.home).stdout
    assert "Approved epoch 3: remove 'site2': 1 of 2 approvals, 1 more needed from site1, site2. " \
           "It applies from round 2." in first
    second = cli("remove", "site2", "--site", "site1", "--home", fed.home).stdout
    assert "it is in force (2 of 2 approvals: site0, site1). It applies from round 2." in second
    site2 = me(fed, "site2")
    reports = sweep(fed, fed.sites)
    assert reports["site0"].finished and reports["site1"].finished
    assert reports["site2"].phase == "removed" and "takes part in no round from 2 on" in reports["site2"].message
    assert sorted(json.loads(fed.path(layout.seal(1)).read_text())["body"]["contributions"]) == fed.sites
    for r in (2, 3, 4):
        seal = json.loads(fed.path(layout.seal(r)).read_text())["body"]
        assert sorted(seal["contributions"]) == ["site0", "site1"] and seal["reason"] == "all"
    later = envelopes(fed, 2)
    assert later and not [k for k in later if opens(fed, k, site2)]
    assert all(opens(fed, k, me(fed, "site0")) for k in later)
    assert opens(fed, layout.meta(1, "site0"), site2)  # what it received before stays readable
    finals = {fed.merged_record(s, 4)["result"] for s in ("site0", "site1")}
    assert len(finals) == 1
    assert "'site2' is not a member; nothing to do." in cli("remove", "site2", "--site", "site0",
                                                          "--home", fed.home).stdout


@pytest.mark.parametrize("secure", [False, True])
def test_a_rotated_key_does_not_open_later_objects(tmp_path, secure):
    """site1 rotates its keys while round 0 is open; site0 and site2 approve the new
    fingerprint with `admit` (the quorum, 2 of 3, counts site1's own approval too). From
    round 2 on site1 signs and reads with the new keys; the old ones are deleted and open
    nothing written from then on. The federation ends on one model. With secure
    aggregation, the merge of round 1, which waits for reveals over several ticks, still
    reads round 1's objects with the old keys."""
    fed = factory.make(tmp_path, n=3, rounds=4, secure_aggregation=secure)
    fed.prepare()
    old = me(fed, "site1")
    out = cli("rotate-keys", "--site", "site1", "--home", fed.home).stdout
    assert "Approved epoch 3: rotate 'site1'" in out and "1 of 2 approvals, 1 more needed from site0, site2" in out
    new = node.open_site(fed.home, "site1")[0].next_identity()
    bad = admit(fed, "site1", "site0", "ab" * 32, ok=False)
    assert bad.exit_code == 6 and "fingerprint mismatch for 'site1'" in bad.output
    assert "it is in force" in admit(fed, "site1", "site0", new.public().fingerprint()).stdout
    reports = sweep(fed, fed.sites)
    assert all(r.finished for r in reports.values())
    home = node.open_site(fed.home, "site1")[0]
    assert home.identity().public() == new.public() and home.next_identity() is None
    later = envelopes(fed, 2)
    assert later and not [k for k in later if opens(fed, k, old)]
    assert [k for k in later if not opens(fed, k, new)] == []
    assert opens(fed, layout.meta(1, "site0"), old) and not opens(fed, layout.meta(1, "site0"), new)
    assert len({fed.merged_record(s, 4)["result"] for s in fed.sites}) == 1
    assert all(f.ok for f in verify_storage(fedmod.load(fed.storage), home.identity()))


def test_only_a_site_itself_can_rotate_its_keys_and_a_late_approval_is_refused(tmp_path):
    """site0 proposes other keys for site1 (a rotation is the site's own): ignored. A
    removal whose round opened before its quorum was complete is never approved: the
    next member's `remove` says so and proposes it anew, for a later round."""
    fed = factory.make(tmp_path, n=3, rounds=4)
    fed.prepare()
    key = forge(fed, me(fed, "site0"), {"op": epochs.ROTATE, "site": "site1"}, Identity.generate("site1").public(),
                approvers=[me(fed, "site2")])
    shared = fedmod.load(fed.storage)
    assert shared.members["site1"] == me(fed, "site1").public() and key in shared.log.ignored
    fed2 = factory.make(tmp_path / "b", n=3, rounds=4)
    fed2.prepare()
    first = cli("remove", "site2", "--site", "site0", "--home", fed2.home).stdout
    assert "1 of 2 approvals, 1 more needed from site1, site2. It applies from round 2." in first
    for s in fed2.sites:
        fed2.run(s, stop_after="seal")  # rounds 0 and 1 sealed: round 2 is open
    late = cli("remove", "site2", "--site", "site1", "--home", fed2.home).stdout
    assert "epochs/00003/r00002/site0.json came too late for the round it named; this is a new proposal." in late
    assert "1 of 2 approvals, 1 more needed from site0, site2. It applies from round 4." in late
    assert members(fed2) == ["site0", "site1", "site2"]
    assert "It applies from round 4" in cli("remove", "site2", "--site", "site0", "--home", fed2.home).stdout
    assert members(fed2) == ["site0", "site1"]
    reports = sweep(fed2, fed2.sites)
    assert reports["site0"].finished and reports["site2"].phase == "removed"
    assert "from 4 on" in reports["site2"].message


# --------------------------------------------------------------------------- admission into a running federation
@pytest.mark.parametrize("mode", ["ffe", "asym"])
def test_a_site_admitted_into_a_running_federation_ends_with_the_same_model(tmp_path, mode):
    """site3 joins a started federation of 4 rounds; site0 and site1 admit it while round
    1 is open in asym (0 in FFE, before the initial model): it takes part from round 2
    (3 in asym), every later seal counts it, and it ends on the same merged model as
    the others. FFE: site0 hands it the merge of the round before, which it checks
    against the merge records; it never reads that round's contributions."""
    fed = factory.make(tmp_path, n=3, rounds=4, mode=mode)
    fed.prepare()
    if mode == "asym":
        for s in fed.sites:
            fed.run(s, stop_after="upload")  # round 1 is open
    joined = cli("join", fed.url, "--site", "site3", "--dataset", 4, "--nnunet-raw",
                 factory.raw_dataset_for(fed, "site3"), "--nnunet-preprocessed", tmp_path / "site3" / "pre",
                 "--nnunet-results", tmp_path / "site3" / "res", "--home", fed.home, "--federation", fed_fp(fed.url),
                 "--json")
    fp = json.loads(joined.stdout)["fingerprint"]
    fed.sites.append("site3")
    first = 2 if mode == "ffe" else 3
    admit(fed, "site3", "site0", fp)
    assert f"in force (2 of 2 approvals: site0, site1). It applies from round {first}." in \
        admit(fed, "site3", "site1", fp).stdout
    reports = sweep(fed, fed.sites)
    assert all(r.finished for r in reports.values()), {s: r.message for s, r in reports.items()}
    for r in range(1, 5):
        seal = json.loads(fed.path(layout.seal(r)).read_text())["body"]
        assert ("site3" in seal["contributions"]) == (r >= first), r
    results = {fed.merged_record(s, 4)["result"] for s in fed.sites}
    owns = {fed.merged_record(s, 4)["own"] for s in fed.sites}
    assert len(results) == 1 and (len(owns) == 1 or mode == "asym")
    site3 = me(fed, "site3")
    assert not opens(fed, layout.meta(first - 1, "site0"), site3) and opens(fed, layout.meta(first, "site0"), site3)
    if mode == "ffe":
        assert fed.merged_record("site3", first - 1)["handed_over_by"] == "site0"
        assert fed.merged_record("site3", first - 1)["own"] == fed.merged_record("site0", first - 1)["own"]
    assert all(f.ok for f in verify_storage(fedmod.load(fed.storage), site3))


def test_a_site_admitted_while_the_start_was_sealed_takes_part_from_the_first_round(tmp_path):
    """The start seal pins epoch 0 (site0 alone, `--sites 1`) while epoch 1, admitting site1
    before the start (from round 0), was decided: site1 is not a start participant but takes
    part from round 1 on (asym: from its own network), instead of being told it came too late."""
    fed = factory.make(tmp_path, n=2, sites=1, mode="asym")
    shared = fedmod.load(fed.storage)
    objects.put_record(shared, layout.FINGERPRINT_SEAL, "fingerprint-seal",
                       {"participants": ["site0"], "sealed_at": int(time.time()), "epoch": 0,
                        "epoch_sha256": shared.log.chain[0].sha256}, me(fed, "site0"))
    reports = sweep(fed, fed.sites, times=6)
    assert all(r.finished for r in reports.values()), {s: r.message for s, r in reports.items()}
    for r in (1, 2):
        assert sorted(json.loads(fed.path(layout.seal(r)).read_text())["body"]["contributions"]) == fed.sites


def test_junk_at_the_handover_keys_costs_a_slot_not_the_admission(tmp_path):
    """Anyone with write access drops junk where the publisher will hand the newcomer the
    model (record and fingerprint): the handover goes to the next slots and the newcomer
    ends on the same model as the others."""
    fed = factory.make(tmp_path, n=3, rounds=3)
    fed.prepare()
    fp = factory.join(fed, "site3").public().fingerprint()
    admit(fed, "site3", "site0", fp)
    admit(fed, "site3", "site1", fp)
    for key in (layout.handover(1, "site0", "site3"), layout.handover_fingerprint(1, "site0", "site3")):
        fed.storage.put_new(key, b"junk")
    reports = sweep(fed, fed.sites)
    assert all(r.finished for r in reports.values()), {s: r.message for s, r in reports.items()}
    assert fed.storage.exists(layout.handover(1, "site0", "site3") + ".1")
    assert len({fed.merged_record(s, 3)["own"] for s in fed.sites}) == 1


def test_junk_at_the_membership_keys_costs_a_slot_not_the_admission(tmp_path):
    """Attack 7 on the membership log: before the founder admits the second site, anyone
    with write access drops junk at the keys of its proposal and its approval (a founder
    alone could then never admit anyone, so the federation would never start). The
    records go to the next slots, the federation runs, and verify names the junk."""
    fed = factory.make(tmp_path, n=1, sites=2)
    fp = factory.join(fed, "site1").public().fingerprint()
    junk = [layout.epoch_proposal(1, 0, "site0"), layout.epoch_approval(1, 0, "site0")]
    for key in junk:
        fed.storage.put_new(key, b"junk")
    assert "it is in force (1 of 1 approvals: site0)" in admit(fed, "site1", "site0", fp).stdout
    assert members(fed) == ["site0", "site1"]
    assert all(fed.storage.exists(key + ".1") for key in junk)
    fed.run_all()
    bad = {f.key for f in verify_storage(fedmod.load(fed.storage), me(fed, "site0")) if not f.ok}
    assert bad == set(junk)


def test_a_handover_of_another_model_is_refused(tmp_path):
    """The publisher (site0) signs a handover record naming another model than the merge
    of round 1 every participant recorded: the newcomer refuses it and trains nothing."""
    fed = factory.make(tmp_path, n=3, rounds=4)
    fed.prepare()
    fp = factory.join(fed, "site3").public().fingerprint()
    admit(fed, "site3", "site0", fp)
    admit(fed, "site3", "site1", fp)
    sweep(fed, fed.sites[:3], times=4)  # rounds 0 and 1 done; round 2 waits for site3
    key = layout.handover(1, "site0", "site3")
    body = json.loads(fed.path(key).read_text())["body"]
    assert body["model"] == fed.merged_record("site0", 1)["own"]
    fed.path(key).write_bytes(sign_record({**body, "model": "0" * 64}, me(fed, "site0")))
    with pytest.raises(IntegrityError, match="hands over model 000000000000, not the merge of round 1"):
        fed.run("site3")
    assert not fed.path(layout.commit(2, "site3")).exists()
