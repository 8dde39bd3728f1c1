"""The shared storage as one tick sees it: each folder listed at most once, each object
fetched at most once, and every fixed-name object resolved to the first of its slots
(p2pfed/layout.py) that holds an object verifying as it. `resolve` skips junk (unsigned,
foreign, replayed, moved) and notes it in `junk`, for the tick's report and `verify`;
junk never halts a tick. The protocol's own view of a federation (p2pfed/protocol/view.py)
builds on this."""
from __future__ import annotations

from .. import crypto, layout
from ..errors import IntegrityError
from ..federation import Federation
from ..objects import read_record


class Listing:
    def __init__(self, fed: Federation):
        self.fed, self.st = fed, fed.storage
        self.junk: dict[str, str] = {}  # slot key -> why its object does not count (reported)
        self._lists: dict[str, set[str]] = {}
        self._blobs: dict[str, bytes] = {}

    def check(self, key: str, kind: str, got: dict) -> None:
        """A rule decided by an object's bytes alone, beyond its signature (View: who may
        seal); an IntegrityError makes the object junk."""

    def forget(self, key: str) -> None:
        """Drop what was derived from the folder of `key` (View: a round's commits, seals)."""

    # -- raw access, memoised --------------------------------------------------------------
    def keys(self, prefix: str) -> set[str]:
        if prefix not in self._lists:
            if "" in self._lists:  # the whole tree is listed already (status, verify)
                self._lists[prefix] = {k for k in self._lists[""] if k.startswith(prefix + "/")}
            else:
                self._lists[prefix] = set(self.st.list_prefix(prefix))
        return self._lists[prefix]

    def listed_keys(self) -> set[str]:
        """Every key the listings of this tick have shown so far."""
        return set().union(*self._lists.values())

    def listed(self, key: str) -> bool:
        """Whether exactly this stored key (a slot) is listed."""
        return key in self.keys(layout.folder(key))

    def slots(self, key: str) -> list[str]:
        """The listed slots of logical key `key`, in slot order."""
        listed = self.keys(layout.folder(key))
        return [s for i in range(layout.MAX_SLOTS) if (s := layout.slot(key, i)) in listed]

    def has(self, key: str) -> bool:
        """A hint from the listing: some slot of `key` is listed and not known to be junk.
        What counts is what `resolve` verifies."""
        return any(s not in self.junk for s in self.slots(key))

    def get(self, key: str, lister: str | None = None) -> bytes:
        """The bytes of `key`. `lister`: the object that vouches for it; if it is gone,
        someone deleted it (an integrity error, not a storage one)."""
        if key not in self._blobs:
            try:
                self._blobs[key] = self.st.get(key)
            except FileNotFoundError:
                if lister is None:
                    raise
                raise IntegrityError(f"{key}: listed by {lister} but missing from the storage",
                                     "someone deleted it; restore it from a backup of the storage and "
                                     "alert the members") from None
        return self._blobs[key]

    def learn(self, key: str, data: bytes) -> None:
        """What this tick wrote (or found written) at `key`."""
        self._blobs[key] = data
        for prefix in (layout.folder(key), ""):
            if prefix in self._lists:
                self._lists[prefix].add(key)
        self.forget(key)

    def refresh(self, key: str) -> None:
        """Forget the listing around `key` (after a long step: others wrote meanwhile)."""
        self._lists.pop(layout.folder(key), None)
        self.forget(key)

    # -- slots -------------------------------------------------------------------------------
    def verified(self, key: str, at: str, kind: str, author: str | None = None) -> tuple[bytes, dict] | None:
        """(bytes, body or envelope header) of the object at slot `at` of `key` if it verifies
        as `kind` (by `author`, and `check`); else None, and the junk is noted."""
        try:
            data = self.get(at)
        except FileNotFoundError:
            return None
        try:
            if layout.kind_of(key)[1]:  # an envelope: signature and binding (decrypting is the caller's)
                want = self.fed.expect(kind, name=key, **({"author": author} if author else {}))
                got = crypto.verify_envelope(data, authors=self.fed.authors(key), name=key, expect=want)
            else:
                got = read_record(self.fed, key, kind, author, data=data)
            self.check(key, kind, got)
            return data, got
        except IntegrityError as exc:
            self.junk[at] = exc.message
            return None

    def resolve(self, key: str, kind: str, author: str | None = None) -> tuple[str, bytes, dict] | None:
        """(slot, bytes, body or header) of the first slot of `key` whose object verifies."""
        for at in self.slots(key):
            found = self.verified(key, at, kind, author)
            if found is not None:
                return at, *found
        return None

    def record(self, key: str, kind: str, author: str | None = None) -> dict | None:
        """The verified body of the record `key`, or None (absent, or only junk there)."""
        found = self.resolve(key, kind, author)
        return found[2] if found else None

    def find(self, key: str, sha: str, lister: str) -> bytes | None:
        """The bytes in a slot of `key` whose sha256 is `sha` (what `lister` lists); None if
        no slot holds them. Nothing listed at all: `lister` vouches for a deleted object."""
        slots = self.slots(key)
        if not slots:
            self.get(key, lister)  # raises: listed but missing (or returns what a listing missed)
            slots = [key]
        return next((self.get(s) for s in slots if crypto.sha256_hex(self.get(s)) == sha), None)

    def junk_at(self, key: str) -> str:
        """' (junk: ...)' for the slots of `key` whose objects do not count, for messages."""
        why = [self.junk[s] for s in self.slots(key) if s in self.junk]
        return f" (junk: {'; '.join(why)})" if why else ""
