"""The merge step: turn a sealed round into this site's next model (docs/design.md 7.3).

Fetch and check every contribution the seal lists, exclude the unusable ones
deterministically (every site excludes the same), stream the merge, keep this site's
merged shards in its home, publish the hash of the whole result and compare it with
every other participant's, now and on later ticks until all have published.
Only numpy and safetensors are needed: no torch, no nnU-Net."""
from __future__ import annotations

import json
from pathlib import Path

from ... import crypto, layout
from ...errors import ContributionRejected, FederationHalted, SetupError
from ...faults import crash_point
from ...site import atomic_write
from .. import secure
from ..contribution import Contribution, InputCheck, merge_weights, read_contribution, read_shard_plain
from ..wait import Wait


def folder(t, r: int) -> Path:
    return t.home.work("merged", f"{r:05d}")


def _record(t, r: int) -> dict | None:
    done = folder(t, r) / "merged.json"
    return json.loads(done.read_text()) if done.exists() else None


def merged_model(t, r: int) -> str | None:
    """The hash of this site's merged model of round r (None if not merged yet)."""
    record = _record(t, r)
    return record["own"] if record else None


def merged_weights(t, r: int):
    """(weights, model hash) of this site's merge of round r, from its home."""
    from ...shards import from_shards

    record = _record(t, r)
    if record is None:
        raise SetupError(f"round {r} is not merged on this site yet", "run the tick again")
    blobs = [p.read_bytes() for p in sorted(folder(t, r).glob("*.safetensors"))]
    return from_shards(blobs, site=t.site), record["own"]


def next_unmerged(t, current: int) -> int | None:
    """The oldest sealed round (before `current`) that this site has not merged."""
    r = t.state.get("merged_upto", t.mode.first_round - 1) + 1
    while r < current and r <= t.s.rounds:
        if _record(t, r) is None or (r > 0 and t.site in t.view.participants_of(r)
                                     and t.view.record(layout.merged(r, t.site), "merged", t.site) is None):
            return r
        t.save(merged_upto=r)
        r += 1
    return None


def merge_round(t, r: int) -> str:
    """Merge sealed round r (unless an earlier tick did), publish the result, compare."""
    if _record(t, r) is None:
        _compute(t, r)
    if r == 0:
        return "adopted the initial model"
    record = _record(t, r)
    t.write.record(layout.merged(r, t.site), "merged", published(t, r, record))
    t.save(unconfirmed={**t.state.get("unconfirmed", {}), str(r): [t.site]})
    confirm(t)
    why = "; ".join(f"excluded {why}" for _, why in sorted(record["excluded"].items()))
    return f"merged round {r}" + (f" ({why})" if why else "")


def published(t, r: int, record: dict) -> dict:
    """The merge record's body: hashes and site names only. Why a contribution was
    excluded (norms, tensor names, shapes) goes into an envelope for the participants,
    referenced by its hash."""
    reasons = None
    if record["excluded"]:
        key = layout.merge_reasons(r, t.site)
        sha = t.write.envelope(key, "reasons", crypto.canonical_json(record["excluded"]), round=r)
        reasons = {"key": key, "sha256": sha}
    return {"round": r, "result": record["result"], "per_site": record["per_site"], "seal": record["seal"],
            "previous": record["previous"], "excluded": sorted(record["excluded"]), "reasons": reasons}


