"""Fingerprint (FFE only): publish this site's summary, then, once every participant's
summary is in, its histograms over the federation-wide intensity range (docs/design.md
section 6). Asym mode shares no statistics: the phase has nothing to do."""
from __future__ import annotations

import json

from ... import crypto, ffe, layout
from ...dataset import dataset_json
from ...objects import read_envelope
from ..wait import Wait

NAME = "fingerprint"


def advance(t) -> str | None:
    if not t.mode.shares_statistics or t.state.get("plan_sha256") or t.site not in t.view.participants:
        return None  # a site admitted after the start gets the fingerprint handed over
    v, me = t.view, t.site
    if v.resolve(layout.summary(me), "summary", me) is None:
        from ...node import check_schema

        check_schema(t.fed, me, ffe.dataset_info(dataset_json(t.config.nnunet_raw, t.config.dataset)))
        t.write.envelope(layout.summary(me), "summary", crypto.canonical_json(t.trainer.summary()))
        return "published fingerprint summary"
    _all_there(t, layout.summary, "summary", "fingerprint summaries")
    if v.resolve(layout.histogram(me), "histogram", me) is None:
        summaries = payloads(t, layout.summary, "summary")
        ffe.merge_dataset_info({s: summaries[s]["dataset"] for s in summaries})  # names site and field
        hist = t.trainer.histograms(ffe.global_ranges(summaries))
        t.write.envelope(layout.histogram(me), "histogram", crypto.canonical_json(hist))
        return "published histograms"
    _all_there(t, layout.histogram, "histogram", "histograms")
    return None


def _all_there(t, key_of, kind: str, what: str) -> None:
    missing = [s for s in t.view.participants if t.view.resolve(key_of(s), kind, s) is None]
    if missing:
        raise Wait("fingerprint", f"waiting for {what}", missing)


def payloads(t, key_of, kind: str) -> dict[str, dict]:
    """Every participant's decrypted payload of `kind` (summaries, histograms, plans)."""
    return {s: json.loads(read_envelope(t.fed, key_of(s), kind, t.me, author=s,
                                        blob=t.view.resolve(key_of(s), kind, s)[1])[1])
            for s in t.view.participants}


def federated_fingerprint(t) -> dict:
    """The pooled nnU-Net fingerprint from every participant's summary and histograms."""
    return ffe.merge_fingerprint(payloads(t, layout.summary, "summary"), payloads(t, layout.histogram, "histogram"))


def pending(v) -> dict | None:
    if not v.mode.shares_statistics:
        return None
    for step, key_of in (("summary", layout.summary), ("histogram", layout.histogram)):
        missing = [s for s in v.participants if not v.has(key_of(s))]
        if missing:
            return {"step": step, "waiting_for": missing}
    return None
