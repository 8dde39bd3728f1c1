"""The one way the protocol writes to the shared storage: create-only, idempotent.

Every object is written once and never replaced. A tick killed after a write finds
its object there on the next run: it adopts it if it says what the tick meant to
write, and refuses otherwise (the site's local data changed after it was shared).
A seal is a claim: whichever valid seal was written first wins, and everyone adopts it.

A fixed-name object goes to the first slot of its key (p2pfed/layout.py) that is free
or already holds this site's object (a seal: any participant's): junk that someone
wrote at a predictable key costs a slot, not the federation. Since junk never turns
into a valid object, every honest site sees the same first valid slot."""
from __future__ import annotations

from .. import crypto, layout
from ..crypto import Identity
from ..errors import IntegrityError, SetupError
from ..objects import put_envelope, put_record, read_envelope, read_record
from .view import View


class Writer:
    def __init__(self, view: View, me: Identity):
        self.view, self.fed, self.me = view, view.fed, me

    def envelope(self, key: str, kind: str, payload: bytes, **binding) -> str:
        """Encrypt `payload` for the participants and write it; returns the sha256 of the
        stored envelope (what commits list)."""
        blob, fresh = self._place(key, kind, self.me.site, lambda at: put_envelope(
            self.fed, key, kind, payload, self.me, recipients=self.view.recipients(key), at=at, **binding))
        if not fresh:
            _, plain = read_envelope(self.fed, key, kind, self.me, author=self.me.site, blob=blob)
            if plain != payload:
                raise self._differs(key)
        return crypto.sha256_hex(blob)

    def record(self, key: str, kind: str, body: dict) -> dict:
        """Sign and write one of this site's own records; returns the stored body."""
        data, _ = self._place(key, kind, self.me.site, lambda at: put_record(self.fed, key, kind, body, self.me, at=at))
        stored = read_record(self.fed, key, kind, self.me.site, data=data)
        if any(stored.get(k) != v for k, v in body.items()):
            raise self._differs(key)
        return stored

    def claim(self, key: str, kind: str, body: dict) -> bool:
        """Write a seal unless another participant sealed first; True if ours is the one
        stored. Either way the caller reads the seal back through the view, which verifies it."""
        return self._place(key, kind, None, lambda at: put_record(self.fed, key, kind, body, self.me, at=at))[1]

    def _place(self, key: str, kind: str, author: str | None, make) -> tuple[bytes, bool]:
        """(stored bytes, whether this call wrote them): `make(slot)` writes at the first free
        slot of `key`, unless an earlier slot holds an object that verifies as `kind` by
        `author` (None: any participant, for seals)."""
        for i in range(layout.MAX_SLOTS):
            at = layout.slot(key, i)
            if not self.view.listed(at):
                try:
                    data = make(at)
                    self.view.learn(at, data)
                    return data, True
                except FileExistsError:
                    self.view.refresh(at)
            found = self.view.verified(key, at, kind, author)
            if found is not None:
                return found[0], False
        raise IntegrityError(f"{key}: all {layout.MAX_SLOTS} slots hold objects that do not count"
                             f"{self.view.junk_at(key)}",
                             "someone with write access is filling the storage with junk; remove it and alert "
                             "the members")

    @staticmethod
    def _differs(key: str) -> SetupError:
        return SetupError(f"{key} already holds different content from this site",
                          "this site's local data or state changed after it was shared; restore it")
