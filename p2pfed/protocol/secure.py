"""Secure aggregation as the round's strategy (docs/design.md 7.8): members learn only
the sum of the contributions. The arithmetic is p2pfed/secagg.py, the primitives
p2pfed/crypto.py; this module maps the protocol onto ticks and the storage:

1. keys:   every participant publishes its key material of round r (a mask public key,
           a commitment to its self-mask seed, its tensor layout, and for every
           participant a Shamir share of both secrets, HPKE-sealed to that holder);
2. key seal: once all did, or enough after the deadline, `rounds/<r>/KEYS.json` fixes
           who masks with whom (U1), create-only;
3. masked upload: fixed point, masked; commit as before (the seal fixes U2, the contributors);
4. reveal: once sealed, each U1 site reveals, per dealer, the share of the seed (if the
           dealer contributed) or of the mask key (if it dropped out): never both;
5. unmask: any `threshold` valid shares reconstruct each secret (checked against its
           commitment); every site sums, unmasks and converts: the same bits everywhere.
"""
from __future__ import annotations

import json
import math
import time
from fractions import Fraction

import numpy as np

from .. import crypto, layout, secagg
from ..errors import ContributionRejected, FederationHalted, SetupError
from ..faults import crash_point
from ..merge import Layer, canonical_layers
from ..objects import read_json
from ..site import atomic_write
from . import sharded
from .contribution import declared_cases, read_contribution, read_shard_plain, weight_shares, write_commit
from .wait import Wait


def enabled(t, r: int) -> bool:
    """Round r is aggregated securely (round 0, the shared initial model, is one site's)."""
    return t.s.secure_aggregation and r >= 1


def _ctx(t, r: int, *sites: str) -> bytes:
    return secagg.context(t.fed.id, t.fed.epoch_at(r).sha256, r, *sites)


def _pair_ctx(t, r: int, a: str, b: str) -> bytes:
    return _ctx(t, r, *sorted((a, b)))


# --------------------------------------------------------------------------- 1. keys
def _secrets(t, r: int) -> dict | None:
    f = t.home.work("secure") / f"{r:05d}.json"
    return json.loads(f.read_text()) if f.exists() else None


def publish_keys(t, r: int, weights_layout) -> str:
    """Publish this site's key material of round r (made once and kept in the site home
    first: a tick killed after the write re-publishes the very same bytes). `weights_layout()`
    gives the layout of the model this site trains from."""
    key, parts = layout.secagg_keys(r, t.site), t.view.participants_of(r)
    if len(parts) < secagg.MIN_GROUP:  # a sum of two tells each the other's update
        raise Wait("round", f"round {r}: secure aggregation needs at least {secagg.MIN_GROUP} participants, round {r} "
                            f"has {len(parts)} ({', '.join(parts)}); admit another site to go on", [], rnd=r)
    if t.state.get("keys_published") == r and t.view.has(key):
        return ""
    kept = _secrets(t, r) or _make_secrets(t, r, weights_layout())
    t.write.envelope(key, "keys", crypto.canonical_json(kept["payload"]), round=r)
    t.save(keys_published=r)
    return f"published round {r} key material (secure aggregation)"


def _make_secrets(t, r: int, weights_layout: list) -> dict:
    parts, members = t.view.participants_of(r), t.fed.members_at(r)
    private, public = crypto.mask_keypair()
    seed, noise = crypto.random_seed(), crypto.random_seed() + crypto.random_seed()
    need = secagg.threshold(len(parts))
    mask_shares, seed_shares = crypto.split_secret(private, need, len(parts)), crypto.split_secret(seed, need, len(parts))
    shares = {}
    for i, holder in enumerate(parts):
        c = _ctx(t, r, t.site, holder)
        shares[holder] = {"sealed": crypto.encrypt_share(mask_shares[i] + seed_shares[i], members[holder], c),
                          "mask": crypto.commitment(c, b"mask", mask_shares[i]),
                          "seed": crypto.commitment(c, b"seed", seed_shares[i])}
    # FFE: every site trains the base model, whose layout every site has; asym: its own
    listed = None if t.mode.plans_must_agree else weights_layout
    payload = {"round": r, "mask_public": crypto.b64(public), "layout": listed, "shares": shares,
               "seed_commitment": crypto.commitment(_ctx(t, r, t.site), b"seed", seed)}
    kept = {"mask_private": crypto.b64(private), "seed": crypto.b64(seed), "noise": crypto.b64(noise),
            "payload": payload}
    atomic_write(t.home.work("secure") / f"{r:05d}.json", json.dumps(kept).encode(), mode=0o600)
    return kept


