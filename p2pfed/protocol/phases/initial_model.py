"""Initial model (FFE only): the first participant in name order builds the network of
the agreed plan, publishes it as round 0 and seals round 0 with itself as the only
contribution. Every site starts round 1 from exactly that model."""
from __future__ import annotations

import time

from ... import layout
from ..wait import Wait
from .rounds import upload

NAME = "initial model"


def advance(t) -> str | None:
    v = t.view
    if t.mode.first_round != 0 or v.seal(0) is not None:
        return None
    builder = min(v.participants)
    if t.site != builder:
        raise Wait("round", f"waiting for the initial model from {builder}", [builder], rnd=0)
    if v.record(layout.commit(0, t.site), "commit", t.site) is None:
        upload(t, 0, t.trainer.initial_weights(), {"cases": 1, "metrics": {}}, base=None)
        return "published the initial model"
    now = int(time.time())
    body = {"round": 0, "contributions": {t.site: v.commits(0)[t.site][0]}, "reason": "initial",
            "opened_at": now, "sealed_at": now, "previous": v.previous_seal(0)}
    return f"sealed {layout.seal(0)}" if t.write.claim(layout.seal(0), "seal", body) else ""


def pending(v) -> dict | None:
    if v.mode.first_round != 0 or v.seal(0) is not None:
        return None
    return {"round": 0, "waiting_for": [min(v.participants)]}
