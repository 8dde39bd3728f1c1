"""Merging a sealed round, as every site does it for itself (docs/design.md, section 7.3).

`RoundMerge` is the part of a tick (`p2pfed.tick.Tick`) that turns a seal into this
site's next model: it fetches and checks every contribution the seal lists, excludes
the unusable ones deterministically, streams the merge, caches this site's merged
shards, publishes the hash of the whole result and compares it with the other sites'.
Only numpy and safetensors are needed: no torch, no nnU-Net."""
from __future__ import annotations

import json
import math
from pathlib import Path

from . import crypto, layout
from .errors import ContributionRejected, FederationHalted, IntegrityError, SetupError
from .faults import crash_point
from .objects import read_envelope, read_record
from .site import atomic_write

MAX_CASES = 10_000_000  # "absurd case counts" are refused beyond this


def hash_json(obj) -> str:
    return crypto.sha256_hex(crypto.canonical_json(obj))


def model_hash(shard_hashes: list[str]) -> str:
    """A model's identity: the sha256 of its canonical shard list (docs/design.md)."""
    return hash_json(shard_hashes)


class RoundMerge:
    """Mixin of Tick: uses its fed, st, site, s, me, home, participants, say, _did,
    _record_once, sealed and _initial_weights."""

    def base_model(self, r: int):
        """The model round r starts from: the merge of round r-1 (None in asym round 1)."""
        if r == 1 and self.s.mode == "asym":
            return None, None
        return self.merged(r - 1)

    def merged(self, r: int):
        """Merge sealed round r (cached), publish our result hash, check the others'.
        Returns (this site's weights, their model hash)."""
        from .shards import from_shards

        folder = self.home.work("merged", f"{r:05d}")
        done = folder / "merged.json"
        if not done.exists():
            self._merge(r, folder)
        record = json.loads(done.read_text())
        if r > 0 and not self.st.exists(layout.merged(r, self.site)):
            self._record_once(layout.merged(r, self.site), "merged",
                              {"round": r, "result": record["result"], "per_site": record["per_site"],
                               "excluded": record["excluded"]})
        self._check_merges_agree(r, record["result"])
        blobs = [p.read_bytes() for p in sorted(folder.glob("*.safetensors"))]
        return from_shards(blobs, site=self.site), record["own"]

    def _merge(self, r: int, folder: Path) -> None:
        from .shards import stream_merge

        seal = self.sealed(r)
        if seal is None:
            raise SetupError(f"round {r} is not sealed yet")
        # FFE: every contribution was trained from the merge of round r-1; check against it
        check = InputCheck(self.merged(r - 1)[0] if r > 0 and self.s.mode == "ffe" else None,
                           self.s.max_update_norm)
        contributions, excluded = {}, {}
        for s in sorted(seal["contributions"]):
            try:
                contributions[s] = self._contribution(r, s, seal["contributions"][s])
            except ContributionRejected as exc:
                excluded[s] = exc.message

        def load(site: str, i: int) -> bytes:
            blob = self._shard(contributions[site]["shards"][i], site, r)
            check.add(site, i, blob)
            return blob

        def sink(site: str, i: int, blob: bytes) -> None:
            if site == target:
                atomic_write(folder / f"{i:05d}.safetensors", blob)
                crash_point("merge")

        while True:  # a contribution found unusable while streaming is excluded, and the merge rerun
            if not contributions:
                raise FederationHalted(f"round {r}: every contribution was rejected ({excluded})")
            weights = {s: c["cases"] for s, c in contributions.items()} if self.s.weighting == "cases" else None
            counts = {s: len(c["shards"]) for s, c in contributions.items()}
            target = self.site if self.site in contributions else (min(contributions) if self.s.mode == "ffe" else None)
            for old in folder.glob("*"):
                old.unlink()
            check.start()
            self.say(f"merging round {r} ({', '.join(sorted(contributions))})")
            try:
                hashes = stream_merge(load, counts, weights=weights, layers=self.s.layers, sink=sink)
                check.finish(contributions)
                break
            except ContributionRejected as exc:  # every merge error names the site first
                site = next((s for s in contributions if exc.message.startswith(f"site {s!r}")), None)
                if site is None:
                    raise
                excluded[site] = exc.message
                del contributions[site]
        per_site = {s: model_hash(h) for s, h in sorted(hashes.items())}
        if target is None:  # asym, missed round: adopt the shared layers into our own last model
            self._adopt(r, folder, contributions, load)
            own = model_hash([crypto.sha256_hex(p.read_bytes()) for p in sorted(folder.glob("*.safetensors"))])
        else:
            own = per_site[target]
        record = {"round": r, "result": hash_json(per_site), "per_site": per_site, "own": own,
                  "excluded": excluded}
        atomic_write(folder / "merged.json", json.dumps(record).encode())
        if r > 0:
            self._did(f"merged round {r}")

    def _contribution(self, r: int, site: str, commit_sha: str) -> dict:
        key = layout.commit(r, site)
        data = self._listed(key, f"round {r}'s seal")
        if crypto.sha256_hex(data) != commit_sha:
            raise IntegrityError(f"{key}: not the commit the seal lists")
        commit = read_record(self.fed, key, "commit", site, data=data)
        if commit["meta"]["key"] != layout.meta(r, site):
            raise IntegrityError(f"{key}: lists metadata at {commit['meta']['key']}")
        meta_blob = self._listed(layout.meta(r, site), key)
        if crypto.sha256_hex(meta_blob) != commit["meta"]["sha256"]:
            raise IntegrityError(f"{layout.meta(r, site)}: not the metadata the commit lists")
        meta = json.loads(read_envelope(self.fed, layout.meta(r, site), "meta", self.me, author=site,
                                        blob=meta_blob, round=r)[1])
        cases = meta.get("cases")
        if type(cases) is not int or not 1 <= cases <= MAX_CASES:
            raise ContributionRejected(f"site {site!r}: absurd case count {cases!r} in round {r}")
        if meta.get("base") != commit.get("base") or meta.get("round") != r:
            raise ContributionRejected(f"site {site!r}: round {r} metadata disagrees with its commit")
        expected = self._expected_base(r, site)
        if expected is not None and commit.get("base") != expected:
            raise ContributionRejected(f"site {site!r}: round {r} contribution is built on another base model")
        return {"cases": cases, "shards": commit["shards"], "metrics": meta.get("metrics", {})}

    def _expected_base(self, r: int, site: str) -> str | None:
        """The base a contribution to round r must name (None: round 0 and asym round 1)."""
        if r == 0 or (r == 1 and self.s.mode == "asym"):
            return None
        prev = self.home.work("merged", f"{r - 1:05d}") / "merged.json"
        if not prev.exists():  # a site that skipped rounds: every site must check the same bases
            self.merged(r - 1)
        per_site = json.loads(prev.read_text())["per_site"]
        if self.s.mode == "ffe":
            return next(iter(per_site.values()))
        return per_site.get(site)

    def _shard(self, ref: dict, site: str, r: int) -> bytes:
        key = ref["key"]
        if layout.round_of(key) != r or not key.startswith(f"{layout.round_dir(r)}/{site}/"):
            raise IntegrityError(f"{key}: shard listed by {site}'s round {r} commit lives elsewhere")
        blob = self._listed(key, layout.commit(r, site))
        if crypto.sha256_hex(blob) != ref["sha256"]:
            raise IntegrityError(f"{key}: not the shard the commit lists")
        plain = read_envelope(self.fed, key, "shard", self.me, author=site, blob=blob, round=r)[1]
        if key.rsplit("/", 1)[1] != crypto.sha256_hex(plain) + ".shard":  # signed so by its author
            raise ContributionRejected(f"site {site!r}: {key} holds content that does not match its name")
        return plain

    def _listed(self, key: str, by: str) -> bytes:
        """An object that a seal or commit vouches for: if it is gone, someone deleted it."""
        try:
            return self.st.get(key)
        except FileNotFoundError:
            raise IntegrityError(f"{key}: listed by {by} but missing from the storage",
                                 "someone deleted it; restore it from a backup of the storage and "
                                 "alert the members") from None

    def _adopt(self, r: int, folder: Path, contributions: dict, load) -> None:
        """Asym catch-up: our last local model, with every layer that a contributor shares
        (same structural key and shape) taken from that contributor's merged model."""
        from .merge import canonical_layers
        from .shards import from_shards, stream_merge, to_shards

        own = self._last_local_weights()
        merged_by_site: dict[str, list[bytes]] = {s: [] for s in contributions}
        stream_merge(load, {s: len(c["shards"]) for s, c in contributions.items()},
                     weights={s: c["cases"] for s, c in contributions.items()} if self.s.weighting == "cases" else None,
                     layers=self.s.layers, sink=lambda s, i, b: merged_by_site[s].append(b))
        shared = {}
        for s in sorted(merged_by_site):
            for skey, layer in canonical_layers(from_shards(merged_by_site[s], site=s), s).items():
                shared.setdefault(skey, layer.array)
        mine = canonical_layers(own, self.site)
        result = dict(own)
        for skey, layer in mine.items():
            if skey in shared and shared[skey].shape == layer.array.shape:
                for name in layer.names:
                    result[name] = shared[skey]
        for i, blob in enumerate(to_shards(result, site=self.site)):
            atomic_write(folder / f"{i:05d}.safetensors", blob)

    def _last_local_weights(self):
        from .shards import from_shards

        rounds = sorted(self.home.work("rounds").glob("*/meta.json"))
        if not rounds:
            return self._initial_weights()
        return from_shards([p.read_bytes() for p in sorted(rounds[-1].parent.glob("*.safetensors"))], site=self.site)

    def _check_merges_agree(self, r: int, result: str) -> None:
        if r == 0:
            return
        for key in self.st.list_prefix(f"{layout.round_dir(r)}/merged"):
            site = key.rsplit("/", 1)[1][:-len(".json")]
            if site not in self.participants:
                continue
            other = read_record(self.fed, key, "merged", site)
            if other.get("result") != result:
                raise FederationHalted(f"round {r}: the merge computed by {site} differs from {self.site}'s",
                                       "compare p2pfed versions of the two sites; no round after it is trusted")


class InputCheck:
    """Merge input checks against the base model (FFE: the merge of the previous round,
    which every contribution was trained from): the same tensors with the same shapes,
    and, with `max_update_norm`, an L2 distance to the base of at most that many times
    the base's norm. Fed each shard as the merge reads it. Each tensor's sum of squares
    is a float64 numpy sum, the total an exact math.fsum: every site reaches the same
    verdict, hence excludes the same contributions."""

    def __init__(self, base, bound: float | None):
        from .merge import canonical_layers

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
        from .shards import read_shard

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
