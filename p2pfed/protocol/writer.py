"""The one way the protocol writes to the shared storage: create-only, idempotent.

Every object is written once and never replaced. A tick killed after a write finds
its object there on the next run: it adopts it if it says what the tick meant to
write, and refuses otherwise (the site's local data changed after it was shared).
A seal is a claim: whichever valid seal was written first wins, and everyone adopts it."""
from __future__ import annotations

from .. import crypto
from ..crypto import Identity
from ..errors import SetupError
from ..objects import put_envelope, put_record, read_envelope, read_record
from .view import View


class Writer:
    def __init__(self, view: View, me: Identity):
        self.view, self.fed, self.me = view, view.fed, me

    def envelope(self, key: str, kind: str, payload: bytes, **binding) -> str:
        """Encrypt `payload` for the participants and write it; returns the sha256 of the
        stored envelope (what commits list)."""
        if not self.view.has(key):
            try:
                blob = put_envelope(self.fed, key, kind, payload, self.me, recipients=self.view.recipients(key),
                                    **binding)
                self.view.learn(key, blob)
                return crypto.sha256_hex(blob)
            except FileExistsError:
                self.view.refresh(key)
        blob = self.view.get(key)
        _, plain = read_envelope(self.fed, key, kind, self.me, author=self.me.site, blob=blob)
        if plain != payload:
            raise self._differs(key)
        return crypto.sha256_hex(blob)

    def record(self, key: str, kind: str, body: dict) -> dict:
        """Sign and write one of this site's own records; returns the stored body."""
        stored = self._put(key, kind, body, author=self.me.site)
        if any(stored.get(k) != v for k, v in body.items()):
            raise self._differs(key)
        return stored

    def claim(self, key: str, kind: str, body: dict) -> bool:
        """Write a seal unless another site sealed first; True if ours is the one stored.
        Either way the caller reads the seal back through the view, which verifies it."""
        if self.view.has(key):
            return False
        try:
            self.view.learn(key, put_record(self.fed, key, kind, body, self.me))
            return True
        except FileExistsError:
            self.view.refresh(key)
            return False

    def _put(self, key: str, kind: str, body: dict, author: str) -> dict:
        if not self.view.has(key):
            try:
                data = put_record(self.fed, key, kind, body, self.me)
                self.view.learn(key, data)
                return read_record(self.fed, key, kind, author, data=data)
            except FileExistsError:
                self.view.refresh(key)
        return read_record(self.fed, key, kind, author, data=self.view.get(key))

    @staticmethod
    def _differs(key: str) -> SetupError:
        return SetupError(f"{key} already holds different content from this site",
                          "this site's local data or state changed after it was shared; restore it")
