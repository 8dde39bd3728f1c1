"""What one site knows of the federation during one tick (read-only, lazy, memoised).

Every phase and `p2pfed status` read the shared storage through a `View`: each
folder is listed at most once and each object fetched and verified at most once per
tick. What a site has verified once and keeps in its home (the participants, sealed
rounds) is not fetched again: an idle tick costs one listing of the open round and
one read of the latest seal it adopted (the chain head, re-checked every tick).
Only the `Writer` (p2pfed/protocol/writer.py) adds to a view, with what it wrote.

Reading the storage, memoised, and resolving slots (junk never halts a tick) is the
`Listing` this view builds on (p2pfed/protocol/listing.py). Seals and merges form a hash chain that the site keeps in its home (`Chain`)."""
from __future__ import annotations

import json

from .. import crypto, layout
from ..errors import IntegrityError, SetupError
from ..federation import Federation
from ..site import SiteHome, atomic_write
from .key_seals import CLOCK_SKEW_S, KeySeals
from .listing import Listing
from .modes import mode_of



class Chain:
    """The hash chain as this site adopted it, kept in `<home>/work/chain.json`: the start
    seal and every round seal (slot key and sha256 of the stored bytes), and every merge
    result it computed. A public view (no home) keeps nothing."""

    def __init__(self, home: SiteHome | None):
        self.path = home.dir / "work" / "chain.json" if home else None
        self.data = {"seals": {}, "merges": {}}
        if self.path and self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except ValueError:
                raise SetupError(f"{self.path} is corrupt", "restore the site home from a backup: it is "
                                 "this site's record of the history it agreed to") from None

    def seal(self, r: int | None) -> dict | None:
        """{"key", "sha256"} of the seal of round r (None: the start seal) this site adopted."""
        return self.data["seals"].get("start" if r is None else str(r))

    def keep_seal(self, r: int | None, key: str, sha: str) -> None:
        kept, name = self.seal(r), "the start" if r is None else f"round {r}'s"
        if kept is not None and kept["sha256"] != sha:
            raise IntegrityError(f"{key}: {name} seal differs from the one this site adopted "
                                 f"({kept['sha256'][:16]}, now {sha[:16]})",
                                 "the storage shows another history than before (a fork); alert the members")
        if kept is None and self.path is not None:
            self.data["seals"]["start" if r is None else str(r)] = {"key": key, "sha256": sha}
            self._save()

    def keep_merge(self, r: int, result: str) -> None:
        if self.path is not None and self.data["merges"].get(str(r)) != result:
            self.data["merges"][str(r)] = result
            self._save()

    def head(self) -> tuple[int | None, dict] | None:
        """(round or None for the start seal, its kept seal) of the latest seal adopted."""
        rounds = [int(r) for r in self.data["seals"] if r != "start"]
        if rounds:
            return max(rounds), self.seal(max(rounds))
        return (None, self.seal(None)) if self.seal(None) else None

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(self.data, sort_keys=True).encode())


def head_hash(r: int | None, seal_sha: str | None, result: str | None) -> str:
    """The short chain head members compare by phone: 16 hex digits in groups of 4."""
    return crypto.grouped(crypto.hash_json({"round": r, "seal": seal_sha, "result": result})[:16])


