"""Sharded aggregation of a secure round (docs/design.md 7.9): the merge work is split
among the contributors, so that no site downloads every contribution.

The secure tensors, concatenated in key order, are cut into slices (`secagg.slices`:
about one per key-sealed site). Each contributor uploads one masked shard per slice.
For slice j the contributors are ranked by one order drawn from the seal, turned by
REPLICAS x j (`secagg.owners`: every site owns as many slices, to within one); the
first REPLICAS download that slice from every contributor, unmask it (the masks are
seekable) and publish the mean: an envelope of float32 pieces, and a small signed
record of its plaintext hash. A slice counts once two sites published the same hash.
If they disagree, or if no two agree one deadline after the seal (and each deadline
after), the next site of the ranking sums it too. Every site then downloads one copy
of every slice: about REPLICAS masked slices and the model once, whatever the number
of sites.
"""
from __future__ import annotations

import time

import numpy as np

from .. import crypto, layout, secagg
from ..errors import FederationHalted
from ..merge import Layer
from ..objects import read_envelope
from .wait import Wait


def on(t, keys) -> bool:
    """Whether a secure round whose key seal lists `keys` is sharded."""
    return len(keys) >= max(t.s.sharded_from, secagg.MIN_GROUP)


def _cuts(secure: dict, n_sites: int) -> list[list[tuple[int, int, int]]]:
    from ..shards import MASKED_MAX_BYTES

    return secagg.slices(secure, secagg.slice_count(secure, n_sites, MASKED_MAX_BYTES // 8))


def masked_shards(secure: dict, n_sites: int, own: dict, site: str, mask) -> list[bytes]:
    """One masked shard per slice (empty where this site holds none of it)."""
    from ..shards import one_shard

    tensors, blobs = list(secure), []
    for cut in _cuts(secure, n_sites):
        items = []
        for g, a, b in cut:
            if site in secure[tensors[g]]:
                name, skey = secagg.entry_name(g, a), tensors[g][0]
                items.append((name, Layer((name,), mask.words(skey, own[skey].array, a, b))))
        blobs.append(one_shard(items))
    return blobs


def aggregate(t, r: int, seal: dict, secure: dict, unmask) -> dict[tuple, np.ndarray]:
    """Sum the slices this site owns, then read every slice's agreed mean; else Wait."""
    tensors, cuts = list(secure), _cuts(secure, len(t.view.key_seal(r)[1]["keys"]))
    contributors, seal_sha = sorted(seal["contributions"]), t.view.seal_sha(r)
    agreed, waiting, missing = {}, set(), []
    for j, cut in enumerate(cuts):
        wanted = [(g, a, b) for g, a, b in cut if tensors[g] in unmask.factors]  # pieces someone contributed to
        if not wanted:
            continue
        ranked = secagg.owners(seal_sha, j, contributors)
        listed = [s for s in ranked if t.view.has(layout.slice_hash(r, j, s))]
        if len(listed) < min(secagg.REPLICAS, len(ranked)) and (
                t.site in listed or t.site not in ranked[:_allowed(t, seal, {}, len(ranked))]):
            waiting |= {s for s in ranked[:_allowed(t, seal, {}, len(ranked))] if s not in listed}
            missing.append(j)  # nothing to agree on yet, nothing for this site to do: read nothing
            continue
        published = _published(t, r, j, ranked)
        value = _agreed(published, ranked)
        allowed = ranked[:_allowed(t, seal, published, len(ranked))]
        if value is None and t.site in allowed and t.site not in published:
            _sum_slice(t, r, j, seal, wanted, tensors, unmask, len(cuts))
            published = _published(t, r, j, ranked)
            value = _agreed(published, ranked)
        if value is None:
            waiting |= {s for s in allowed if s not in published}
            missing.append(j)
        else:
            agreed[j] = (value, wanted, [s for s in ranked if published.get(s, {}).get("sha256") == value])
    if missing:
        raise Wait("round", f"round {r}: waiting for slice sums from {', '.join(sorted(waiting)) or 'their owners'} "
                            f"({len(agreed)} of {len(cuts)} slices agreed)", sorted(waiting), rnd=r)
    return _assemble(t, r, agreed, tensors, unmask.factors)


def _published(t, r: int, j: int, ranked: list[str]) -> dict[str, dict]:
    """site -> its verified record of slice j's sum."""
    out = {}
    for s in ranked:
        key = layout.slice_hash(r, j, s)
        if t.view.has(key) and (body := t.view.record(key, "slice-hash", s)) is not None:
            if body["round"] != r or body["slice"] != j:
                raise FederationHalted(f"{key}: {s} signed a slice record for another slice", "a person must look")
            out[s] = body
    return out


def _agreed(published: dict[str, dict], ranked: list[str]) -> str | None:
    """The plaintext hash two sites published for a slice (best ranked first), or None."""
    count: dict[str, int] = {}
    for s in ranked:
        if s in published:
            sha = published[s]["sha256"]
            count[sha] = count.get(sha, 0) + 1
            if count[sha] >= min(secagg.REPLICAS, len(ranked)):
                return sha
    return None


def _allowed(t, seal: dict, published: dict, n: int) -> int:
    """How many of a slice's ranked sites sum it now: REPLICAS, one more per disagreeing
    value, and one more per deadline passed since the seal (all at once with no deadline)."""
    late = int(time.time()) - seal["sealed_at"]
    extra = n if t.s.deadline_s == 0 else max(0, late) // t.s.deadline_s
    return secagg.REPLICAS + max(0, len({b["sha256"] for b in published.values()}) - 1) + extra


def _sum_slice(t, r: int, j: int, seal: dict, wanted: list, tensors: list, unmask, n_slices: int) -> None:
    """Sum, unmask and publish slice j: its pieces' float32 means."""
    from ..shards import one_shard
    from .secure import masked_sums

    def expect(site: str, commit):
        if len(commit.shards) != n_slices:
            return (), {("missing", (1,))}  # a sharded commit lists one masked shard per slice
        return (commit.shards[j],), {(secagg.entry_name(g, a), (b - a,)) for g, a, b in wanted
                                     if site in unmask.secure[tensors[g]]}

    unmask.ready()  # the reveals first: waiting for them downloads nothing
    sums = masked_sums(t, r, seal, sorted(seal["contributions"]), expect)
    items = []
    for g, a, b in wanted:
        name = secagg.entry_name(g, a)
        items.append((name, Layer((name,), unmask(tensors[g], sums[(name, (b - a,))], a))))
    blob = one_shard(items)
    key = layout.slice_sum(r, j, t.site)
    sha = t.write.envelope(key, "slice", blob, round=r)
    t.write.record(layout.slice_hash(r, j, t.site), "slice-hash",
                   {"round": r, "slice": j, "sha256": crypto.sha256_hex(blob), "sum": {"key": key, "sha256": sha}})
    t.say(f"summed slice {j} of round {r}")


def _assemble(t, r: int, agreed: dict, tensors: list, factors: dict) -> dict[tuple, np.ndarray]:
    """Every secure tensor with contributors, from the agreed slices (one copy each)."""
    from ..shards import read_shard

    out = {k: np.empty(int(np.prod(k[1])), dtype=np.float32) for k in factors}
    for j, (value, wanted, publishers) in sorted(agreed.items()):
        pieces = _one_copy(t, r, j, value, publishers)
        got = {name: layer.array for name, layer in read_shard(pieces, f"round {r} slice {j}")}
        for g, a, b in wanted:
            piece = got.get(secagg.entry_name(g, a))
            if piece is None or piece.size != b - a:
                raise FederationHalted(f"round {r}: the agreed sum of slice {j} lacks a piece of "
                                       f"{tensors[g][0]!r} (published by {', '.join(publishers)})", "a person must look")
            out[tensors[g]][a:b] = piece.ravel()
    merged = {}
    for k, flat in out.items():
        merged[k] = flat.reshape(k[1])
        merged[k].flags.writeable = False
    return merged


def _one_copy(t, r: int, j: int, value: str, publishers: list[str]) -> bytes:
    """The plaintext of slice j whose hash two sites published, from the first that holds it."""
    for s in publishers:
        body = t.view.record(layout.slice_hash(r, j, s), "slice-hash", s)
        blob = t.view.find(body["sum"]["key"], body["sum"]["sha256"], layout.slice_hash(r, j, s))
        if blob is None or body["sum"]["key"] != layout.slice_sum(r, j, s):
            continue
        plain = read_envelope(t.fed, body["sum"]["key"], "slice", t.me, author=s, blob=blob, round=r)[1]
        if crypto.sha256_hex(plain) == value:
            return plain
    raise FederationHalted(f"round {r}: no stored sum of slice {j} matches the hash {', '.join(publishers)} published",
                           "a person must look")
