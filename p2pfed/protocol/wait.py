"""The one way a phase ends a tick early: it must wait for other sites (exit 0)."""
from __future__ import annotations


class Wait(Exception):
    def __init__(self, phase: str, message: str, waiting_for=(), deadline=None, rnd=None):
        super().__init__(message)
        self.phase, self.message, self.waiting_for = phase, message, list(waiting_for)
        self.deadline, self.round = deadline, rnd