def layout_of(weights) -> list:
    """[[structural key, shape], ...] of a model, in key order: what a site masks."""
    return [[skey, list(layer.array.shape)] for skey, layer in sorted(canonical_layers(weights, "this site").items())]


class Keys:
    """A participant's key material of round r, read and checked."""

    def __init__(self, site: str, payload: dict, parts: list[str], shared_layout: list | None):
        """`shared_layout`: FFE, the base model's layout (key material lists none); None:
        asym, where each site lists its own."""
        where = f"site {site!r}: round {payload.get('round')} key material"
        self.site = site
        if sorted(payload["shares"]) != parts:
            raise ContributionRejected(f"{where} deals shares to {sorted(payload['shares'])}, not to the participants")
        if (payload["layout"] is None) != (shared_layout is not None):
            raise ContributionRejected(f"{where} " + ("lists a tensor layout (FFE: every site masks the base model)"
                                                      if shared_layout is not None else "lacks its tensor layout"))
        listed = shared_layout if shared_layout is not None else payload["layout"]
        try:
            self.public = crypto.unb64(payload["mask_public"], where)
            self.layout = {str(k): tuple(int(n) for n in shape) for k, shape in listed}
        except (TypeError, ValueError) as exc:
            raise ContributionRejected(f"{where} is malformed ({exc})") from None
        if len(self.public) != 32 or len(self.layout) != len(listed) \
                or any(n < 0 for shape in self.layout.values() for n in shape):
            raise ContributionRejected(f"{where} has a malformed key or layout")
        self.shares, self.seed_commitment = payload["shares"], payload["seed_commitment"]


def read_keys(t, r: int, site: str, sha: str | None = None) -> Keys | None:
    """`site`'s verified key material of round r (the bytes `sha` names, if given), or None."""
    payload = _payload(t, r, site, sha)
    return None if payload is None else Keys(site, payload, t.view.participants_of(r), _unchecked_layout(t))


def _payload(t, r: int, site: str, sha: str | None) -> dict | None:
    key = layout.secagg_keys(r, site)
    found = t.view.resolve(key, "keys", site) if sha is None else None
    blob = found[1] if found else (t.view.find(key, sha, layout.key_seal(r)) if sha else None)
    if blob is None:
        return None
    payload = read_json(t.fed, key, "keys", t.me, author=site, blob=blob, round=r)[1]
    if payload["round"] != r:
        raise ContributionRejected(f"site {site!r}: key material at {key} is for round {payload['round']}")
    Keys(site, payload, t.view.participants_of(r), _unchecked_layout(t))  # raises if malformed
    return payload


def _unchecked_layout(t) -> list | None:
    """For checking key material's form only: FFE's shared layout is not needed for that."""
    return [] if t.mode.plans_must_agree else None


