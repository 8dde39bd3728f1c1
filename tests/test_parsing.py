"""Strict parsing and size caps (docs/design.md section 4.5; section 8.6, attack 8).

What a member or the storage hands a site is parsed strictly and checked against its
schema before it is used: oversized objects are refused before they are downloaded,
malformed JSON (deep nesting, NaN, duplicate keys, bad UTF-8, non-canonical bytes) is an
integrity error naming the object, never a crash, and member-signed content that breaks
its schema names the member (a rejected contribution inside a round). Attacks are forged
through the public p2pfed.crypto / p2pfed.objects API, as a patched node would write them,
and run through the CLI as a site would."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import factory
from p2pfed import crypto, layout, objects
from p2pfed.cli.app import app
from p2pfed.errors import ContributionRejected, IntegrityError
from p2pfed.node import open_site
from test_attacks import forge_round_1
from test_membership import cli, site_args

HERE = Path(__file__).parent
LINE = re.compile(r"^p2pfed: error: .+ \(hint: .+\)$")
DEEP = b"[" * 100_000 + b"]" * 100_000


def run_cli(*args) -> tuple[int, str]:
    """Exit code and the last line of a CLI command, which must be one error line."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    last = result.output.strip().splitlines()[-1] if result.output.strip() else repr(result.exception)
    assert LINE.match(last) and "Traceback" not in result.output, (result.output[-2000:], result.exception)
    return result.exit_code, last


def verify(fed, site="site0") -> tuple[int, str]:
    return run_cli("verify", "--site", site, "--home", fed.home)


def me(fed, site):
    home, _, view = open_site(fed.home, site)
    return home.identity(), view


# --------------------------------------------------------------------------- strict JSON
def record(body: bytes, signer: bytes = b'"site1"') -> bytes:
    """A record's bytes around a raw body, as junk or a patched member would write it."""
    return b'{"body":' + body + b',"signature":"' + b"A" * 86 + b'==","signer":' + signer + b"}\n"


STRICT = {  # bytes at a record key -> what the error says (after the key)
    "100,000-deep array": (DEEP, "JSON nested deeper than 32 levels"),
    "deep array in a body": (record(b'{"x":' + DEEP + b"}"), "JSON nested deeper than 32 levels"),
    "NaN": (record(b'{"x":NaN}'), "not strict JSON: JSON constant NaN is not allowed"),
    "Infinity": (record(b'{"x":Infinity}'), "not strict JSON: JSON constant Infinity is not allowed"),
    "-Infinity": (record(b'{"x":-Infinity}'), "not strict JSON: JSON constant -Infinity is not allowed"),
    "duplicate keys": (record(b'{"x":1,"x":2}'), "not strict JSON: duplicate key 'x'"),
    "invalid UTF-8": (record(b'{"x":"\xff\xfe"}'), "not valid UTF-8 (byte 14)"),
    "lone surrogate": (record(b'{"x":"\\ud800"}'), "JSON string is not valid Unicode"),
    "not canonical": (record(b'{"x": 1}'), "JSON is not in canonical form"),
    "huge integer": (record(b'{"x":' + b"9" * 5000 + b"}"), "not JSON (Exceeds the limit (4300 digits)"),
}


@pytest.mark.parametrize("case", list(STRICT))
def test_malformed_json_is_an_integrity_error_naming_the_object_before_the_signature(case):
    data, why = STRICT[case]
    with pytest.raises(IntegrityError) as exc:
        crypto.open_record(data, authors={}, name="plans/site1.json")
    assert exc.value.message.startswith(f"plans/site1.json: {why}"), exc.value.message


@pytest.mark.parametrize("case", ["100,000-deep array", "NaN", "Infinity", "duplicate keys", "invalid UTF-8",
                                  "lone surrogate"])
def test_verify_names_malformed_json_at_a_record_key_exit_6(tmp_path, case):
    """Junk signed in the name of a member: before, NaN/Infinity/a lone surrogate crashed
    the re-encoding for the signature check and the deep array the parser (exit 1)."""
    fed = factory.make(tmp_path, n=2)
    data, why = STRICT[case]
    fed.storage.put_new(layout.plan_hash("site1"), data)
    code, last = verify(fed)
    assert code == 6 and f"first: plans/site1.json: plans/site1.json: {why}" in last, last