class View(KeySeals, Listing):
    """The storage (a `Listing`), plus who takes part in which round and the round seals,
    commits and merge records, checked by the protocol's rules."""

    def __init__(self, fed: Federation, home: SiteHome | None = None, state: dict | None = None):
        super().__init__(fed)
        self.s, self.mode = fed.settings, mode_of(fed.settings)
        self.home = home  # None: a public view (status --storage), nothing kept locally
        self.state = state if state is not None else {}
        self.chain = Chain(home)
        self._seals: dict[int, dict | None] = {}
        self._seal_sha: dict[int | None, str] = {}
        self._commits: dict[int, dict[str, tuple[str, dict]]] = {}
        self._merged: dict[int, dict[str, dict]] = {}
        self._key_seals: dict[int, tuple[str, dict] | None] = {}

    def forget(self, key: str) -> None:
        r = layout.round_of(key)
        if r is not None:
            self._commits.pop(r, None)
            self._merged.pop(r, None)
            if not self._key_seals.get(r):
                self._key_seals.pop(r, None)
            if not self._seals.get(r):
                self._seals.pop(r, None)

    def check(self, key: str, kind: str, got: dict) -> None:
        """Only a participant of the round may seal it: a seal candidate is decided by its
        bytes alone, so that every site picks the same."""
        if kind not in ("seal", "keyseal"):  # (the start seal's author is checked against the epoch it pins)
            return
        if got.get("author") not in self.participants_of(layout.round_of(key)):
            raise IntegrityError(f"{key}: sealed by {got.get('author')!r}, who is not a participant")

    # -- membership of the run ---------------------------------------------------------------
    def start_seal(self) -> dict | None:
        """The verified start seal (fingerprints/SEAL.json): who takes part, since when, and
        the epoch of the membership log it pinned (its members are the participants)."""
        if "participants" in self.state:
            return {"participants": self.state["participants"], "sealed_at": self.state["started_at"],
                    "epoch": self.state.get("start_epoch")}
        return self._read_start_seal()

    def _read_start_seal(self) -> dict | None:
        found = self.resolve(layout.FINGERPRINT_SEAL, "fingerprint-seal")
        if found is None:
            return None
        at, data, body = found
        parts, chain, e = body.get("participants"), self.fed.log.chain, body.get("epoch")
        if type(e) is not int or not 0 <= e < len(chain) or body.get("epoch_sha256") != chain[e].sha256:
            raise IntegrityError(f"{layout.FINGERPRINT_SEAL}: pins epoch {e!r} "
                                 f"({str(body.get('epoch_sha256'))[:12]}), not one of this site's membership chain "
                                 f"(sealed by {body['author']})",
                                 "the storage or a member shows another membership history; alert the members")
        if parts != sorted(chain[e].members) or len(parts) < self.s.sites or type(body.get("sealed_at")) is not int:
            raise IntegrityError(f"{layout.FINGERPRINT_SEAL}: participants {parts} (sealed by {body['author']}) are "
                                 f"not the {self.s.sites}+ members of epoch {e} in name order")
        self._seal_sha[None] = crypto.sha256_hex(data)
        self.chain.keep_seal(None, at, self._seal_sha[None])
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
    def kept_seal(self, name: str):
        """Where this site keeps a seal it verified (`work/seals/<name>`); None: a public view."""
        return self.home.dir / "work" / "seals" / name if self.home else None

    @staticmethod
    def keep(path, body) -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps(body).encode())

    def seal(self, r: int) -> dict | None:
        """The verified seal of round r, or None. Kept in the site home once verified; a
        seal this site adopted that the storage no longer shows is an integrity error."""
        if r in self._seals:
            return self._seals[r]
        kept = self.kept_seal(f"{r:05d}.json")
        if kept is not None and kept.exists() and self.chain.seal(r):
            body = json.loads(kept.read_text())
        elif (found := self.resolve(layout.seal(r), "seal")) is not None:
            at, data, body = found
            self._check_seal(r, body)
            self._seal_sha[r] = crypto.sha256_hex(data)
            self.chain.keep_seal(r, at, self._seal_sha[r])
            self.keep(kept, body)
        elif self.chain.seal(r):
            raise IntegrityError(f"{layout.seal(r)}: the seal of round {r} this site adopted is gone from the "
                                 f"storage{self.junk_at(layout.seal(r))}",
                                 "someone deleted or replaced it; restore it and alert the members")
        else:
            body = None
        self._seals[r] = body
        return body

    def seal_sha(self, r: int | None) -> str | None:
        """sha256 of the stored bytes of round r's seal (None: the start seal), as adopted."""
        kept = self.chain.seal(r)
        if kept is not None:
            return kept["sha256"]
        if r is None:
            self._read_start_seal()  # also where the participants are kept already
        else:
            self.seal(r)
        return self._seal_sha.get(r)

    def previous_seal(self, r: int) -> str | None:
        """What round r's seal must name as `previous`: the seal of r-1, or the start seal."""
        return self.seal_sha(r - 1 if r - 1 >= self.mode.first_round else None)

    def _check_seal(self, r: int, body: dict) -> None:
        key, parts, by = layout.seal(r), self.participants_of(r), body.get("author")
        contrib = body.get("contributions")
        if body.get("round") != r or not isinstance(contrib, dict) or not contrib \
                or not all(isinstance(v, str) for v in contrib.values()):
            raise IntegrityError(f"{key}: malformed seal by {by}")
        if not set(contrib) <= set(parts):
            raise IntegrityError(f"{key}: sealed by {by}, lists non-participants {sorted(set(contrib) - set(parts))}")
        if body.get("previous") != self.previous_seal(r):
            raise IntegrityError(f"{key}: names another previous seal than the one this site kept "
                                 f"({str(body.get('previous'))[:16]}, kept {str(self.previous_seal(r))[:16]}; "
                                 f"sealed by {by})")
        if r == 0:
            if list(contrib) != [min(parts)]:
                raise IntegrityError(f"{key}: the initial model must come from {min(parts)}")
        else:
            opened = self.opened_at(r)
            if body.get("opened_at") != opened:
                raise IntegrityError(f"{key}: claims round {r} opened at {body.get('opened_at')}, "
                                     f"not at {opened} when round {r - 1} was sealed (sealed by {by})")
            if len(contrib) < len(parts) and (
                    body.get("reason") != "deadline" or len(contrib) < self.quorum_of(r)
                    or not isinstance(body.get("sealed_at"), int)
                    or body["sealed_at"] + CLOCK_SKEW_S < opened + self.s.deadline_s):
                raise IntegrityError(f"{key}: sealed with {len(contrib)} contributions before the deadline "
                                     f"(sealed by {by})")
        if self.s.secure_aggregation and r >= 1:
            self._check_secure_seal(r, body)
        commits = self.commits(r)
        for site, sha in contrib.items():
            if site not in commits or commits[site][0] != sha:
                raise IntegrityError(f"{layout.commit(r, site)}: missing or not the commit the seal lists"
                                     f"{self.junk_at(layout.commit(r, site))}")

    def recheck_head(self) -> None:
        """The latest seal this site adopted must still be in the storage, byte for byte
        (one request, however long the federation ran)."""
        head = self.chain.head()
        if head is None:
            return
        r, kept = head
        name = "the start seal" if r is None else f"the seal of round {r}"
        try:
            data = self.st.get(kept["key"])
        except FileNotFoundError:
            raise IntegrityError(f"{kept['key']}: {name}, which this site adopted, is gone from the storage",
                                 "someone deleted it; restore it and alert the members") from None
        if crypto.sha256_hex(data) != kept["sha256"]:
            raise IntegrityError(f"{kept['key']}: {name} differs from the one this site adopted "
                                 f"({kept['sha256'][:16]}, now {crypto.sha256_hex(data)[:16]})",
                                 "the storage shows another history than before (a fork); alert the members")

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
                got = self.resolve(key, "commit", s)
                if got is None:
                    continue
                if got[2].get("round") != r:
                    raise IntegrityError(f"{key}: commit claims round {got[2].get('round')}")
                found[s] = (crypto.sha256_hex(got[1]), got[2])
            self._commits[r] = found
        return self._commits[r]

    def merge_records(self, r: int) -> dict[str, dict]:
        """site -> verified merge record (`rounds/<r>/merged/<site>.json`) of the participants."""
        if r not in self._merged:
            self._merged[r] = {s: body for s in self.participants_of(r)
                               if self.has(layout.merged(r, s))
                               and (body := self.record(layout.merged(r, s), "merged", s)) is not None}
        return self._merged[r]