# --------------------------------------------------------------------------- 2. key seal
def key_seal(t, r: int) -> dict:
    """The verified key seal of round r, claimed here once due; else Wait."""
    v = t.view
    found = v.key_seal(r)
    if found is not None:
        return found[1]
    parts, opened, now = v.participants_of(r), v.opened_at(r), int(time.time())
    deadline, need = opened + t.s.deadline_s, secagg.minimum(len(parts), v.quorum_of(r))
    have, bad = {}, []
    listed = [s for s in parts if v.has(layout.secagg_keys(r, s))]
    due = len(listed) == len(parts) or (len(listed) >= need and now >= deadline)
    for s in listed if due else ():  # read only once a key seal may be due: waiting reads nothing
        try:
            if read_keys(t, r, s) is not None:
                have[s] = crypto.sha256_hex(v.resolve(layout.secagg_keys(r, s), "keys", s)[1])
        except ContributionRejected as exc:
            bad.append(exc.message)
    if due and (len(have) == len(parts) or (len(have) >= need and now >= deadline)):
        body = {"round": r, "keys": have, "reason": "all" if len(have) == len(parts) else "deadline",
                "opened_at": opened, "sealed_at": now}
        t.write.claim(layout.key_seal(r), "keyseal", body)
        v.forget_key_seal(r)
        return v.key_seal(r)[1]
    missing = [s for s in parts if s not in (have if due else listed)]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(deadline))
    raise Wait("round", f"round {r}/{t.s.rounds}: waiting for the key material of {', '.join(missing + bad)} "
                        f"(secure aggregation: {need} may go on after {when})", missing, deadline, rnd=r)


def _u1(t, r: int) -> dict[str, Keys]:
    """The key material the key seal of round r lists, verified once and then kept in the
    site home (pinned by the key seal's hash): a waiting tick reads none of it again."""
    sha, ks = t.view.key_seal(r)
    kept = t.home.work("secure") / f"{r:05d}.u1.json"
    parts = t.view.participants_of(r)
    if kept.exists() and (cached := json.loads(kept.read_text()))["key_seal"] == sha:
        return {s: Keys(s, payload, parts, cached["layout"]) for s, payload in cached["keys"].items()}
    from .phases.rounds import start_weights  # (rounds calls this module)

    shared = layout_of(start_weights(t, r)) if t.mode.plans_must_agree else None
    payloads = {}
    for s, key_sha in sorted(ks["keys"].items()):
        try:
            payloads[s] = _payload(t, r, s, key_sha)
        except ContributionRejected as exc:  # sealed by someone, though malformed: no one can mask with it
            raise FederationHalted(f"round {r}: the key seal lists unusable key material ({exc.message})") from None
    atomic_write(kept, json.dumps({"key_seal": sha, "keys": payloads, "layout": shared}).encode())
    return {s: Keys(s, payload, parts, shared) for s, payload in payloads.items()}


def _shares(t, r: int, keys: dict[str, Keys]) -> dict[str, float]:
    """Each U1 site's share of the weight, w_i / W over U1 (secagg.encode multiplies by it)."""
    w = weight_shares(t.s, {s: declared_cases(t.state, s) for s in keys})
    total = sum(w.values())
    return {s: float(w[s] / total) for s in keys}


def _weights(t, keys) -> dict[str, Fraction]:
    return weight_shares(t.s, {s: declared_cases(t.state, s) for s in keys})