def _compute(t, r: int) -> None:
    seal = t.view.seal(r)
    if seal is None:
        raise SetupError(f"round {r} is not sealed yet", "run the tick again")
    if secure.enabled(t, r):
        return _compute_secure(t, r, seal)
    out = folder(t, r)
    previous = _record(t, r - 1) if r - 1 >= t.mode.first_round else None
    base = merged_weights(t, r - 1)[0] if t.mode.checks_against_base(r) else None
    check = InputCheck(base, t.s.max_update_norm)
    contributions, excluded = {}, {}
    for site in sorted(seal["contributions"]):
        try:
            expected = t.mode.expected_base(r, site, previous["per_site"] if previous else None)
            contributions[site] = read_contribution(t.view, t.me, r, site, seal["contributions"][site], expected)
        except ContributionRejected as exc:
            excluded[site] = exc.message

    def load(site: str, i: int) -> bytes:
        blob = read_shard_plain(t.view, t.me, r, site, contributions[site].commit.shards[i])
        check.add(site, i, blob)
        return blob

    while True:  # a contribution found unusable while streaming is excluded, and the merge rerun
        if not contributions:
            raise FederationHalted(f"round {r}: every contribution was rejected ({excluded})")
        target = t.mode.kept_model(t.site, contributions)
        for old in out.glob("*"):
            old.unlink()
        check.start()
        t.say(f"merging round {r} ({', '.join(sorted(contributions))})")
        # asym, missed round: every contributor's merged model is needed to adopt from
        merged_by_site: dict[str, list[bytes]] = {s: [] for s in contributions}
        sink = _keep(out, target) if target else lambda s, i, blob: merged_by_site[s].append(blob)
        try:
            hashes = _stream(t, contributions, load, sink=sink)
            check.finish(contributions)
            break
        except ContributionRejected as exc:  # every merge error names the site first
            site = next((s for s in contributions if exc.message.startswith(f"site {s!r}")), None)
            if site is None:
                raise
            excluded[site] = exc.message
            del contributions[site]
    per_site = {s: crypto.model_hash(h) for s, h in sorted(hashes.items())}
    if target is None:  # asym, missed round: adopt the shared layers into our own last model
        _adopt(t, out, merged_by_site)
        own = crypto.model_hash([crypto.sha256_hex(p.read_bytes()) for p in sorted(out.glob("*.safetensors"))])
    else:
        own = per_site[target]
    # the chain: the seal this merge read and the result it built on (round 1: none published)
    record = {"round": r, "result": crypto.hash_json(per_site), "per_site": per_site, "own": own,
              "excluded": excluded, "seal": t.view.seal_sha(r),
              "previous": _previous_result(t, r, previous)}
    atomic_write(out / "merged.json", json.dumps(record).encode())  # last: marks the merge complete
    t.view.chain.keep_merge(r, record["result"])


def _compute_secure(t, r: int, seal: dict) -> None:
    """Secure aggregation: unmask the sum (p2pfed/protocol/secure.py), check it, and take
    every tensor this site holds that was merged; the others stay as this site trained
    them (asym: shared by fewer than three sites)."""
    from ...merge import canonical_layers
    from ...shards import to_shards

    merged, _, contributors = secure.aggregate(t, r, seal)
    out = folder(t, r)
    previous = _record(t, r - 1) if r - 1 >= t.mode.first_round else None
    if t.mode.checks_against_base(r) and t.s.max_update_norm is not None:
        _check_aggregate(t, r, merged)
    own = {}
    for skey, layer in canonical_layers(_last_local_weights(t), t.site).items():
        value = merged.get((skey, tuple(layer.array.shape)), layer.array)
        own.update((name, value) for name in layer.names)
    for old in out.glob("*"):
        old.unlink()
    hashes = []
    for i, blob in enumerate(to_shards(own, site=t.site)):
        atomic_write(out / f"{i:05d}.safetensors", blob)
        hashes.append(crypto.sha256_hex(blob))
        crash_point("merge")
    mine = crypto.model_hash(hashes)
    # FFE: one model, every contributor's; asym: no site can know another's local layers
    per_site = {s: mine for s in contributors} if t.mode.plans_must_agree else {t.site: mine}
    record = {"round": r, "result": secure.result_hash(merged), "per_site": per_site, "own": mine, "excluded": {},
              "seal": t.view.seal_sha(r), "previous": _previous_result(t, r, previous)}
    atomic_write(out / "merged.json", json.dumps(record).encode())  # last: marks the merge complete
    t.view.chain.keep_merge(r, record["result"])


def _check_aggregate(t, r: int, merged: dict) -> None:
    """No one can check another site's update any more: every site checks the sum."""
    from ...merge import Layer

    base = merged_weights(t, r - 1)[0]
    dist, norm = secure.update_norm({k: Layer((k,), a) for (k, _), a in merged.items()}, base)
    if not dist <= t.s.max_update_norm * norm:
        raise FederationHalted(f"round {r}: the securely aggregated update has norm {dist:.6g}, over max_update_norm "
                               f"{t.s.max_update_norm:g} x the base's {norm:.6g}",
                               "a contributor sent an update it did not check; secure aggregation hides which")


