"""Start: once the federation has `--sites` members, the first site to see them seals
the participant list (fingerprints/SEAL.json), pinning the epoch of the membership log
they are the members of; every site adopts the seal that won and
keeps the participants in its home: later ticks never read the start seal again."""
from __future__ import annotations

import time

from ... import layout
from ...errors import SetupError
from ..wait import Wait

NAME = "start"


def advance(t) -> str | None:
    seal = t.view.start_seal()
    if seal is None:
        members = sorted(t.fed.members)
        if len(members) < t.s.sites:
            more = t.s.sites - len(members)
            raise Wait("joining", f"waiting for sites to join: {len(members)}/{t.s.sites} members",
                       [f"{more} more site(s) to join"] + [f"{p} (pending admission)" for p in sorted(t.fed.pending)])
        head = t.fed.log.head  # the seal pins the member set: every site checks it is in its chain
        won = t.write.claim(layout.FINGERPRINT_SEAL, "fingerprint-seal",
                            {"participants": members, "sealed_at": int(time.time()),
                             "epoch": head.number, "epoch_sha256": head.sha256})
        return f"sealed {layout.FINGERPRINT_SEAL}" if won else ""
    parts = seal["participants"]
    if t.site not in parts and t.view.joins_at(t.site) is None:
        raise SetupError(f"site {t.site!r} joined after the federation started (participants: {', '.join(parts)})",
                         "the members must admit it into the running federation (p2pfed admit) first")
    if "participants" not in t.state:
        t.trainer.check_ready()  # before this site shares anything: its data must be usable
        t.save(participants=parts, started_at=seal["sealed_at"], start_epoch=seal["epoch"])
    return None


def pending(v) -> dict | None:
    """Whom the federation waits for in this phase (None: done for everyone)."""
    if v.start_seal() is not None:
        return None
    more = max(0, v.s.sites - len(v.fed.members))
    return {"name": "joining", "waiting_for": [f"{more} more site(s)"] if more else ["a first tick"]}