# --------------------------------------------------------------------------- 3. masked upload
def upload(t, r: int, weights, meta: dict, base: str | None, base_weights) -> str | None:
    """Mask this site's model and upload it: shards of masked words (sharded rounds: one
    per slice), meta, then the commit. Returns why it does not (None: uploaded)."""
    keys = _u1(t, r) if t.site in key_seal(t, r)["keys"] else None
    if keys is None:
        return f"round {r}'s key material was sealed without this site; it takes part again next round"
    secure = secagg.groups({s: k.layout for s, k in keys.items()}, t.s.layers)
    own = canonical_layers(weights, t.site)
    if {k: tuple(v.array.shape) for k, v in own.items()} != keys[t.site].layout:
        raise SetupError(f"round {r}: this site's trained model does not have the layout it published",
                         "the local training changed the network; restore the plan and retrain")
    if t.s.max_update_norm is not None and base_weights is not None:
        _check_own_update(r, own, base_weights, t.s.max_update_norm)
    if t.s.dp:
        own = _clip_update(own, base_weights, t.s.dp_clip)
    mask = _Mask(t, r, keys)
    if sharded.on(t, keys):
        blobs = sharded.masked_shards(secure, len(keys), own, t.site, mask)
    else:
        from ..shards import MASKED_MAX_BYTES, layer_shards

        items = [(skey, Layer(layer.names, mask.words(skey, layer.array, 0, layer.array.size)
                              .reshape(layer.array.shape)))
                 for skey, layer in sorted(own.items()) if (skey, layer.array.shape) in secure]
        blobs = layer_shards(items, MASKED_MAX_BYTES)  # a tensor in no secure group stays local
    if mask.clipped:
        t.say(f"round {r}: {mask.clipped} value(s) outside +-{secagg.CLIP:g} were clipped before masking")
    refs = []
    for i, blob in enumerate(blobs):
        key = layout.masked(r, t.site, crypto.sha256_hex(blob))
        refs.append({"key": key, "sha256": t.write.envelope(key, "masked", blob, round=r)})
        crash_point("upload")
        if t.progress:
            t.progress("upload", i + 1, len(blobs))
    write_commit(t, r, {**meta, "clipped": mask.clipped}, refs, base)
    return None


class _Mask:
    """What this site adds to its fixed-point words of round r: its self mask, the
    pairwise masks with the other members of each tensor's secure group, and with DP
    its noise. Every stream is seekable: any range of a tensor is masked on its own."""

    def __init__(self, t, r: int, keys: dict):
        kept = _secrets(t, r)
        private = crypto.unb64(kept["mask_private"], "secrets")
        self.site, self.clipped = t.site, 0
        self.share = _shares(t, r, keys)[t.site]
        self.secure = secagg.groups({s: k.layout for s, k in keys.items()}, t.s.layers)
        self.pair = {p: crypto.pair_mask_key(private, keys[p].public, _pair_ctx(t, r, t.site, p))
                     for p in keys if p != t.site}
        self.self_key = crypto.self_mask_key(crypto.unb64(kept["seed"], "secrets"), _ctx(t, r, t.site))
        self.noise = (crypto.unb64(kept["noise"], "secrets"), _noise_units(t, len(keys))) if t.s.dp else None

    def words(self, skey: str, array: np.ndarray, start: int, end: int) -> np.ndarray:
        """Masked words of elements start..end of `array` (flattened)."""
        shape = tuple(array.shape)
        words, c = secagg.encode(array.ravel()[start:end], self.share)
        self.clipped += c
        lab = secagg.label(skey, shape)
        if self.noise is not None:
            np.add(words, secagg.noise(self.noise[0], lab, words.size, self.noise[1], start).view(np.uint64),
                   out=words)
        group = self.secure[(skey, shape)]
        masker = secagg.Masker(secagg.mask_keys(self.site, {p: self.pair[p] for p in group if p != self.site},
                                                self.self_key))
        return masker.apply(words, lab, start)


def update_norm(layers: dict, base_weights) -> tuple[float, float]:
    """(L2 distance of `layers` to the base, the base's norm), exact sums (math.fsum)."""
    base = canonical_layers(base_weights, "the base model")
    dist = math.fsum(float(np.square(layer.array.astype(np.float64) - base[k].array).sum()) for k, layer in layers.items())
    norm = math.fsum(float(np.square(b.array.astype(np.float64)).sum()) for b in base.values())
    return math.sqrt(dist), math.sqrt(norm)


def _check_own_update(r: int, own: dict, base_weights, bound: float) -> None:
    """No one else can see this update: check it here, before masking (finite: to_shards did)."""
    dist, norm = update_norm(own, base_weights)
    if not dist <= bound * norm:
        raise Wait("round", f"round {r}: this site's update norm {dist:.6g} exceeds max_update_norm {bound:g} x the "
                            f"base model's norm {norm:.6g}; it does not contribute to this round", [], rnd=r)