def _previous_result(t, r: int, previous: dict | None) -> str | None:
    """The merge result round r builds on (round 1: none). A site admitted at round r did
    not merge round r-1: it takes the result every participant of r-1 published."""
    if r - 1 < 1:
        return None
    if previous is not None:
        return previous["result"]
    results = {body.get("result") for body in t.view.merge_records(r - 1).values()}
    if not results:
        raise Wait("round", f"round {r - 1}: waiting for the participants' merge records", t.view.participants_of(r - 1),
                   rnd=r)
    if len(results) > 1:
        raise FederationHalted(f"round {r - 1}: the participants' merge results differ; site {t.site!r} cannot "
                               f"join the chain at round {r}", "a person must look: `p2pfed verify`")
    return results.pop()


def _keep(out: Path, target: str | None):
    def sink(site: str, i: int, blob: bytes) -> None:
        if site == target:
            atomic_write(out / f"{i:05d}.safetensors", blob)
            crash_point("merge")
    return sink


def _stream(t, contributions: dict[str, Contribution], load, sink=None) -> dict[str, list[str]]:
    from ...shards import stream_merge

    weights = merge_weights(t.s, {s: c.cases for s, c in contributions.items()})
    counts = {s: len(c.commit.shards) for s, c in contributions.items()}
    return stream_merge(load, counts, weights=weights, layers=t.s.layers, sink=sink)


CHAINED = ("seal", "result", "previous")  # what every participant's merge record must agree on


def confirm(t) -> None:
    """Compare this site's merge results with the other participants' records that
    appeared since the last tick; halt on any difference. A round leaves the list once
    every participant's record has been checked."""
    pending = t.state.get("unconfirmed", {})
    if not pending:
        return
    for rs, checked in sorted(pending.items()):
        r, ours = int(rs), _record(t, int(rs))
        for site in t.view.participants_of(r):
            if site in checked or not t.view.has(layout.merged(r, site)):
                continue
            other = t.view.record(layout.merged(r, site), "merged", site)
            if other is None:  # only junk there: reported, and looked at again on a later tick
                continue
            differs = [f"{k} {str(other.get(k))[:16]} != {str(ours.get(k))[:16]}" for k in CHAINED
                       if other.get(k) != ours.get(k)]
            if differs:
                raise FederationHalted(f"round {r}: the merge computed by {site} differs from {t.site}'s "
                                       f"({', '.join(differs)})",
                                       "compare p2pfed versions of the two sites and the seal each merged; "
                                       "no round after it is trusted")
            checked = [*checked, site]
        pending = {**pending, rs: checked}
        if set(checked) >= set(t.view.participants_of(r)):
            del pending[rs]
    if pending != t.state.get("unconfirmed"):
        t.save(unconfirmed=pending)


def recheck_head(t) -> None:
    """Every tick, also after the federation finished: the latest seal this site adopted
    is still in the storage byte for byte, and merge records that appeared since agree
    (a constant number of requests, not one per round)."""
    t.view.recheck_head()
    confirm(t)


def _adopt(t, out: Path, merged_by_site: dict[str, list[bytes]]) -> None:
    """Asym catch-up: our last local model, with every layer that a contributor shares
    (same structural key and shape) taken from that contributor's merged model."""
    from ...merge import canonical_layers
    from ...shards import from_shards, to_shards

    own = _last_local_weights(t)
    shared = {}
    for s in sorted(merged_by_site):
        for skey, layer in canonical_layers(from_shards(merged_by_site[s], site=s), s).items():
            shared.setdefault(skey, layer.array)
    result = dict(own)
    for skey, layer in canonical_layers(own, t.site).items():
        if skey in shared and shared[skey].shape == layer.array.shape:
            for name in layer.names:
                result[name] = shared[skey]
    for i, blob in enumerate(to_shards(result, site=t.site)):
        atomic_write(out / f"{i:05d}.safetensors", blob)


def _last_local_weights(t):
    from ...shards import from_shards

    rounds = sorted(t.home.work("rounds").glob("*/meta.json"))
    if not rounds:
        return t.trainer.initial_weights()
    return from_shards([p.read_bytes() for p in sorted(rounds[-1].parent.glob("*.safetensors"))], site=t.site)
