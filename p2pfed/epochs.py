"""Membership as a signed, hash-chained log of epochs (docs/design.md 7.1).

Epoch 0 is the genesis (federation.json: the founder alone). Epoch e >= 1 is a proposal
record `epochs/<e>/<proposer>.json` naming the previous epoch's hash, the full member set
and the one change (admit, remove or rotate of one site); it is in force once members of
epoch e-1 approve it, each with one create-only record `epochs/<e>/approvals/<member>.json`
over the proposal's sha256. The quorum is always a majority of epoch e-1 (or more, as
`--admission-quorum` says): two majorities share a member, and a member has one approval
slot per epoch, so at most one proposal can win an epoch. Anything under `epochs/` that
does not verify into this chain is ignored and reported, never a halt."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import layout
from .crypto import Identity, PublicIdentity, open_record, record_signer, sha256_hex, sign_record
from .errors import IntegrityError

ADMIT, REMOVE, ROTATE = "admit", "remove", "rotate"


def quorum(setting: int | None, members: int) -> int:
    """Approvals an epoch needs from the previous epoch's `members`: a majority at least."""
    return min(members, max(setting or 0, members // 2 + 1))


@dataclass(frozen=True)
class Epoch:
    number: int
    sha256: str  # epoch 0: sha256 of federation.json; else sha256 of the proposal's bytes
    members: dict[str, PublicIdentity]
    change: dict | None = None  # {"op": admit|remove|rotate, "site": ...}
    proposer: str | None = None
    approvers: tuple[str, ...] = ()
    from_round: int = 0


@dataclass(frozen=True)
class Proposal:
    """A valid proposal for the next epoch that has not reached its quorum (yet)."""

    key: str
    sha256: str
    epoch: Epoch  # what it would become
    approvers: tuple[str, ...]
    needed: int

    @property
    def missing(self) -> int:
        return self.needed - len(self.approvers)


@dataclass
class Log:
    chain: list[Epoch]
    open: list[Proposal] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)  # key -> why it is not membership
    records: dict[str, bytes] = field(default_factory=dict)  # verified chain records, by key

    @property
    def head(self) -> Epoch:
        return self.chain[-1]

    def hashes(self) -> list[str]:
        return [e.sha256 for e in self.chain[1:]]

    def admitted_by(self) -> dict[str, str]:
        """site -> the members who approved the epoch that gave it its current keys
        ("SiteA, SiteB": every admission needs a quorum, so one name would mislead)."""
        out = {}
        for e in self.chain[1:]:
            if e.change["op"] in (ADMIT, ROTATE):
                out[e.change["site"]] = ", ".join(sorted(e.approvers)) or str(e.proposer)
        return out


# --------------------------------------------------------------------------- writing
def proposal(fed_id: str, head: Epoch, change: dict, members: dict[str, PublicIdentity], by: Identity,
             from_round: int = 0) -> tuple[str, bytes]:
    e = head.number + 1
    key = layout.epoch_proposal(e, from_round, by.site)
    body = {"kind": "epoch", "federation": fed_id, "name": key, "author": by.site, "epoch": e,
            "previous": head.sha256, "change": change, "from_round": from_round,
            "members": {s: i.to_json() for s, i in sorted(members.items())}}
    return key, sign_record(body, by)  # no timestamp: a retry writes the very same bytes


def approval(fed_id: str, e: int, from_round: int, proposal_sha: str, by: Identity) -> tuple[str, bytes]:
    key = layout.epoch_approval(e, from_round, by.site)
    body = {"kind": "approval", "federation": fed_id, "name": key, "author": by.site, "epoch": e,
            "proposal": proposal_sha}
    return key, sign_record(body, by)


def changed(head: Epoch, change: dict, identity: PublicIdentity | None = None) -> dict[str, PublicIdentity]:
    """The member set after `change` (admit/rotate: `identity` is the site's new keys)."""
    members = dict(head.members)
    if change["op"] == REMOVE:
        members.pop(change["site"])
    else:
        members[change["site"]] = identity
    return members


# --------------------------------------------------------------------------- reading
def load(list_keys: Callable[[], list[str]], read: Callable[[str], bytes], fed_id: str, genesis: Epoch,
         setting: int | None) -> Log:
    """Verify the chain from the genesis: per epoch, the one proposal a quorum approved."""
    log = Log([genesis])
    proposals: dict[int, dict[str, str]] = {}  # epoch -> logical key -> site
    approvals: dict[int, dict[str, str]] = {}
    slots: dict[str, list[str]] = {}  # logical key -> its stored slots, in order (layout.slot)
    for key in sorted(list_keys(), key=layout.unslot):
        parsed = layout.epoch_of(key)
        if parsed is None:
            log.ignored[key] = f"{key}: not an epoch record's name"
            continue
        kind, e, _, site = parsed
        logical = layout.unslot(key)[0]
        slots.setdefault(logical, []).append(key)
        (proposals if kind == "epoch" else approvals).setdefault(e, {})[logical] = site
    read = _first_valid(read, slots, log)
    while True:
        e = log.head.number + 1
        found = _proposals(log, proposals.pop(e, {}), read, fed_id)
        votes = _approvals(log, approvals.pop(e, {}), read, fed_id, found)
        need = quorum(setting, len(log.head.members))
        # one approval per member per (epoch, first round), and q a majority: one winner per
        # first round; of those the earliest wins (a later one is only proposed once it is too late)
        won = sorted((found[sha][1].from_round, sha) for sha in found if len(votes[sha]) >= need)
        won = [sha for _, sha in won]
        if not won:
            log.open = [Proposal(found[sha][0], sha, found[sha][1], tuple(votes[sha]), need) for sha in sorted(found)]
            break
        _decide(log, e, found, votes, won[0], read)
    for rest in (proposals, approvals):
        for e, keys in rest.items():
            for key in keys:
                log.ignored.setdefault(key, f"{key}: epoch {e} does not follow epoch {log.head.number}")
    return log


def _first_valid(read: Callable[[str], bytes], slots: dict[str, list[str]], log: Log):
    """`read(logical key, check)`: the bytes of the first slot of the key whose record
    passes `check` (junk someone wrote at the predictable key costs a slot, section 3 of
    docs/design.md); the others are ignored and reported. Remembers the slot it took."""
    taken: dict[str, str] = {}

    def first(key: str, check=None) -> bytes:
        if key in taken:
            return read(taken[key])
        last = None
        for at in slots.get(key, [key]):
            data = read(at)
            try:
                if check is not None:
                    check(data)
                taken[key] = at
                return data
            except IntegrityError as exc:
                log.ignored[at], last = exc.message, exc
        raise last if last is not None else IntegrityError(f"{key}: no slot holds it")

    first.slot = lambda key: taken.get(key, key)
    return first


def _decide(log: Log, e: int, found: dict, votes: dict, winner: str, read) -> None:
    """Epoch e is the `winner` proposal; its records are kept, the losers' ignored."""
    key, epoch = found[winner]
    log.chain.append(Epoch(**{**epoch.__dict__, "approvers": tuple(votes[winner])}))
    log.records[read.slot(key)] = read(key)
    for sha, voters in votes.items():
        for s in voters:
            akey = layout.epoch_approval(e, found[sha][1].from_round, s)
            if sha == winner:
                log.records[read.slot(akey)] = read(akey)
            else:
                log.ignored[read.slot(akey)] = f"{akey}: approves a proposal that lost epoch {e} to {key}"
        if sha != winner:
            log.ignored[read.slot(found[sha][0])] = f"{found[sha][0]}: lost epoch {e} to {key}"


def _proposals(log: Log, keys: dict[str, str], read, fed_id: str) -> dict[str, tuple[str, Epoch]]:
    """sha256 -> (key, epoch it would be) for the valid proposals of the next epoch."""
    found = {}
    for key, site in sorted(keys.items()):
        try:
            data = read(key, lambda d: _check_proposal(log.head, d, key, site, fed_id))
            found[sha256_hex(data)] = (key, _check_proposal(log.head, data, key, site, fed_id))
        except IntegrityError:
            pass  # every slot of it is junk, reported by `read`
    return found


def _approvals(log: Log, keys: dict[str, str], read, fed_id: str, found: dict) -> dict[str, list[str]]:
    votes: dict[str, list[str]] = {sha: [] for sha in found}
    head = log.head
    for key, site in sorted(keys.items()):
        try:  # the first slot this member signed counts (a later one cannot change its vote)
            data = read(key, lambda d: _open(head, d, key, site, fed_id, "approval"))
            body, _ = _open(head, data, key, site, fed_id, "approval")
            if body.get("proposal") not in votes or \
                    layout.epoch_of(key)[2] != found[body["proposal"]][1].from_round:
                raise IntegrityError(f"{key}: approves no valid proposal for epoch {head.number + 1}")
            votes[body["proposal"]].append(site)
        except IntegrityError as exc:
            log.ignored.setdefault(read.slot(key), exc.message)
    return votes


def _open(head: Epoch, data: bytes, key: str, site: str, fed_id: str, kind: str) -> tuple[dict, str]:
    """Only a member of the previous epoch, signing under its own name, counts."""
    signer = record_signer(data, key)
    if signer != site or site not in head.members:
        raise IntegrityError(f"{key}: not signed by {site!r} as a member of epoch {head.number}")
    return open_record(data, authors={site: head.members[site]}, name=key,
                       expect={"federation": fed_id, "kind": kind, "name": key, "author": site,
                               "epoch": head.number + 1})


def _check_proposal(head: Epoch, data: bytes, key: str, site: str, fed_id: str) -> Epoch:
    body, _ = _open(head, data, key, site, fed_id, "epoch")
    change, members, start = body.get("change"), body.get("members"), body.get("from_round")
    if start != layout.epoch_of(key)[2]:
        raise IntegrityError(f"{key}: applies from round {start!r}, not the round its name says")
    if body.get("previous") != head.sha256:
        raise IntegrityError(f"{key}: names another previous epoch than epoch {head.number}")
    if not isinstance(change, dict) or set(change) != {"op", "site"} or not isinstance(members, dict) \
            or type(start) is not int or start < head.from_round:
        raise IntegrityError(f"{key}: malformed epoch proposal (or applying before epoch {head.number})")
    idents = {s: PublicIdentity.from_json(v, key) for s, v in members.items()}
    if any(i.site != s for s, i in idents.items()):
        raise IntegrityError(f"{key}: a member set entry names another site")
    target = change["site"]
    ok = {ADMIT: target not in head.members and layout.valid_site(str(target)),
          REMOVE: target in head.members and len(head.members) > 1,
          ROTATE: target == site and target in idents and idents.get(target) != head.members.get(target)}
    if not ok.get(change["op"]) or idents != changed(head, change, idents.get(target)):
        raise IntegrityError(f"{key}: member set does not follow from epoch {head.number} by "
                             f"{change.get('op')} {target!r}")
    return Epoch(head.number + 1, sha256_hex(data), idents, dict(change), site, (), start)


def check_kept(log: Log, kept: list[str]) -> None:
    """The chain a site verified before must still be a prefix of what the storage shows:
    a shorter chain is a rollback, another hash a fork."""
    have = log.hashes()
    for i, sha in enumerate(kept):
        if i >= len(have):
            raise IntegrityError(f"epoch {i + 1} disappeared from the shared storage",
                                 "the membership log was rolled back or deleted; alert the members")
        if have[i] != sha:
            raise IntegrityError(f"epoch {i + 1} differs from the one this site verified",
                                 "the storage shows another membership history (a fork); alert the members")
