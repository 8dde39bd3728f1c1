"""A member's contribution to a round, read and checked before it is merged.

Everything a member writes is validly signed, and still untrusted: a commit, its
metadata and its shards are checked field by field, and whatever is unusable raises
`ContributionRejected` naming the site, so every site excludes the same
contributions. Tampering by the storage (bytes that do not match what a seal or
commit lists) raises `IntegrityError`, naming the object."""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from .. import crypto, layout, schema
from ..errors import ContributionRejected, IntegrityError
from ..objects import read_envelope, read_json
from .view import View


def declared_cases(state: dict, site: str) -> int:
    """A site's declared merge weight, from what this site verified and kept; a refused
    (or absent) declaration rejects its contribution."""
    refused = state.get("refused_declarations", {})
    if site in refused:
        raise ContributionRejected(refused[site])
    if site not in state.get("declared", {}):
        raise ContributionRejected(f"site {site!r}: has no declared case count")
    return state["declared"][site]


@dataclass(frozen=True)
class Ref:
    key: str
    sha256: str


@dataclass(frozen=True)
class Commit:
    base: str | None
    shards: tuple[Ref, ...]
    meta: Ref


def parse_commit(site: str, r: int, body: dict, kind: str = "shard") -> Commit:
    """The well-formed commit of `site` for round r, or ContributionRejected. `kind`: what
    it must list, weight shards, or masked ones (secure aggregation)."""
    schema.check(schema.RECORDS["commit"], body, f"site {site!r}: round {r} commit", ContributionRejected)
    commit = Commit(body["base"], tuple(Ref(s["key"], s["sha256"]) for s in body["shards"]),
                    Ref(body["meta"]["key"], body["meta"]["sha256"]))
    if commit.meta.key != layout.meta(r, site):
        raise ContributionRejected(f"site {site!r}: round {r} commit lists metadata at {commit.meta.key}")
    for s in commit.shards:
        if layout.round_of(s.key) != r or layout.kind_of(s.key) != (kind, True, site):
            raise ContributionRejected(f"site {site!r}: round {r} commit lists a shard elsewhere ({s.key})")
    return commit


def write_commit(t, r: int, meta: dict, refs: list, base: str | None) -> None:
    """Metadata, then the commit that lists it and the (masked) shards `refs`: always last."""
    from ..faults import crash_point

    meta = {**meta, "round": r, "base": base}
    meta_ref = {"key": layout.meta(r, t.site),
                "sha256": t.write.envelope(layout.meta(r, t.site), "meta", crypto.canonical_json(meta), round=r)}
    crash_point("commit")
    t.write.record(layout.commit(r, t.site), "commit", {"round": r, "base": base, "shards": refs, "meta": meta_ref})


@dataclass(frozen=True)
class Contribution:
    site: str
    cases: int
    commit: Commit
    metrics: dict


def read_contribution(view: View, me, r: int, site: str, commit_sha: str, expected_base: str | None,
                      kind: str = "shard") -> Contribution:
    """Commit (as the seal lists it) and metadata of `site` for round r, checked."""
    key = layout.commit(r, site)
    commits = view.commits(r)
    if site not in commits:
        view.get(key, f"round {r}'s seal")  # raises: listed but missing
        raise IntegrityError(f"{key}: not the commit the seal lists{view.junk_at(key)}")
    sha, body = commits[site]
    if sha != commit_sha:
        raise IntegrityError(f"{key}: not the commit the seal lists")
    commit = parse_commit(site, r, body, kind)
    meta_blob = view.find(commit.meta.key, commit.meta.sha256, key)  # in whichever slot it went to
    if meta_blob is None:
        raise IntegrityError(f"{commit.meta.key}: not the metadata the commit lists")
    meta = read_json(view.fed, commit.meta.key, "meta", me, author=site, blob=meta_blob, round=r)[1]
    cases, declared = meta["cases"], declared_cases(view.state, site)  # 1..MAX_CASES: schema.PAYLOADS["meta"]
    if r > 0 and cases != declared:  # the weight is the declaration (round 0, the initial model, is unweighted)
        raise ContributionRejected(f"site {site!r}: round {r} metadata claims {cases} cases, "
                                   f"it declared {declared}")
    if meta.get("base") != commit.base or meta.get("round") != r:
        raise ContributionRejected(f"site {site!r}: round {r} metadata disagrees with its commit")
    if expected_base is not None and commit.base != expected_base:
        raise ContributionRejected(f"site {site!r}: round {r} contribution is built on another base model")
    return Contribution(site, declared, commit, meta["metrics"])