def envelope(header: bytes, hlen: int | None = None) -> bytes:
    hlen = len(header) if hlen is None else hlen
    return crypto.PREFIX.pack(crypto.MAGIC, crypto.FORMAT_VERSION, crypto.SUITE_ID, hlen) + header + b"\0" * 64


@pytest.mark.parametrize("blob, why", [
    (envelope(b" " * (2 << 20)), f"envelope header length {2 << 20} is out of bounds"),
    (envelope(b'{"author":"site1","x":NaN}'), "envelope header: not strict JSON: JSON constant NaN"),
    (envelope(DEEP), "envelope header: JSON nested deeper than 32 levels"),
    (envelope(b'{"author":"site1","author":"site0"}'), "envelope header: not strict JSON: duplicate key 'author'"),
    (envelope(b'{"author":"\xc3"}'), "envelope header: not valid UTF-8"),
    (envelope(b'{"author": "site1"}'), "envelope header: JSON is not in canonical form"),
], ids=["2 MiB header", "NaN", "deep", "duplicate keys", "invalid UTF-8", "not canonical"])
def test_malformed_envelope_headers_are_refused_naming_the_object(blob, why):
    with pytest.raises(IntegrityError) as exc:
        crypto.read_header(blob, "final/site1.p2pf")
    assert exc.value.message.startswith(f"final/site1.p2pf: {why}"), exc.value.message


def test_a_nan_commit_is_junk_the_tick_reports_and_verify_names(tmp_path):
    """A commit with NaN at site1's key, read while round 1 is being sealed (before, the
    signature check's re-encoding raised ValueError: exit 1). It is not strict JSON, so
    no one signed it: it counts as absent (a slot, docs/design.md 7.2), the tick waits for
    site1 and reports it, and verify names it with exit 6."""
    fed = factory.make(tmp_path, n=2, mode="asym", rounds=1)
    fed.prepare()
    fed.run("site0", stop_after="upload")
    key = layout.commit(1, "site1")
    fed.storage.put_new(key, record(b'{"round":1,"x":NaN}'))
    report = fed.run("site0")
    assert report.waiting_for == ["site1"]
    assert f"{key}: {key}: not strict JSON: JSON constant NaN is not allowed" in report.junk
    code, last = verify(fed)
    assert code == 6 and f"{key}: not strict JSON: JSON constant NaN is not allowed" in last, last


# --------------------------------------------------------------------------- size caps
RSS_PROBE = """
import resource, sys
sys.path.insert(0, sys.argv[3])
import factory
from p2pfed.errors import P2PFedError
try:
    factory.main(sys.argv[1], sys.argv[2])
except P2PFedError as exc:
    print(exc.message)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)  # MiB (Linux: KiB)
"""


def tick_rss(fed, site) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, str(fed.home), site, str(HERE)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    *out, rss = proc.stdout.strip().splitlines()
    return int(rss), "\n".join(out)


def test_an_oversized_object_is_refused_before_download_and_does_not_inflate_a_tick(tmp_path):
    """A 300 MB object at a commit key (sparse: costs no disk) took a tick from about 56 to
    432 MiB peak RSS, downloaded whole before any check. Now the tick reads at most the
    commit cap + 1 byte and stops naming the key, its size and the cap."""
    fed = factory.make(tmp_path, n=2, mode="asym", rounds=1)
    fed.prepare()
    fed.run("site0", stop_after="upload")
    baseline, _ = tick_rss(fed, "site0")  # waits for site1: reads the same objects but that one
    key = layout.commit(1, "site1")
    fed.path(key).parent.mkdir(parents=True, exist_ok=True)
    with open(fed.path(key), "wb") as fh:
        fh.truncate(300_000_000)
    rss, out = tick_rss(fed, "site0")
    print(f"peak RSS of an idle tick: {baseline} MiB; with a 300 MB object to read: {rss} MiB")
    assert rss < baseline + 16, (baseline, rss)  # what is read: the commit cap (1 MiB) + 1 byte
    cap = layout.max_size(key)
    assert f"{key}: 300000000 bytes, more than the {cap} bytes a commit object may hold; not downloaded" in out