def _clip_update(own: dict, base_weights, bound: float) -> dict:
    """DP: the update (weights minus the base) scaled to L2 norm at most `bound`."""
    base = canonical_layers(base_weights, "the base model")
    deltas = {k: layer.array.astype(np.float64) - base[k].array for k, layer in own.items()}
    norm = math.sqrt(math.fsum(float(np.square(d).sum()) for d in deltas.values()))
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return {k: Layer(layer.names, (base[k].array + deltas[k] * scale).astype(np.float32))
            for k, layer in own.items()}


def _noise_units(t, n: int) -> float:
    """Each of n sites' noise std, in fixed-point units of the sum of shares (uniform: 1/n):
    the n shares add up to noise_multiplier x dp_clip / n, the sensitivity of that sum."""
    return t.s.dp_noise_multiplier * t.s.dp_clip / n / math.sqrt(n) * secagg.SCALE


# --------------------------------------------------------------------------- 4. the seal's terms
def seal_terms(t, r: int) -> tuple[list[str], int, dict]:
    """(who may contribute: the key-sealed sites, the fewest contributions, extra seal fields)."""
    found = t.view.key_seal(r)
    if found is None:
        key_seal(t, r)
        found = t.view.key_seal(r)
    sha, body = found
    return sorted(body["keys"]), secagg.minimum(len(t.view.participants_of(r)), t.view.quorum_of(r)), {"keys": sha}


def unsealable(t, r: int, contributors) -> str | None:
    """Why these contributors cannot be sealed together: a secure group they would leave
    with one or two contributors (whose values the sum would reveal), or None."""
    keys = _u1(t, r)
    bad = secagg.group_sizes_ok(secagg.groups({s: k.layout for s, k in keys.items()}, t.s.layers), contributors)
    if bad is None:
        return None
    return f"tensor {bad[0]!r} would be merged by fewer than {secagg.MIN_GROUP} of the sites that share it"


# --------------------------------------------------------------------------- 5. reveal and unmask
def _kind_for(dealer: str, contributors) -> str:
    return "seed" if dealer in contributors else "mask"


def reveal(t, r: int, keys: dict[str, Keys], contributors) -> str:
    """Publish this site's reveal for sealed round r: per dealer, one kind of share only."""
    key = layout.reveal(r, t.site)
    if t.site not in keys or t.state.get("revealed") == r:
        return ""
    out = {}
    for dealer, k in sorted(keys.items()):
        c = _ctx(t, r, dealer, t.site)
        plain = crypto.decrypt_share(k.shares[t.site]["sealed"], t.me, c)
        mask, seed = (plain[:32], plain[32:]) if plain is not None and len(plain) == 48 else (b"", b"")
        if crypto.commitment(c, b"mask", mask) != k.shares[t.site]["mask"] \
                or crypto.commitment(c, b"seed", seed) != k.shares[t.site]["seed"]:
            raise FederationHalted(f"round {r}: the share {dealer} dealt to {t.site} does not match {dealer}'s "
                                   "signed commitment", "a person must decide whether the dealer cheated")
        kind = _kind_for(dealer, contributors)
        out[dealer] = {"kind": kind, "share": crypto.b64(mask if kind == "mask" else seed)}
    body = {"round": r, "seal": t.view.seal_sha(r), "shares": out}
    t.write.envelope(key, "reveal", crypto.canonical_json(body), round=r)
    t.save(revealed=r)
    return f"revealed round {r}'s unmasking shares"


