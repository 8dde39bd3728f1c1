"""Crash points for the fault-injection tests (docs/design.md, "Threat model").

`P2PFED_CRASH_AT=NAME` makes the process SIGKILL itself when it reaches the crash
point NAME (train, upload, commit, seal, merge, final), and `P2PFED_CRASH_AT=write:N`
right after its N-th storage write. Unset, each call costs one dictionary lookup."""
from __future__ import annotations

import os
import signal

_writes = 0


def crash_point(name: str) -> None:
    if os.environ.get("P2PFED_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def after_write() -> None:
    global _writes
    target = os.environ.get("P2PFED_CRASH_AT", "")
    if target.startswith("write:"):
        _writes += 1
        if _writes == int(target[len("write:"):]):
            os.kill(os.getpid(), signal.SIGKILL)
