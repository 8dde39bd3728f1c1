"""Rounds 1..R. Each round r is the first round without a seal, in four named steps:

- merge:  merge every sealed round this site has not merged yet, oldest first
          (p2pfed/protocol/phases/merge.py); the merge of r-1 is round r's base;
- train:  train round r locally from that base and cache the result in the site home;
- upload: shards, then metadata, then the commit, written last;
- seal:   once every participant committed, or the quorum did and the deadline
          passed, seal the round create-only; everyone adopts the seal that won.

A site that was away jumps to the first unsealed round after merging what it missed."""
from __future__ import annotations

import json
import time

from ... import crypto, layout
from ...errors import ContributionRejected
from ...faults import crash_point
from ...site import atomic_write
from .. import handover, secure
from ..contribution import parse_commit, write_commit
from ..wait import Wait
from . import merge

NAME = "round"
STEPS = ("merge", "train", "upload", "seal")


def advance(t) -> str | None:
    v = t.view
    r = v.current_round()
    if r != t.state.get("round"):
        t.save(round=r)
    t.report.round = min(r, t.s.rounds)
    joined = v.joins_at(t.site)  # admitted into the running federation: from round `joined` on
    if joined is not None and t.state.get("merged_upto", t.mode.first_round - 1) < joined - 1:
        return _welcome(t, r, joined)
    m = merge.next_unmerged(t, r)
    if m is not None and t.site in v.participants_of(m):
        t.enter("merge")
        return merge.merge_round(t, m)
    if t.site not in v.participants_of(min(r, t.s.rounds)):  # removed by an epoch in force by round r
        raise Wait("removed", f"site {t.site!r} was removed from the federation: it takes part in "
                              f"no round from {_first_without(t)} on", [], rnd=r)
    handed = handover.publish(t, r - 1)  # FFE: the merge of r-1 for a site admitted from round r
    if handed:
        return handed
    merge.confirm(t)
    if r > t.s.rounds:
        return None
    t.adopt_keys(r)  # a rotated key is used from the round its epoch applies
    if not committed(t, r):
        if secure.enabled(t, r):  # key material first: the others mask with it while this site trains
            published = secure.publish_keys(t, r, lambda: secure.layout_of(start_weights(t, r)))
            if published:
                return published
        cached = cached_training(t, r)
        if cached is None:
            t.enter("train")
            return train(t, r)
        t.enter("upload")
        v.refresh(layout.seal(r))  # training takes a while: the round may have been sealed meanwhile
        if v.seal(r) is not None:
            return f"round {r} was sealed without this site; catching up"
        if not secure.enabled(t, r):
            upload(t, r, *cached)
        elif (why := secure.upload(t, r, *cached, base_model(t, r)[0])) is not None:
            t.enter("seal")
            t.say(why)
            return seal(t, r)
        t.save(committed=r)
        return f"committed round {r}"
    t.enter("seal")
    return seal(t, r)


def committed(t, r: int) -> bool:
    """Whether this site's commit of round r is in the storage. Junk at its key is not:
    it is verified once, then the listing suffices (an idle tick reads nothing more)."""
    v, key = t.view, layout.commit(r, t.site)
    if t.state.get("committed") == r and v.has(key):
        return True
    if v.record(key, "commit", t.site) is None:
        return False
    t.save(committed=r)
    return True


def _welcome(t, r: int, joined: int) -> str:
    """A site admitted from round `joined`: wait for that round, then start from the merge
    of the round before (FFE: handed over) or from its own network (asym)."""
    if r < joined:
        raise Wait("admitted", f"site {t.site!r} takes part from round {joined}; round {r} is open", [], rnd=r)
    if t.mode.plans_must_agree:
        return handover.adopt(t, joined)
    t.save(merged_upto=joined - 1)
    return f"takes part from round {joined}, starting from its own network"


def _first_without(t) -> int:
    return next(r for r in range(t.mode.first_round, t.s.rounds + 1) if t.site not in t.view.participants_of(r))


# --------------------------------------------------------------------------- train
def base_model(t, r: int) -> tuple[dict | None, str | None]:
    """(weights, model hash) that round r starts from: the merge of round r-1."""
    if r - 1 < t.mode.first_round or (not t.mode.plans_must_agree and t.site not in t.view.participants_of(r - 1)):
        return None, None  # asym: a site admitted from round r starts from its own network
    return merge.merged_weights(t, r - 1)


def start_weights(t, r: int):
    """The model round r's training starts from (its layout is what this site masks)."""
    weights = base_model(t, r)[0]
    return weights if weights is not None else t.trainer.initial_weights()