def recover(t, r: int, keys: dict[str, Keys], contributors) -> dict[str, bytes]:
    """dealer -> its reconstructed seed (contributors) or mask private key (dropped), each
    from `threshold` shares that match their dealer's commitments; else Wait."""
    parts = t.view.participants_of(r)
    need, got = secagg.threshold(len(parts)), {d: {} for d in keys}
    listed = [s for s in sorted(keys) if t.view.has(layout.reveal(r, s))]
    if len(listed) < need:  # too few to reconstruct anything: read none of them
        waiting = [s for s in sorted(keys) if s not in listed]
        raise Wait("round", f"round {r}: unmasking needs {need} reveals, has {len(listed)}: "
                            f"waiting for {', '.join(waiting)}", waiting, rnd=r)
    for holder in listed:
        body = _read_reveal(t, r, holder)
        if body is None:
            continue
        for dealer, k in keys.items():
            entry, want = body["shares"].get(dealer), _kind_for(dealer, contributors)
            c = _ctx(t, r, dealer, holder)
            if entry is None:
                continue  # a share it could not open: the dealer's fault, which it reported itself
            if entry["kind"] != want:  # with both kinds of one site, anyone could unmask its upload
                raise FederationHalted(f"round {r}: {holder} revealed the {entry['kind']} share of {dealer}, "
                                       f"where only its {want} share may be revealed",
                                       f"{holder} cheated or its node is broken; a person must look")
            share = crypto.unb64(entry["share"], layout.reveal(r, holder))
            if crypto.commitment(c, want.encode(), share) != k.shares[holder][want]:
                raise FederationHalted(f"round {r}: {holder} revealed a wrong share of {dealer}'s {want} "
                                       f"(it does not match {dealer}'s signed commitment)",
                                       f"{holder} cheated or its node is broken; a person must look")
            got[dealer][parts.index(holder) + 1] = share
    short = [d for d in sorted(got) if len(got[d]) < need]
    if short:
        waiting = [s for s in sorted(keys) if not t.view.has(layout.reveal(r, s))]
        raise Wait("round", f"round {r}: unmasking needs {need} reveals, has {min(len(got[d]) for d in got)}: "
                            f"waiting for {', '.join(waiting)}", waiting, rnd=r)
    return {d: _checked(t, r, keys[d], dict(sorted(got[d].items())[:need]), _kind_for(d, contributors))
            for d in sorted(got)}


def _read_reveal(t, r: int, holder: str) -> dict | None:
    key = layout.reveal(r, holder)
    if not t.view.has(key):
        return None
    found = t.view.resolve(key, "reveal", holder)
    if found is None:
        return None
    body = read_json(t.fed, key, "reveal", t.me, author=holder, blob=found[1], round=r)[1]
    if body["round"] != r or body["seal"] != t.view.seal_sha(r):
        raise FederationHalted(f"round {r}: {holder} revealed shares for another seal of the round",
                               "the storage shows sites different seals (a fork); alert the members")
    return body


def _checked(t, r: int, k: Keys, shares: dict[int, bytes], kind: str) -> bytes:
    secret = crypto.combine_secret(shares)
    ok = crypto.mask_public(secret) == k.public if kind == "mask" else \
        crypto.commitment(_ctx(t, r, k.site), b"seed", secret) == k.seed_commitment
    if not ok:
        raise FederationHalted(f"round {r}: the shares {k.site} dealt do not reconstruct the {kind} it committed to",
                               f"{k.site} cheated or its node is broken; a person must look")
    return secret


def aggregate(t, r: int, seal: dict) -> tuple[dict[tuple, np.ndarray], dict[str, Keys], list[str]]:
    """Sealed round r, unmasked: (secure tensor (key, shape) -> float32 mean, U1, contributors).
    A sharded round sums slices of it here and reads the others' slices (p2pfed/protocol/sharded.py)."""
    keys, contributors = _u1(t, r), sorted(seal["contributions"])
    secure = secagg.groups({s: k.layout for s, k in keys.items()}, t.s.layers)
    bad = secagg.group_sizes_ok(secure, contributors)
    if bad is not None:
        raise FederationHalted(f"round {r}: sealed by {seal['author']} with tensor {bad[0]!r} merged by fewer than "
                               f"{secagg.MIN_GROUP} sites", "nothing is revealed for this round; a person must look")
    did = reveal(t, r, keys, contributors)
    if did:
        t.say(did)
    unmask = Unmasker(t, r, keys, contributors, secure)
    if sharded.on(t, keys):
        return sharded.aggregate(t, r, seal, secure, unmask), keys, contributors
    unmask.ready()  # the reveals first: waiting for them downloads nothing
    sums = masked_sums(t, r, seal, contributors, lambda site, commit: (
        commit.shards, {k for k, g in secure.items() if site in g}))
    out = {}
    for k in unmask.factors:
        out[k] = unmask(k, sums[k], 0).reshape(k[1])
        out[k].flags.writeable = False
    return out, keys, contributors