def weight_shares(settings, declared: dict[str, int]) -> dict[str, Fraction]:
    """The exact merge weights of `declared` contributors: their declared case counts
    (uniform with `--weighting uniform`), each share capped at `max_weight_share` over
    these contributors (p2pfed.merge.capped_weights)."""
    from ..merge import capped_weights

    if settings.weighting != "cases":
        return {s: Fraction(1) for s in sorted(declared)}
    cap = Fraction(str(settings.max_weight_share)) if settings.max_weight_share is not None else None
    return capped_weights(declared, cap)


def merge_weights(settings, declared: dict[str, int]) -> dict | None:
    """What the merge multiplies with (None: uniform), converted once from `weight_shares`."""
    from ..merge import as_merge_weights

    return as_merge_weights(weight_shares(settings, declared)) if settings.weighting == "cases" else None


def read_shard_plain(view: View, me, r: int, site: str, ref: Ref, kind: str = "shard") -> bytes:
    """A listed shard, checked against its commit and its (signed) name, decrypted."""
    blob = view.get(ref.key, layout.commit(r, site))
    if crypto.sha256_hex(blob) != ref.sha256:
        raise IntegrityError(f"{ref.key}: not the shard the commit lists")
    plain = read_envelope(view.fed, ref.key, kind, me, author=site, blob=blob, round=r)[1]
    if layout.shard_plain_sha256(ref.key) != crypto.sha256_hex(plain):  # signed so by its author
        raise ContributionRejected(f"site {site!r}: {ref.key} holds content that does not match its name")
    return plain


class InputCheck:
    """Merge input checks against the base model (FFE: the merge of the previous round,
    which every contribution was trained from): the same tensors with the same shapes,
    and, with `max_update_norm`, an L2 distance to the base of at most that many times
    the base's norm. Fed each shard as the merge reads it. Each tensor's sum of squares
    is a float64 numpy sum, the total an exact math.fsum: every site reaches the same
    verdict, hence excludes the same contributions."""

    def __init__(self, base, bound: float | None):
        from ..merge import canonical_layers

        self.base = canonical_layers(base, "the base model") if base is not None else None
        self.bound = bound
        if self.base is not None:
            self.base_norm = math.sqrt(math.fsum(_sum_sq(layer.array) for layer in self.base.values()))
        self.start()

    def start(self) -> None:
        self.keys: dict[str, set] = {}
        self.dist: dict[str, list[float]] = {}

    def add(self, site: str, index: int, blob: bytes) -> None:
        if self.base is None:
            return
        from ..shards import read_shard

        for skey, layer in read_shard(blob, f"site {site!r} shard {index}"):
            want = self.base.get(skey)
            if want is None or want.array.shape != layer.array.shape:
                raise ContributionRejected(
                    f"site {site!r}: tensor {layer.names[0]!r} has shape {list(layer.array.shape)}, the agreed "
                    f"model {'has no such tensor' if want is None else list(want.array.shape)}")
            self.keys.setdefault(site, set()).add(skey)
            if self.bound is not None:
                self.dist.setdefault(site, []).append(_sum_sq(layer.array, want.array))

    def finish(self, sites) -> None:
        if self.base is None:
            return
        for site in sorted(sites):
            missing = sorted(set(self.base) - self.keys.get(site, set()))
            if missing:
                raise ContributionRejected(f"site {site!r}: lacks {len(missing)} tensor(s) of the agreed model, "
                                           f"e.g. {missing[0]!r}")
            if self.bound is not None:
                norm = math.sqrt(math.fsum(self.dist[site]))
                if not norm <= self.bound * self.base_norm:  # NaN fails too
                    raise ContributionRejected(
                        f"site {site!r}: update norm {norm:.6g} exceeds max_update_norm {self.bound:g} "
                        f"x the merged model's norm {self.base_norm:.6g}")


def _sum_sq(a, b=None) -> float:
    import numpy as np

    d = a.astype(np.float64) if b is None else a.astype(np.float64) - b
    with np.errstate(invalid="ignore", over="ignore"):
        return float(np.square(d).sum())
