"""What one site knows of the federation during one tick (read-only, lazy, memoised).

Every phase and `p2pfed status` read the shared storage through a `View`: each
folder is listed at most once and each object fetched and verified at most once per
tick. What a site has verified once and keeps in its home (the participants, sealed
rounds) is not fetched again: an idle tick costs one listing of the open round.
Only the `Writer` (p2pfed/protocol/writer.py) adds to a view, with what it wrote."""
from __future__ import annotations

import json

from .. import crypto, layout
from ..errors import IntegrityError
from ..federation import Federation
from ..objects import read_record
from ..site import SiteHome, atomic_write
from .modes import Mode, mode_of

CLOCK_SKEW_S = 600  # a seal's deadline is the sealer's clock; others allow this much skew


class View:
    def __init__(self, fed: Federation, home: SiteHome | None = None, state: dict | None = None):
        self.fed, self.st, self.s = fed, fed.storage, fed.settings
        self.mode: Mode = mode_of(fed.settings)
        self.home = home  # None: a public view (status --storage), nothing kept locally
        self.state = state if state is not None else {}
        self._lists: dict[str, set[str]] = {}
        self._blobs: dict[str, bytes] = {}
        self._seals: dict[int, dict | None] = {}
        self._commits: dict[int, dict[str, tuple[str, dict]]] = {}
        self._merged: dict[int, dict[str, dict]] = {}

    # -- raw access, memoised --------------------------------------------------------------
    def keys(self, prefix: str) -> set[str]:
        if prefix not in self._lists:
            if "" in self._lists:  # the whole tree is listed already (status, verify)
                self._lists[prefix] = {k for k in self._lists[""] if k.startswith(prefix + "/")}
            else:
                self._lists[prefix] = set(self.st.list_prefix(prefix))
        return self._lists[prefix]

    def has(self, key: str) -> bool:
        return key in self.keys(layout.folder(key))

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
        self._forget_round(key)

    def refresh(self, key: str) -> None:
        """Forget the listing around `key` (after a long step: others wrote meanwhile)."""
        self._lists.pop(layout.folder(key), None)
        self._forget_round(key)

    def _forget_round(self, key: str) -> None:
        r = layout.round_of(key)
        if r is not None:
            self._commits.pop(r, None)
            if not self._seals.get(r):
                self._seals.pop(r, None)

    # -- membership of the run ---------------------------------------------------------------
    def start_seal(self) -> dict | None:
        """The verified start seal (fingerprints/SEAL.json): who takes part, since when, and
        the epoch of the membership log it pinned (its members are the participants)."""
        if "participants" in self.state:
            return {"participants": self.state["participants"], "sealed_at": self.state["started_at"],
                    "epoch": self.state.get("start_epoch")}
        if not self.has(layout.FINGERPRINT_SEAL):
            return None
        body = read_record(self.fed, layout.FINGERPRINT_SEAL, "fingerprint-seal",
                           data=self.get(layout.FINGERPRINT_SEAL))
        parts, chain, e = body.get("participants"), self.fed.log.chain, body.get("epoch")
        if type(e) is not int or not 0 <= e < len(chain) or body.get("epoch_sha256") != chain[e].sha256:
            raise IntegrityError(f"{layout.FINGERPRINT_SEAL}: pins epoch {e!r} "
                                 f"({str(body.get('epoch_sha256'))[:12]}), not one of this site's membership chain",
                                 "the storage or a member shows another membership history; alert the members")
        if parts != sorted(chain[e].members) or len(parts) < self.s.sites or type(body.get("sealed_at")) is not int:
            raise IntegrityError(f"{layout.FINGERPRINT_SEAL}: participants {parts} are not "
                                 f"the {self.s.sites}+ members of epoch {e} in name order")
        return body

    @property
    def participants(self) -> list[str]:
        seal = self.start_seal()
        return seal["participants"] if seal else []

    def participants_of(self, r: int) -> list[str]:
        """Who takes part in round r: the members of the epoch in force at round r (an
        epoch applies from its `from_round`), never fewer than the start pinned."""
        if not self.participants:
            return []
        return sorted(self.fed.members_at(r)) if r >= self.mode.first_round else self.participants

    def quorum_of(self, r: int) -> int:
        """Contributions that may seal round r after its deadline: `--quorum` (default all
        sites), never more than the round has participants (after a removal)."""
        return min(self.s.effective_quorum, len(self.participants_of(r)))

    def joins_at(self, site: str) -> int | None:
        """The first round of a site admitted after the start (None: a start participant,
        or no participant of any round)."""
        if not self.participants or site in self.participants:
            return None
        return next((r for r in range(self.mode.first_round, self.s.rounds + 1)
                     if site in self.participants_of(r)), None)

    def recipients(self, key: str | None = None) -> dict:
        """Whom an envelope at `key` is encrypted to: for a round's objects, the participants
        of that round with the keys of the epoch in force then (a removed site or an old
        key reads nothing written later); for the final metrics, those of the last round;
        otherwise the start's participants (before the start: every member)."""
        seal = self.start_seal()
        if not seal:
            return self.fed.members
        r = layout.round_of(key) if key else None
        newcomer = layout.handover_for(key) if key else None
        if newcomer is not None:  # a handover: for the newcomer (and its author, who re-reads it)
            keys = self.fed.members_at(r + 1)
            author = layout.kind_of(key)[2]
            return {s: keys[s] for s in (newcomer, author) if s in keys}
        if r is None and key and layout.kind_of(key) and layout.kind_of(key)[0] == "final":
            r = self.s.rounds
        if r is not None and r >= self.mode.first_round:
            return {s: i for s, i in self.fed.members_at(r).items()}
        keys = self.fed.members_at(0)
        return {s: keys[s] for s in seal["participants"] if s in keys}

    # -- rounds ------------------------------------------------------------------------------
    def seal(self, r: int) -> dict | None:
        """The verified seal of round r, or None. Kept in the site home once verified."""
        if r in self._seals:
            return self._seals[r]
        kept = self.home.dir / "work" / "seals" / f"{r:05d}.json" if self.home else None
        if kept is not None and kept.exists():
            body = json.loads(kept.read_text())
        elif self.has(layout.seal(r)):
            body = read_record(self.fed, layout.seal(r), "seal", data=self.get(layout.seal(r)))
            self._check_seal(r, body)
            if kept is not None:
                kept.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(kept, json.dumps(body).encode())
        else:
            body = None
        self._seals[r] = body
        return body

    def _check_seal(self, r: int, body: dict) -> None:
        key, parts = layout.seal(r), self.participants_of(r)
        contrib = body.get("contributions")
        if body.get("round") != r or not isinstance(contrib, dict) or not contrib \
                or not all(isinstance(v, str) for v in contrib.values()):
            raise IntegrityError(f"{key}: malformed seal")
        if body.get("author") not in parts:
            raise IntegrityError(f"{key}: sealed by {body.get('author')!r}, who is not a participant")
        if not set(contrib) <= set(parts):
            raise IntegrityError(f"{key}: lists non-participants {sorted(set(contrib) - set(parts))}")
        if r == 0:
            if list(contrib) != [min(parts)]:
                raise IntegrityError(f"{key}: the initial model must come from {min(parts)}")
        else:
            opened = self.opened_at(r)
            if body.get("opened_at") != opened:
                raise IntegrityError(f"{key}: claims round {r} opened at {body.get('opened_at')}, "
                                     f"not at {opened} when round {r - 1} was sealed")
            if len(contrib) < len(parts) and (
                    body.get("reason") != "deadline" or len(contrib) < self.quorum_of(r)
                    or not isinstance(body.get("sealed_at"), int)
                    or body["sealed_at"] + CLOCK_SKEW_S < opened + self.s.deadline_s):
                raise IntegrityError(f"{key}: sealed with {len(contrib)} contributions before the deadline")
        commits = self.commits(r)
        for site, sha in contrib.items():
            if site not in commits or commits[site][0] != sha:
                raise IntegrityError(f"{layout.commit(r, site)}: missing or not the commit the seal lists")

    def opened_at(self, r: int) -> int:
        """When round r opened: when round r-1 was sealed (the start, for the first round)."""
        prev = self.seal(r - 1) if r - 1 >= self.mode.first_round else None
        return int(prev["sealed_at"]) if prev else int(self.start_seal()["sealed_at"])

    def current_round(self) -> int:
        """The first round without a seal (scanning up from the last one this site saw)."""
        r = max(self.state.get("round", self.mode.first_round), self.mode.first_round)
        while r <= self.s.rounds and self.seal(r) is not None:
            r += 1
        return r

    def committed(self, r: int) -> list[str]:
        """Participants with a commit key in round r (listed, not yet verified)."""
        return [s for s in self.participants_of(r) if self.has(layout.commit(r, s))]

    def commits(self, r: int) -> dict[str, tuple[str, dict]]:
        """site -> (sha256 of the commit bytes, verified body) for round r's commits."""
        if r not in self._commits:
            found = {}
            for s in self.committed(r):
                key = layout.commit(r, s)
                data = self.get(key)
                body = read_record(self.fed, key, "commit", s, data=data)
                if body.get("round") != r:
                    raise IntegrityError(f"{key}: commit claims round {body.get('round')}")
                found[s] = (crypto.sha256_hex(data), body)
            self._commits[r] = found
        return self._commits[r]

    def merge_records(self, r: int) -> dict[str, dict]:
        """site -> verified merge record (`rounds/<r>/merged/<site>.json`) of the participants."""
        if r not in self._merged:
            self._merged[r] = {s: read_record(self.fed, layout.merged(r, s), "merged", s,
                                              data=self.get(layout.merged(r, s)))
                               for s in self.participants_of(r) if self.has(layout.merged(r, s))}
        return self._merged[r]