def masked_sums(t, r: int, seal: dict, contributors: list[str], expect) -> dict:
    """The sum modulo 2^64 of the contributors' masked words, per entry (a secure tensor,
    or in a sharded round a tensor's piece of a slice). `expect(site, commit)` gives the
    shard refs to read and the set of (entry name, shape) they must hold, exactly."""
    from ..shards import read_shard

    sums: dict = {}
    for site in contributors:
        try:
            c = read_contribution(t.view, t.me, r, site, seal["contributions"][site], None, kind="masked")
            refs, want = expect(site, c.commit)
            seen = set()
            for i, ref in enumerate(refs):
                blob = read_shard_plain(t.view, t.me, r, site, ref, kind="masked")
                for name, layer in read_shard(blob, f"site {site!r} masked shard {i}", "U64"):
                    k = (name, tuple(layer.array.shape))
                    if k not in want or k in seen:
                        raise ContributionRejected(f"site {site!r}: masked entry {name!r} is not one it must send")
                    seen.add(k)
                    acc = sums.setdefault(k, np.zeros(layer.array.size, dtype=np.uint64))
                    np.add(acc, layer.array.ravel(), out=acc)
            if len(seen) != len(want):
                raise ContributionRejected(f"site {site!r}: lacks {len(want) - len(seen)} masked tensor(s)")
        except ContributionRejected as exc:  # sealed: excluding it now would need both its secrets
            raise FederationHalted(f"round {r}: {exc.message}", "the named site must fix its node; "
                                   "a sealed secure round cannot leave anyone out") from None
    return sums


class Unmasker:
    """Turns summed masked words of a secure tensor back into its float32 mean: removes the
    contributors' self masks and the pairwise masks between contributors and dropped sites,
    then decodes. The secrets are reconstructed on first use (which may wait for reveals)."""

    def __init__(self, t, r: int, keys: dict, contributors: list[str], secure: dict):
        self.t, self.r, self.keys, self.contributors, self.secure = t, r, keys, contributors, secure
        w = _weights(t, keys)
        total = sum(w.values())
        self.factors = {k: float(total / sum(w[s] for s in g if s in contributors))
                        for k, g in secure.items() if any(s in contributors for s in g)}
        self._secrets = None

    def ready(self) -> None:
        """Reconstruct the secrets now (Wait while too few reveals are in)."""
        if self._secrets is None:
            self._secrets = recover(self.t, self.r, self.keys, self.contributors)

    def __call__(self, k: tuple, total: np.ndarray, start: int) -> np.ndarray:
        t, r = self.t, self.r
        self.ready()
        group = self.secure[k]
        members = [s for s in group if s in self.contributors]
        remove = [(crypto.self_mask_key(self._secrets[s], _ctx(t, r, s)), 1) for s in members]
        for d in (s for s in group if s not in members):  # dropped: the masks its peers added with it
            remove += [(crypto.pair_mask_key(self._secrets[d], self.keys[i].public, _pair_ctx(t, r, i, d)),
                        secagg.sign(i, d)) for i in members]
        words = secagg.Masker(remove).apply(total, secagg.label(*k), start, direction=-1)
        return secagg.decode(words, self.factors[k]).astype(np.float32)


def result_hash(merged: dict[tuple, np.ndarray]) -> str:
    """What every participant's merge record compares: the hash of the unmasked sum."""
    return crypto.hash_json([[skey, list(shape), crypto.sha256_hex(a.tobytes())] for (skey, shape), a in merged.items()])
