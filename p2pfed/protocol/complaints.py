"""Complaints: how every site reacts the same way to a cheating author (docs/design.md 7.2, 8.4).

A recipient whose wrapped content key does not open a validly signed envelope
(`AuthorCheated`) publishes a small signed complaint next to the object, in the folder
that other sites list anyway (`layout.complaint`), and halts. Every participant that
finds a valid complaint in a listing it made halts with the same message: the protocol
cannot tell whether the author cheated or the recipient lies, a person must decide.
A complaint that is not validly signed by the participant it names is ignored."""
from __future__ import annotations

from .. import layout
from ..errors import AuthorCheated, FederationHalted, IntegrityError
from ..objects import read_record

KIND = "complaint"


def halted(author: str, recipient: str, key: str) -> FederationHalted:
    """The one message every site halts with."""
    return FederationHalted(f"{recipient} reports that {author} gave it a content key that does not open {key}; "
                            f"{author} cheated or {recipient} lies, for a person to decide",
                            f"the federation halts at every site; the members of {author} and {recipient} "
                            "must settle it out of band")


def file(t, exc: AuthorCheated) -> FederationHalted:
    """Publish this site's complaint about `exc` (idempotent) and return the halt to raise."""
    t.write.record(layout.complaint(exc.key, t.site), KIND, {"object": exc.key, "accused": exc.author})
    return halted(exc.author, t.site, exc.key)


def check(t) -> None:
    """Halt if a valid complaint is among the keys this tick has listed (no extra request
    unless one is there). Verified complaints are remembered, foreign ones skipped."""
    seen = t.complaints_seen
    for at in sorted(k for k in t.view.listed_keys() if k not in seen):
        recipient = layout.site_of(at, KIND)
        if recipient is None:
            continue
        seen.add(at)
        found = _valid(t, layout.unslot(at)[0], at, recipient)  # a complaint may sit in any slot
        if found is not None:
            raise halted(*found)


def _valid(t, key: str, at: str, recipient: str) -> tuple[str, str, str] | None:
    """(author, recipient, object) of a complaint signed by the participant it names and
    about an object in its own folder; None (with a note) for anything else."""
    parts = t.view.participants
    try:
        if recipient not in parts:
            raise IntegrityError(f"{key}: not from a participant")
        body = read_record(t.fed, key, KIND, recipient, data=t.view.get(at))
    except (IntegrityError, FileNotFoundError) as exc:
        t.say(f"ignoring {key}: {getattr(exc, 'message', 'gone')}")
        return None
    obj, accused = body.get("object"), body.get("accused")
    if not isinstance(obj, str) or layout.complaint(obj, recipient) != key \
            or accused not in parts or accused == recipient:
        t.say(f"ignoring {key}: malformed complaint")
        return None
    return accused, recipient, obj