def test_every_kind_has_a_cap_and_foreign_keys_the_record_cap():
    from p2pfed import schema

    caps = {kind: cap for _, kind, _, cap in layout.KINDS}
    assert caps["commit"] == caps["epoch"] == caps["approval"] == schema.RECORD_MAX_BYTES == 1 << 20
    # a shard: its tensor data and safetensors header, plus the largest envelope header
    assert caps["shard"] == crypto.envelope_max_bytes(8 + schema.SHARD_HEADER_BYTES + schema.SHARD_TENSOR_BYTES)
    assert 34 << 20 < caps["shard"] < 35 << 20
    assert caps["meta"] == caps["final"] < 2 << 20 and caps["plan"] < 3 << 20
    assert caps["summary"] < 24 << 20 and caps["histogram"] < 34 << 20
    assert layout.max_size("members/notes.txt") == layout.max_size("probe/x") == schema.RECORD_MAX_BYTES


def test_a_site_never_writes_an_object_over_its_cap(tmp_path):
    fed = factory.make(tmp_path, n=1, mode="asym")
    ident, view = me(fed, "site0")
    key = layout.meta(1, "site0")
    with pytest.raises(Exception) as exc:
        objects.put_envelope(view, key, "meta", b" " * (2 << 20), ident, round=1)
    assert exc.value.exit_code == 3 and f"{key}: this site's meta is" in exc.value.message
    assert not fed.storage.exists(key)


# --------------------------------------------------------------------------- schemas, by kind
def forged_final(fed, payload) -> str:
    ident, view = me(fed, "site1")
    key = layout.final_metrics("site1")
    objects.put_envelope(view, key, "final", crypto.canonical_json(payload), ident)
    return key


@pytest.mark.parametrize("payload, why", [
    ({"model": 5, "validation_dice": None}, "payload.model: expected a string, got 5"),
    ({"model": "0" * 64, "validation_dice": {"1": "high"}}, "payload.validation_dice.1: expected a finite number, got a string"),
    ({"model": "0" * 64, "validation_dice": None, "note": "x"}, "payload: has unknown field 'note'"),
    ({"model": "xyz", "validation_dice": None}, "payload.model: 'xyz' is not of the form [0-9a-f]{64}"),
], ids=["model-type", "dice-type", "extra-field", "model-pattern"])
def test_verify_names_the_member_of_a_final_payload_against_its_schema(tmp_path, payload, why):
    fed = factory.make(tmp_path, n=2)
    key = forged_final(fed, payload)
    code, last = verify(fed)
    assert code == 6 and f"{key}: {why}" in last and "(signed by member 'site1')" in last, last


MERGED = {"round": 1, "result": "0" * 64, "per_site": {}, "seal": "0" * 64, "previous": None, "excluded": [],
          "reasons": None}  # a well-formed merge record body


@pytest.mark.parametrize("key_of, kind, body, why", [
    (layout.plan_hash, "plan-hash", {"plan_sha256": 5}, "body.plan_sha256: expected a string, got 5"),
    (layout.plan_hash, "plan-hash", {"plan_sha256": "0" * 64, "extra": 1}, "body: has unknown field 'extra'"),
    (lambda s: layout.merged(1, s), "merged", {**MERGED, "per_site": {"site0": 7}},
     "body.per_site.site0: expected a string, got 7"),
    (lambda s: layout.merged(1, s), "merged", {**MERGED, "round": -1}, "body.round: -1 is outside 0..9007199254740992"),
], ids=["plan-hash-type", "plan-hash-extra", "merged-per-site", "merged-round"])
def test_verify_names_the_member_of_a_record_against_its_schema(tmp_path, key_of, kind, body, why):
    fed = factory.make(tmp_path, n=2)
    ident, view = me(fed, "site1")
    objects.put_record(view, key_of("site1"), kind, body, ident)
    code, last = verify(fed)
    assert code == 6 and f"{key_of('site1')}: {why} (signed by member 'site1')" in last, last


