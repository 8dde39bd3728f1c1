"""Plan: nnU-Net plans and preprocesses (from the federated fingerprint in FFE, from
the site's own in asym), the site publishes its plan and then its plan hash; in FFE
every participant's hash must agree, or the federation halts naming the fields."""
from __future__ import annotations

from ... import crypto, ffe, layout
from ...errors import DatasetError, FederationHalted
from .. import handover
from ..wait import Wait
from .fingerprint import federated_fingerprint, payloads

NAME = "plan"


def advance(t) -> str | None:
    v, me = t.view, t.site
    if t.state.get("plan_done"):
        return None
    if t.state.get("plan_sha256") is None:
        plans = t.trainer.plan(_fingerprint(t) if t.mode.shares_statistics else None)
        summary = ffe.plan_summary(plans)
        if v.joins_at(me) is None:
            t.write.envelope(layout.plan(me), "plan", crypto.canonical_json(summary))
        t.save(plan_sha256=crypto.hash_json(summary))
        return "planned and preprocessed"
    if v.joins_at(me) is not None:  # admitted later: its plan is checked, not published
        if t.mode.plans_must_agree:
            _check_agreement(t)
        t.save(plan_done=True)
        return None
    if v.record(layout.plan_hash(me), "plan-hash", me) is None:
        t.write.record(layout.plan_hash(me), "plan-hash", {"plan_sha256": t.state["plan_sha256"]})
        return "published plan hash"
    if t.mode.plans_must_agree:
        _check_agreement(t)
    t.save(plan_done=True)  # published, and agreed where it must be: never looked at again
    return None


def _fingerprint(t) -> dict:
    """The federated fingerprint: merged here, or handed over to a site admitted later."""
    joined = t.view.joins_at(t.site)
    return federated_fingerprint(t) if joined is None else handover.fingerprint(t, joined - 1)


def _check_agreement(t) -> None:
    v = t.view
    records = {s: v.record(layout.plan_hash(s), "plan-hash", s) for s in v.participants}
    missing = [s for s, body in records.items() if body is None]
    if missing:
        raise Wait("plan", "waiting for the other sites' plans", missing)
    hashes = {s: body.get("plan_sha256") for s, body in records.items()}
    hashes[t.site] = t.state["plan_sha256"]
    if v.joins_at(t.site) is not None and len(set(hashes.values())) > 1:
        raise DatasetError(f"site {t.site!r}: the plan made from the federation's fingerprint and this site's "
                           "dataset differs from the agreed plan", "this dataset does not fit the federation's plan "
                           "(channels, labels, file ending); fix it, or leave the federation")
    if len(set(hashes.values())) > 1:
        plans = payloads(t, layout.plan, "plan")
        for s in v.participants:
            if hashes[s] != hashes[t.site]:
                fields = ffe.plan_diff(plans[t.site], plans[s])
                raise FederationHalted(f"plans of {t.site} and {s} differ in: {', '.join(fields[:6]) or 'hash only'}",
                                       "all sites must run the same p2pfed and nnunetv2 versions on the same fingerprint")


def pending(v) -> dict | None:
    missing = [s for s in v.participants if not v.has(layout.plan_hash(s))]
    return {"waiting_for": missing} if missing else None
