"""The round protocol, as a site runs it (docs/design.md section 7; the map of where to
change what is in docs/design.md section 10).

- tick.py         the driver: runs the phases in order, reports what it did or waits for
- phases/         one file per phase: start, fingerprint, plan, initial_model, rounds
                  (steps merge, train, upload, seal; merge.py is the merge step), final
- view.py         what the site knows of the federation during one tick (read-only)
- writer.py       the one way the protocol writes: create-only, idempotent
- modes.py        FFE or asym: every mode-specific answer
- contribution.py a member's contribution, read and checked before it is merged
- trainer.py      the LocalTrainer interface (nnU-Net: p2pfed/nnunet/trainer.py)"""
from .tick import Report, Tick
from .trainer import LocalTrainer, Trained
from .view import CLOCK_SKEW_S, View
from .wait import Wait

__all__ = ["CLOCK_SKEW_S", "LocalTrainer", "Report", "Tick", "Trained", "View", "Wait"]