def test_a_start_seal_against_its_schema_is_junk_named_with_its_member(tmp_path):
    """A member signs a start seal whose participants are a string: it does not count (the
    first valid slot does), every site reports it naming the member, verify exits 6."""
    fed = factory.make(tmp_path, n=2, mode="asym", rounds=1)
    ident, view = me(fed, "site1")
    objects.put_record(view, layout.FINGERPRINT_SEAL, "fingerprint-seal",
                       {"participants": "site0 site1", "sealed_at": 0, "epoch": 0,
                        "epoch_sha256": view.log.chain[0].sha256}, ident)
    why = "body.participants: expected a list, got a string (signed by member 'site1')"
    report = fed.run("site0")
    assert any(line.startswith(layout.FINGERPRINT_SEAL) and why in line for line in report.junk), report.junk
    fed.run_all()
    assert fed.storage.exists(layout.FINGERPRINT_SEAL + ".1")  # the valid start seal took the next slot
    code, last = verify(fed)
    assert code == 6 and why in last, last


def test_a_round_seal_against_its_schema_is_junk_named_with_its_member(tmp_path):
    """Every contribution is listed, so the seal's `reason` was never looked at: any
    value passed. Now it must be one of all, deadline, initial, or the seal does not count."""
    fed = factory.make(tmp_path, n=2, mode="asym", rounds=1)
    fed.prepare()
    for s in fed.sites:
        fed.run(s, stop_after="upload")
    tick = fed.tick("site1")
    commits = {s: sha for s, (sha, _) in tick.view.commits(1).items()}
    opened = tick.view.opened_at(1)
    objects.put_record(tick.fed, layout.seal(1), "seal", {"round": 1, "contributions": commits, "reason": "whenever",
                                                          "opened_at": opened, "sealed_at": opened + 1,
                                                          "previous": tick.view.previous_seal(1)}, tick.me)
    why = "body.reason: 'whenever' is not of the form all|deadline|initial (signed by member 'site1')"
    report = fed.run("site0")
    assert any(line.startswith(layout.seal(1)) and why in line for line in report.junk), report.junk
    fed.run_all()
    assert fed.storage.exists(layout.seal(1) + ".1")
    code, last = verify(fed)
    assert code == 6 and why in last, last


def test_federation_settings_of_the_wrong_type_are_refused_at_join(tmp_path):
    """A genesis whose settings hold a string for an integer: before, Settings.__post_init__
    compared it with an int (TypeError, exit 1)."""
    url = tmp_path / "shared"
    cli("init", url, *site_args(tmp_path, "a", 1))
    path = url / layout.FEDERATION
    body = json.loads(path.read_bytes())["body"]
    founder, _ = me(factory.Fed(tmp_path, str(url), ["a"]), "a")
    body["settings"]["rounds"] = "many"
    forged = crypto.sign_record(body, founder)
    path.chmod(0o644)
    path.write_bytes(forged)
    code, last = run_cli("join", url, *site_args(tmp_path, "b", 2))
    assert code == 6 and "federation.json: settings.rounds: expected an integer, got a string" in last, last


@pytest.mark.parametrize("meta, why", [
    ({"metrics": {"train_loss": "low"}}, "payload.metrics.train_loss: expected a finite number, got a string"),
    ({"metrics": {"dice": 0.5}}, "payload.metrics: has unknown field 'dice'"),
    ({"epoch": -1}, "payload.epoch: -1 is outside 0..2147483648"),
    ({"base": 12}, "payload.base: expected a string, got 12"),
], ids=["metric-type", "metric-name", "epoch-range", "base-type"])
def test_a_meta_payload_against_its_schema_is_excluded_by_every_site_and_named(tmp_path, meta, why):
    """Before, any metrics object was kept and shown by `status`; now the contribution is
    rejected, the same way on every site."""
    fed = factory.make(tmp_path, rounds=1)
    forge_round_1(fed, meta=meta)
    fed.run_all()
    records = [fed.merged_record(s, 1) for s in fed.sites]
    assert all(rec["excluded"] == records[0]["excluded"] for rec in records)
    assert records[0]["excluded"]["site1"] == f"site 'site1': {layout.meta(1, 'site1')}: {why}"