def _cache(t, r: int):
    return t.home.work("rounds", f"{r:05d}")


def cached_training(t, r: int) -> tuple[dict, dict, str | None] | None:
    """(weights, meta, base) of round r trained by an earlier tick from today's base."""
    folder = _cache(t, r)
    meta_file = folder / "meta.json"
    if not meta_file.exists():
        return None
    meta = json.loads(meta_file.read_text())
    base = merge.merged_model(t, r - 1) if r - 1 >= t.mode.first_round else None
    if meta.get("base") != base:
        return None
    from ...shards import from_shards

    weights = from_shards([p.read_bytes() for p in sorted(folder.glob("*.safetensors"))], site=t.site)
    return weights, meta, base


def train(t, r: int) -> str:
    from ...shards import to_shards

    base_weights, base = base_model(t, r)
    result = t.trainer.train(r, base_weights)
    meta = {"round": r, "base": base, "cases": result.cases, "epoch": result.epoch, "metrics": result.metrics}
    folder = _cache(t, r)
    for old in folder.glob("*"):
        old.unlink()
    for i, blob in enumerate(to_shards(result.weights, site=t.site)):
        atomic_write(folder / f"{i:05d}.safetensors", blob)
    atomic_write(folder / "meta.json", json.dumps(meta).encode())  # last: marks the cache complete
    return f"trained round {r}"


# --------------------------------------------------------------------------- upload
def upload(t, r: int, weights, meta: dict, base: str | None) -> None:
    """Shards, then meta, then the commit: a commit is only ever written last."""
    from ...shards import to_shards

    blobs, refs = to_shards(weights, site=t.site), []
    for i, blob in enumerate(blobs):
        key = layout.shard(r, t.site, crypto.sha256_hex(blob))
        refs.append({"key": key, "sha256": t.write.envelope(key, "shard", blob, round=r)})
        crash_point("upload")
        if t.progress:
            t.progress("upload", i + 1, len(blobs))
    write_commit(t, r, meta, refs, base)


# --------------------------------------------------------------------------- seal
def sealable(t, r: int, sites) -> tuple[dict[str, str], list[str]]:
    """(site -> commit sha256 of round r's well-formed commits by `sites`, why the others are
    not counted): a malformed commit is never sealed, and its site is named while waiting."""
    found, malformed = {}, []
    kind = "masked" if secure.enabled(t, r) else "shard"
    for site, (sha, body) in t.view.commits(r).items():
        if site not in sites:
            continue
        try:
            parse_commit(site, r, body, kind)
            found[site] = sha
        except ContributionRejected as exc:
            malformed.append(exc.message)
    return found, malformed


def seal(t, r: int) -> str:
    """Seal round r once every site that may contribute committed, or enough did by the
    deadline. Secure aggregation: those are the key-sealed sites, and enough is
    secagg.minimum, with no secure group left with one or two contributors."""
    v = t.view
    parts, need, extra = secure.seal_terms(t, r) if secure.enabled(t, r) else (v.participants_of(r), v.quorum_of(r), {})
    opened, now = v.opened_at(r), int(time.time())
    deadline = opened + t.s.deadline_s
    listed, malformed = [s for s in v.committed(r) if s in parts], []
    if len(listed) == len(parts) or (len(listed) >= need and now >= deadline):
        commits, malformed = sealable(t, r, parts)
        if len(commits) == len(parts) or (len(commits) >= need and now >= deadline):
            why = secure.unsealable(t, r, commits) if extra else None
            if why is None:
                reason = "all" if len(commits) == len(v.participants_of(r)) else "deadline"
                body = {"round": r, "contributions": commits, "reason": reason, "opened_at": opened,
                        "sealed_at": now, "previous": v.previous_seal(r), **extra}
                crash_point("seal")
                return f"sealed {layout.seal(r)}" if t.write.claim(layout.seal(r), "seal", body) else ""
            malformed.append(f"(cannot seal yet: {why})")
    listed = v.committed(r)  # less any junk found at a commit key meanwhile
    missing = [s for s in parts if s not in listed]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(deadline))
    waiting = ", ".join(missing + malformed)
    raise Wait("round", f"round {r}/{t.s.rounds}: waiting for {waiting} "
                        f"(quorum {need} may seal after {when})", missing + malformed, deadline, rnd=r)


def pending(v) -> dict | None:
    r = v.current_round()
    if r > v.s.rounds:
        return None
    return {"round": r, "waiting_for": [s for s in v.participants_of(r) if s not in v.committed(r)]}
