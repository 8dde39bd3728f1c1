"""Admission into a running federation (docs/design.md 7.1, "Admitting into a running
federation"). A site admitted from round f cannot read round f-1's contributions (they
were not encrypted to it) and merged models are not stored. So in FFE one continuing
participant, the first in name order, hands it the merged model of round f-1 and the
federated fingerprint (from which the newcomer makes the agreed plan itself), encrypted
to the newcomer; the newcomer checks the model against the merge records of round f-1.
In asym a newcomer plans from its own data and starts from its own network."""
from __future__ import annotations

import json

from .. import crypto, layout
from ..errors import IntegrityError
from ..objects import read_envelope
from ..site import atomic_write
from .wait import Wait


def newcomers(v, r: int) -> list[str]:
    """Sites taking part in round r + 1 but not in round r (nor in the start)."""
    return sorted(set(v.participants_of(r + 1)) - set(v.participants_of(r)) - set(v.participants))


def publisher(v, r: int) -> str:
    """Who hands round r over: the first participant of both rounds r and r + 1."""
    return min(set(v.participants_of(r)) & set(v.participants_of(r + 1)))


def publish(t, r: int) -> str | None:
    """FFE: hand the merge of round r to each newcomer of round r + 1, if this site is the
    publisher and has not yet (run after merging round r: idempotent)."""
    v = t.view
    if not t.mode.plans_must_agree or r < t.mode.first_round or r >= t.s.rounds:
        return None
    todo = [n for n in newcomers(v, r)
            if publisher(v, r) == t.site and v.record(layout.handover(r, t.site, n), "handover", t.site) is None]
    if not todo:
        return None
    from . import phases

    merged = phases.merge.folder(t, r)
    blobs = [p.read_bytes() for p in sorted(merged.glob("*.safetensors"))]
    fingerprint = crypto.canonical_json(phases.fingerprint.federated_fingerprint(t))
    own = json.loads((merged / "merged.json").read_text())["own"]
    for n in todo:
        shas = [crypto.sha256_hex(b) for b in blobs]
        for sha, blob in zip(shas, blobs):
            t.write.envelope(layout.handover_shard(r, t.site, n, sha), "handover-shard", blob, round=r)
        t.write.envelope(layout.handover_fingerprint(r, t.site, n), "handover-fingerprint", fingerprint, round=r)
        t.write.record(layout.handover(r, t.site, n), "handover",
                       {"round": r, "site": n, "model": own, "shards": shas,
                        "fingerprint": crypto.sha256_hex(fingerprint)})
    return f"handed the merged model of round {r} to {', '.join(todo)}"


def record(t, r: int) -> tuple[str, dict]:
    """(publisher, verified handover record) for this site, or Wait until it is there."""
    v = t.view
    pub = publisher(v, r)
    key = layout.handover(r, pub, t.site)
    body = v.record(key, "handover", pub)  # in whichever slot it went to: junk does not count
    if body is None:
        raise Wait("round", f"admitted from round {r + 1}: waiting for {pub} to hand over the merged model "
                            f"of round {r}", [pub], rnd=r + 1)
    if body.get("round") != r or body.get("site") != t.site or not isinstance(body.get("shards"), list) \
            or not all(isinstance(s, str) for s in body["shards"]):
        raise IntegrityError(f"{key}: malformed handover record")
    return pub, body


def fingerprint(t, r: int) -> dict:
    """FFE: the federated fingerprint the publisher handed over (its hash is signed)."""
    pub, body = record(t, r)
    key = layout.handover_fingerprint(r, pub, t.site)
    found = t.view.resolve(key, "handover-fingerprint", pub)
    if found is None:
        raise IntegrityError(f"{key}: listed by {layout.handover(r, pub, t.site)} but missing from the storage"
                             f"{t.view.junk_at(key)}")
    _, plain = read_envelope(t.fed, key, "handover-fingerprint", t.me, author=pub, blob=found[1], round=r)
    if crypto.sha256_hex(plain) != body.get("fingerprint"):
        raise IntegrityError(f"{key}: not the fingerprint the handover record lists")
    return json.loads(plain)


def adopt(t, f: int) -> str:
    """Newcomer (FFE): take the merged model of round f - 1 as this site's own, once it is
    what every participant's merge record of that round says."""
    from . import phases

    r = f - 1
    pub, body = record(t, r)
    records = t.view.merge_records(r)
    parts = t.view.participants_of(r)
    if len(records) <= len(parts) // 2 or len({rec.get("result") for rec in records.values()}) != 1:
        raise Wait("round", f"admitted from round {f}: waiting for the merge records of round {r}",
                   [s for s in parts if s not in records], rnd=f)
    per_site = next(iter(records.values()))["per_site"]
    if body.get("model") not in set(per_site.values()):
        raise IntegrityError(f"{layout.handover(r, pub, t.site)}: hands over model {str(body.get('model'))[:12]}, "
                             f"not the merge of round {r} the participants recorded")
    out = phases.merge.folder(t, r)
    for old in out.glob("*"):
        old.unlink()
    for i, sha in enumerate(body["shards"]):
        key = layout.handover_shard(r, pub, t.site, sha)
        _, plain = read_envelope(t.fed, key, "handover-shard", t.me, author=pub,
                                 blob=t.view.get(key, layout.handover(r, pub, t.site)), round=r)
        if crypto.sha256_hex(plain) != sha:
            raise IntegrityError(f"{key}: content does not match its name")
        atomic_write(out / f"{i:05d}.safetensors", plain)
    if crypto.model_hash(body["shards"]) != body["model"]:
        raise IntegrityError(f"{layout.handover(r, pub, t.site)}: its shards are not model {body['model'][:12]}")
    done = {"round": r, "result": next(iter(records.values()))["result"], "per_site": per_site,
            "own": body["model"], "excluded": {}, "handed_over_by": pub}
    atomic_write(out / "merged.json", json.dumps(done).encode())  # last: marks the adoption complete
    t.save(merged_upto=r)
    return f"adopted the merged model of round {r} from {pub}"