def test_a_commit_with_an_unknown_field_is_never_sealed(tmp_path):
    fed = factory.make(tmp_path, rounds=1, quorum=2, deadline_s=0)
    forge_round_1(fed, commit={"evil": 1})
    for s in ("site0", "site2"):
        fed.run(s, stop_after="upload")
    fed.run("site0", stop_after="seal")
    seal = json.loads(fed.path(layout.seal(1)).read_text())["body"]
    assert sorted(seal["contributions"]) == ["site0", "site2"]


def summary_of(fed, site, change) -> dict:
    ident, view = me(fed, site)
    payload = factory.NumpyTrainer(site, None).summary()
    change(payload)
    objects.put_envelope(view, layout.summary(site), "summary", crypto.canonical_json(payload), ident)


@pytest.mark.parametrize("change, why", [
    (lambda p: p["cases"][0].update(spacing=[-1.0, 1.0]), "payload.cases[0].spacing[0]: -1.0 is outside 0..1000000.0"),
    (lambda p: p["foreground"][0].update(cases=True), "payload.foreground[0].cases: expected an integer, got a boolean"),
    (lambda p: p["dataset"].update(numTraining="5"), "payload.dataset.numTraining: expected an integer, got a string"),
], ids=["negative-spacing", "bool-cases", "string-count"])
def test_an_ffe_summary_against_its_schema_is_rejected_naming_the_member(tmp_path, change, why):
    """A negative spacing used to reach nnU-Net's planner; now every site refuses it."""
    fed = factory.make(tmp_path, n=2)
    summary_of(fed, "site1", change)
    ident, view = me(fed, "site0")
    with pytest.raises(ContributionRejected) as exc:
        objects.read_envelope(view, layout.summary("site1"), "summary", ident, author="site1")
    assert exc.value.message == f"site 'site1': {layout.summary('site1')}: {why}"


def test_an_ffe_histogram_against_its_schema_is_rejected_naming_the_member(tmp_path):
    fed = factory.make(tmp_path, n=2)
    ident, view = me(fed, "site1")
    hist = {"format": "p2pfed.ffe.histogram/1", "bins": True, "ranges": [[0.0, 1.0]],
            "channels": [{"index": "", "weight": ""}]}
    objects.put_envelope(view, layout.histogram("site1"), "histogram", crypto.canonical_json(hist), ident)
    ident0, view0 = me(fed, "site0")
    with pytest.raises(ContributionRejected) as exc:
        objects.read_envelope(view0, layout.histogram("site1"), "histogram", ident0, author="site1")
    assert exc.value.message == ("site 'site1': fingerprints/site1/histogram.p2pf: payload.bins: "
                                 "expected an integer, got a boolean")


def test_a_plan_payload_that_is_not_an_object_names_the_member(tmp_path):
    fed = factory.make(tmp_path, n=2)
    ident, view = me(fed, "site1")
    objects.put_envelope(view, layout.plan("site1"), "plan", b"[]", ident)
    ident0, view0 = me(fed, "site0")
    with pytest.raises(IntegrityError) as exc:
        objects.read_envelope(view0, layout.plan("site1"), "plan", ident0, author="site1")
    assert exc.value.message == "plans/site1.p2pf: payload: expected an object, got a list (signed by member 'site1')"


def test_a_member_signed_header_with_an_unknown_field_is_refused():
    a = crypto.Identity.generate("site1")
    blob = crypto.seal(b"{}", header={"federation": "f" * 32, "kind": "final", "name": "final/site1.p2pf",
                                      "note": "x"}, author=a, recipients={"site1": a.public()})
    with pytest.raises(IntegrityError, match="final/site1.p2pf: envelope header: has unknown field 'note'"):
        crypto.read_header(blob, "final/site1.p2pf")
