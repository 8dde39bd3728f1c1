"""The phases of a tick, in order. Each module has NAME and `advance(tick)`: it reads
the tick's view, and returns None when the phase is done, raises `Wait` when it must
wait for other sites, or does one piece of work and returns what it did ("" when the
work is not worth reporting). The driver (p2pfed/protocol/tick.py) calls it again
until it is done or waits. `pending(view)` tells, for `p2pfed status`, whom the
federation as a whole waits for in that phase (None: done for every participant)."""
from . import start, declare, fingerprint, plan, initial_model, rounds, final

PHASES = (start, declare, fingerprint, plan, initial_model, rounds, final)

# Every name a tick can be told to stop after (`Tick(stop_after=...)`, `p2pfed round --until`).
STEPS = ("start", "declare", "fingerprint", "plan", "initial model", *rounds.STEPS, "final")


def where(view) -> dict:
    """The first phase that is not done for every participant, and whom it waits for."""
    for phase in PHASES:
        waiting = phase.pending(view)
        if waiting is not None:
            return {"name": phase.NAME, **waiting}  # a phase may name its waiting state
    return {"name": "done", "waiting_for": []}
