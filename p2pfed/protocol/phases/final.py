"""Final: once round R is sealed and merged, write nnU-Net's standard results folder
with the final merge (and run its validation), then publish this site's final metrics."""
from __future__ import annotations

from ... import crypto, layout
from ...faults import crash_point
from . import merge

NAME = "final"


def advance(t) -> str | None:
    if t.state.get("results_folder") is None:
        weights, model = merge.merged_weights(t, t.s.rounds)
        folder, dice = t.trainer.export_final(weights)
        crash_point("final")
        t.save(results_folder=str(folder), final_model=model, final_dice=dice)
        return "applied the final merge"
    if t.view.resolve(layout.final_metrics(t.site), "final", t.site) is None:
        payload = {"model": t.state["final_model"], "validation_dice": t.state.get("final_dice")}
        t.write.envelope(layout.final_metrics(t.site), "final", crypto.canonical_json(payload))
        return "published final metrics"
    t.save(finished=True)
    return None


def pending(v) -> dict | None:
    missing = [s for s in v.participants_of(v.s.rounds) if not v.has(layout.final_metrics(s))]
    return {"waiting_for": missing} if missing else None
