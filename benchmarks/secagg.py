"""Cost of secure aggregation for one site and one round, against the plain protocol;
prints figures (no assertions on timings).

It mirrors what p2pfed/protocol/secure.py makes a site compute, with the real
primitives (p2pfed/secagg.py, p2pfed/crypto.py), for model sizes in millions of float32
parameters (default 31 and 102: nnU-Net's PlainConvUNet and ResEnc-M) and numbers of
sites N (default 3, 5, 10, 20). The model is a U-Net-like list of ~100-200 tensors of
varied sizes (3x3x3 convolutions of 32..320 features, biases, norm scales, transposed
convolutions, segmentation heads; deeper encoder stages get more convolutions for the
larger size, and one 1-D tensor takes up the remainder), random normal values x 0.05.
Site i's model is site 0's rolled by a per-site offset and scaled by (1 + 0.01 i),
made tensor by tensor on the fly: no N full models are ever held.

Per (size, N), with merge weights (case counts) 10 + 3 i:

- bytes per site per round, from real crypto.seal calls (envelopes to the N
  participants) on one site's shards (all sites have the same layout):
  plain upload = the envelopes of its float32 shards (shards.to_shards); plain download
  = N x that (every site downloads all N contributions); secure upload = the envelopes
  of its masked uint64 shards (shards.layer_shards) + its key material + its reveal;
  secure download = N x each of the three. Meta and commit records, the same in both
  protocols, are left out.
- CPU seconds per site (time.process_time), on the full model size:
  mask     encode + its self mask + the pairwise masks with its N-1 peers (with the
           X25519/HKDF key derivations);
  unmask   the sum of N masked vectors (site 0's upload added N times: the cost of a
           uint64 add does not depend on the values) + removing the N self masks
           (HKDF of the reconstructed seeds) + decode;
  recover  one dropout: Shamir combine of the N secrets (N-1 seeds, the dropped
           site's mask key) from `threshold` shares, checked against the public key and
           the commitments, + removing the N-1 pairwise masks between the dropped site
           and each survivor;
  keys     the key material (_make_secrets): key pair, seed, Shamir split of both
           secrets, HPKE sealing of the shares to the N holders, commitments;
  reveal   decrypting and checking the N shares this site holds (not in the targets);
  plain    the plain merge: merge.weighted_mean (float64) of the N models.
- correctness: a full simulation of the round (every site masks with its own keys and
  its peers', the uploads are summed, secrets reconstructed from decrypted shares, masks
  removed), once with all N contributing and once with the last site dropping out after
  the key seal, on the first tensors (structural-key order) until at least
  --verify-mparams million parameters are covered (0: the whole model);
  `rel_err` is max |secure - ref| / max |ref| (worst of both cases), ref the float64
  weighted mean; it must be below 1e-9 (the script exits 1 otherwise).

Usage: .venv/bin/python benchmarks/secagg.py [--sizes 31,102] [--sites 3,5,10,20]
       [--quick] [--verify-mparams 4] [--json PATH]
--quick: tiny sizes (0.2, 0.5 M) and 3, 5 sites, a smoke run of a few seconds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from p2pfed import crypto, layout, secagg  # noqa: E402
from p2pfed.merge import Layer, canonical_layers, weighted_mean  # noqa: E402
from p2pfed.shards import MASKED_MAX_BYTES, layer_shards, to_shards  # noqa: E402

FEDERATION, EPOCH, ROUND = "bench", "0" * 64, 1
FEATURES = [32, 64, 128, 256, 320, 320]


# --------------------------------------------------------------------------- the model
def _conv(name: str, c_out: int, c_in: int, k: tuple) -> list[tuple[str, tuple]]:
    return [(f"{name}.conv.weight", (c_out, c_in, *k)), (f"{name}.conv.bias", (c_out,)),
            (f"{name}.norm.weight", (c_out,)), (f"{name}.norm.bias", (c_out,))]


def _unet(features: list[int], convs: list[int]) -> list[tuple[str, tuple]]:
    out, c_in = [], 1
    for s, (f, n) in enumerate(zip(features, convs)):
        for j in range(n):
            out += _conv(f"encoder.stages.{s}.convs.{j}", f, c_in, (3, 3, 3))
            c_in = f
    for i in range(len(features) - 1):
        s = len(features) - 2 - i
        out += [(f"decoder.transpconvs.{i}.weight", (features[s + 1], features[s], 2, 2, 2)),
                (f"decoder.transpconvs.{i}.bias", (features[s],))]
        out += _conv(f"decoder.stages.{i}.convs.0", features[s], 2 * features[s], (3, 3, 3))
        out += _conv(f"decoder.stages.{i}.convs.1", features[s], features[s], (3, 3, 3))
        out += [(f"decoder.seg_layers.{i}.weight", (2, features[s], 1, 1, 1)), (f"decoder.seg_layers.{i}.bias", (2,))]
    return out


def _count(shapes) -> int:
    return sum(math.prod(s) for _, s in shapes)


def model_shapes(params: int) -> list[tuple[str, tuple]]:
    """(name, shape) of a U-Net-like network of exactly `params` parameters."""
    scale = 1.0
    while True:
        feats = [max(1, round(f * scale)) for f in FEATURES]
        convs = [2] * len(FEATURES)
        if _count(_unet(feats, convs)) <= params or feats == [1] * len(FEATURES):
            break
        scale *= 0.97
    order = [5, 4, 3, 5, 4, 3, 2]  # deeper stages first, as ResEnc grows
    while True:
        added = False
        for s in order:
            more = list(convs)
            more[s] += 1
            if _count(_unet(feats, more)) <= params:
                convs, added = more, True
        if not added:
            break
    shapes = _unet(feats, convs)
    rest = params - _count(shapes)
    if rest > 0:
        shapes.append(("encoder.remainder.scale", (rest,)))
    return shapes


class Model:
    """Site 0's tensors (random normal x 0.05, float32); site i's are derived on the fly."""

    def __init__(self, params: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.shapes = model_shapes(params)
        self.base = {name: (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.05))
                     for name, shape in self.shapes}
        self.params = _count(self.shapes)

    def tensor(self, name: str, site: int) -> np.ndarray:
        b = self.base[name]
        if site == 0:
            return b
        shift = (7919 * site + 13 * site * site) % b.size
        return (np.roll(b.ravel(), shift) * np.float32(1 + 0.01 * site)).reshape(b.shape)

    def skeys(self) -> dict[str, str]:
        """name -> structural key (what shards and mask labels use)."""
        return {layer.names[0]: skey for skey, layer in canonical_layers(self.base, "s00").items()}


# --------------------------------------------------------------------------- one site's secrets
def site_name(i: int) -> str:
    return f"s{i:02d}"


def ctx(*sites: str) -> bytes:
    return secagg.context(FEDERATION, EPOCH, ROUND, *sites)


def pair_ctx(a: str, b: str) -> bytes:
    return ctx(*sorted((a, b)))


def make_secrets(site: str, parts: list[str], members: dict, weights_layout: list) -> dict:
    """What p2pfed.protocol.secure._make_secrets computes (without the file write), with the
    layout listed as asym's key material lists it (FFE's lists none: an upper bound)."""
    private, public = crypto.mask_keypair()
    seed, noise = crypto.random_seed(), crypto.random_seed() + crypto.random_seed()
    need = secagg.threshold(len(parts))
    mask_shares, seed_shares = crypto.split_secret(private, need, len(parts)), crypto.split_secret(seed, need, len(parts))
    shares = {}
    for i, holder in enumerate(parts):
        c = ctx(site, holder)
        shares[holder] = {"sealed": crypto.encrypt_share(mask_shares[i] + seed_shares[i], members[holder], c),
                          "mask": crypto.commitment(c, b"mask", mask_shares[i]),
                          "seed": crypto.commitment(c, b"seed", seed_shares[i])}
    payload = {"round": ROUND, "mask_public": crypto.b64(public), "layout": weights_layout, "shares": shares,
               "seed_commitment": crypto.commitment(ctx(site), b"seed", seed)}
    return {"private": private, "public": public, "seed": seed, "noise": noise, "payload": payload}


def reveal_shares(holder: str, ident, secrets: dict, dropped: set) -> dict:
    """holder's reveal body: per dealer the seed share (contributor) or mask-key share (dropped),
    decrypted and checked against the dealer's commitments, as secure.reveal does."""
    out = {}
    for dealer, sec in sorted(secrets.items()):
        c = ctx(dealer, holder)
        entry = sec["payload"]["shares"][holder]
        plain = crypto.decrypt_share(entry["sealed"], ident, c)
        mask, seed = (plain[:32], plain[32:]) if plain is not None and len(plain) == 48 else (b"", b"")
        if crypto.commitment(c, b"mask", mask) != entry["mask"] or crypto.commitment(c, b"seed", seed) != entry["seed"]:
            raise SystemExit(f"share of {dealer} for {holder} does not match its commitment")
        kind = "mask" if dealer in dropped else "seed"
        out[dealer] = {"kind": kind, "share": crypto.b64(mask if kind == "mask" else seed)}
    return {"round": ROUND, "seal": "0" * 64, "shares": out}


def recover(parts: list[str], secrets: dict, reveals: dict, dropped: set) -> dict[str, bytes]:
    """dealer -> its reconstructed seed or mask private key, from the first `threshold`
    holders' reveals, checked (secure.recover + secure._checked)."""
    need, out = secagg.threshold(len(parts)), {}
    holders = sorted(reveals)[:need]
    for dealer, sec in sorted(secrets.items()):
        kind = "mask" if dealer in dropped else "seed"
        got = {}
        for holder in holders:
            share = crypto.unb64(reveals[holder]["shares"][dealer]["share"], "reveal")
            if crypto.commitment(ctx(dealer, holder), kind.encode(), share) != sec["payload"]["shares"][holder][kind]:
                raise SystemExit(f"revealed share of {dealer} by {holder} does not match")
            got[parts.index(holder) + 1] = share
        secret = crypto.combine_secret(got)
        ok = crypto.mask_public(secret) == sec["public"] if kind == "mask" else \
            crypto.commitment(ctx(dealer), b"seed", secret) == sec["payload"]["seed_commitment"]
        if not ok:
            raise SystemExit(f"{dealer}'s {kind} does not reconstruct")
        out[dealer] = secret
    return out


# --------------------------------------------------------------------------- one (size, N)
OVER_CAP: list[str] = []  # envelopes larger than layout.max_size: objects.put_envelope refuses them


def seal_size(blob: bytes, kind: str, key: str, author, recipients) -> int:
    header = {"round": ROUND, "federation": FEDERATION, "kind": kind, "name": key}
    size = len(crypto.seal(blob, header=header, author=author, recipients=recipients))
    if size > layout.max_size(key):
        OVER_CAP.append(kind)
    return size


def setup(n: int, model: Model, idents: dict) -> tuple:
    parts = [site_name(i) for i in range(n)]
    members = {s: idents[s].public() for s in parts}
    lay = [[skey, list(model.base[name].shape)] for name, skey in sorted(model.skeys().items(), key=lambda x: x[1])]
    t = time.process_time()
    secrets = {parts[0]: make_secrets(parts[0], parts, members, lay)}
    keys_s = time.process_time() - t
    for s in parts[1:]:
        secrets[s] = make_secrets(s, parts, members, lay)
    w = {s: 10 + 3 * i for i, s in enumerate(parts)}
    total = sum(w.values())
    shares = {s: float(w[s] / total) for s in parts}  # secure._shares: Fraction w_i / W as float
    return parts, members, secrets, w, shares, keys_s


def measure(model: Model, n: int, idents: dict, plain_blobs: list[bytes]) -> dict:
    parts, members, secrets, w, shares, keys_s = setup(n, model, idents)
    me, ident = parts[0], idents[parts[0]]
    skeys = model.skeys()
    names = sorted(skeys, key=lambda name: skeys[name])

    # reveal (no dropout) and its bytes; the secrets every site reconstructs
    t = time.process_time()
    my_reveal = reveal_shares(me, ident, secrets, set())
    reveal_s = time.process_time() - t
    reveals = {me: my_reveal, **{h: reveal_shares(h, idents[h], secrets, set()) for h in parts[1:secagg.threshold(n)]}}

    # mask: site 0, full size
    t = time.process_time()
    pair = {p: crypto.pair_mask_key(secrets[me]["private"], secrets[p]["public"], pair_ctx(me, p)) for p in parts[1:]}
    self_key = crypto.self_mask_key(secrets[me]["seed"], ctx(me))
    masker = secagg.Masker(secagg.mask_keys(me, pair, self_key))
    mask_s, masked = time.process_time() - t, []
    for name in names:
        x, lab = model.tensor(name, 0), secagg.label(skeys[name], model.base[name].shape)
        t = time.process_time()
        words, _ = secagg.encode(x, shares[me])
        y = masker.apply(words, lab).reshape(x.shape)
        mask_s += time.process_time() - t
        masked.append((skeys[name], Layer((name,), y)))

    # unmask: sum N uploads, remove N self masks, decode
    seeds = recover(parts, secrets, reveals, set())
    t = time.process_time()
    unmasker = secagg.Masker([(crypto.self_mask_key(seeds[s], ctx(s)), 1) for s in parts])
    unmask_s = time.process_time() - t
    for _, layer in masked:
        y = layer.array.ravel()
        t = time.process_time()
        acc = np.zeros(y.size, dtype=np.uint64)
        for _ in parts:
            np.add(acc, y, out=acc)
        out = unmasker.apply(acc, secagg.label(_skey_of(layer, skeys), layer.array.shape), direction=-1)
        secagg.decode(out, 1.0).astype(np.float32)
        unmask_s += time.process_time() - t
    del acc, out

    # recover with one dropout (the last site): Shamir combine + the dropped site's N-1 pair masks
    dropped = parts[-1]
    d_reveals = {h: reveal_shares(h, idents[h], secrets, {dropped}) for h in parts[:secagg.threshold(n)]}
    t = time.process_time()
    recovered = recover(parts, secrets, d_reveals, {dropped})
    remover = secagg.Masker([(crypto.pair_mask_key(recovered[dropped], secrets[i]["public"], pair_ctx(i, dropped)),
                              secagg.sign(i, dropped)) for i in parts if i != dropped])
    recover_s = time.process_time() - t
    for skey, layer in masked:
        y = layer.array.ravel()
        t = time.process_time()
        remover.apply(y, secagg.label(skey, layer.array.shape), direction=-1)
        recover_s += time.process_time() - t

    # plain merge: weighted_mean of the N models, float64
    plain_s, wf = 0.0, [np.float64(w[s]) for s in parts]
    for name in names:
        xs = [model.tensor(name, i) for i in range(n)]
        t = time.process_time()
        weighted_mean(xs, wf)
        plain_s += time.process_time() - t
    del xs

    # bytes, from real envelopes to the N participants
    OVER_CAP.clear()
    plain_up = sum(seal_size(b, "shard", layout.shard(ROUND, me, crypto.sha256_hex(b)), ident, members)
                   for b in plain_blobs)
    masked_up = 0
    for b in layer_shards(masked, MASKED_MAX_BYTES):
        masked_up += seal_size(b, "masked", layout.masked(ROUND, me, crypto.sha256_hex(b)), ident, members)
    del masked
    keys_up = seal_size(crypto.canonical_json(secrets[me]["payload"]), "keys", layout.secagg_keys(ROUND, me),
                        ident, members)
    reveal_up = seal_size(crypto.canonical_json(my_reveal), "reveal", layout.reveal(ROUND, me), ident, members)
    secure_up = masked_up + keys_up + reveal_up

    return {"mparams": round(model.params / 1e6, 3), "params": model.params, "tensors": len(model.shapes), "sites": n,
            "plain_up": plain_up, "plain_down": n * plain_up,
            "secure_up": secure_up, "secure_down": n * secure_up,
            "masked_up": masked_up, "keys_up": keys_up, "reveal_up": reveal_up,
            "mask_s": round(mask_s, 3), "unmask_s": round(unmask_s, 3), "recover_s": round(recover_s, 3),
            "keys_s": round(keys_s, 4), "reveal_s": round(reveal_s, 4), "plain_s": round(plain_s, 3),
            "mask_unmask_s": round(mask_s + unmask_s, 3), "ratio_up": round(secure_up / plain_up, 4),
            "over_cap": {k: OVER_CAP.count(k) for k in sorted(set(OVER_CAP))}}


def _skey_of(layer: Layer, skeys: dict) -> str:
    return skeys[layer.names[0]]


# --------------------------------------------------------------------------- correctness
def verify(model: Model, n: int, idents: dict, budget: int) -> dict:
    """Full round on the first `budget` parameters (0: all): every site masks, the sum is
    unmasked with all contributing and with the last site dropped; worst relative error."""
    parts, members, secrets, w, shares, _ = setup(n, model, idents)
    skeys = model.skeys()
    names, used = [], 0
    for name in sorted(skeys, key=lambda name: skeys[name]):
        if budget and used >= budget:
            break
        names.append(name)
        used += model.base[name].size
    dropped = parts[-1]
    survivors = parts[:-1]
    maskers = {}
    for s in parts:
        pair = {p: crypto.pair_mask_key(secrets[s]["private"], secrets[p]["public"], pair_ctx(s, p))
                for p in parts if p != s}
        maskers[s] = secagg.Masker(secagg.mask_keys(s, pair, crypto.self_mask_key(secrets[s]["seed"], ctx(s))))
    need = secagg.threshold(n)
    seeds = recover(parts, secrets, {h: reveal_shares(h, idents[h], secrets, set()) for h in parts[:need]}, set())
    d_secrets = recover(parts, {s: secrets[s] for s in parts},
                        {h: reveal_shares(h, idents[h], secrets, {dropped}) for h in survivors[:need]}, {dropped})
    self_all = secagg.Masker([(crypto.self_mask_key(seeds[s], ctx(s)), 1) for s in parts])
    self_surv = secagg.Masker([(crypto.self_mask_key(d_secrets[s], ctx(s)), 1) for s in survivors]
                              + [(crypto.pair_mask_key(d_secrets[dropped], secrets[i]["public"], pair_ctx(i, dropped)),
                                  secagg.sign(i, dropped)) for i in survivors])
    W, Ws = sum(w.values()), sum(w[s] for s in survivors)
    err, top, f32_diff = 0.0, 0.0, 0
    for name in names:
        lab = secagg.label(skeys[name], model.base[name].shape)
        acc_all = acc_surv = None
        ref_all = ref_surv = None
        xs = []
        for i, s in enumerate(parts):
            x = model.tensor(name, i)
            xs.append(x)
            y = maskers[s].apply(secagg.encode(x, shares[s])[0], lab)
            term = x.astype(np.float64).ravel() * np.float64(w[s])
            if acc_all is None:
                acc_all, acc_surv = np.zeros(y.size, np.uint64), np.zeros(y.size, np.uint64)
                ref_all, ref_surv = np.zeros(y.size), np.zeros(y.size)
            np.add(acc_all, y, out=acc_all)
            ref_all += term
            if s != dropped:
                np.add(acc_surv, y, out=acc_surv)
                ref_surv += term
        ref_all /= W
        ref_surv /= Ws
        sec_all = secagg.decode(self_all.apply(acc_all, lab, direction=-1), 1.0)
        sec_surv = secagg.decode(self_surv.apply(acc_surv, lab, direction=-1), float(W / Ws))
        err = max(err, float(np.max(np.abs(sec_all - ref_all))), float(np.max(np.abs(sec_surv - ref_surv))))
        top = max(top, float(np.max(np.abs(ref_all))), float(np.max(np.abs(ref_surv))))
        plain = weighted_mean(xs, [np.float64(w[s]) for s in parts]).ravel()
        f32_diff += int(np.count_nonzero(plain != sec_all.astype(np.float32)))
    return {"verified_params": used, "rel_err": err / top if top else err, "max_abs_err": err,
            "f32_differs": f32_diff}


# --------------------------------------------------------------------------- driver
def _mib(b: int) -> str:
    return f"{b / 2**20:,.1f}"


def table(rows: list[dict]) -> str:
    head = ["M params", "N", "plain up MiB", "plain down MiB", "secure up MiB", "secure down MiB", "up ratio",
            "mask s", "unmask s", "mask+unmask s", "recover s", "keys s", "plain merge s", "rel err", "over cap"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            f"{r['mparams']:g}", str(r["sites"]), _mib(r["plain_up"]), _mib(r["plain_down"]), _mib(r["secure_up"]),
            _mib(r["secure_down"]), f"{r['ratio_up']:.4f}", f"{r['mask_s']:.2f}", f"{r['unmask_s']:.2f}",
            f"{r['mask_unmask_s']:.2f}", f"{r['recover_s']:.2f}", f"{r['keys_s']:.3f}", f"{r['plain_s']:.2f}",
            f"{r['rel_err']:.1e}", ", ".join(f"{n} {k}" for k, n in r["over_cap"].items()) or "-"]) + " |")
    return "\n".join(lines)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=_floats, default=[31, 102], help="millions of parameters, comma-separated")
    ap.add_argument("--sites", type=lambda s: [int(v) for v in s.split(",") if v], default=[3, 5, 10, 20])
    ap.add_argument("--quick", action="store_true", help="tiny sizes and 3, 5 sites: a smoke run")
    ap.add_argument("--verify-mparams", type=float, default=4.0,
                    help="millions of parameters the full-round correctness check covers (0: the whole model)")
    ap.add_argument("--json", type=Path, help="write the rows there")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.sites, args.verify_mparams = [0.2, 0.5], [3, 5], 0.0
    if min(args.sites) < secagg.MIN_GROUP:
        ap.error(f"a secure group has at least {secagg.MIN_GROUP} sites")

    t0 = time.perf_counter()
    idents = {site_name(i): crypto.Identity.generate(site_name(i)) for i in range(max(args.sites))}
    rows, failed = [], False
    for size in args.sizes:
        model = Model(round(size * 1e6))
        plain_blobs = to_shards(model.base, site=site_name(0))
        for n in args.sites:
            started = time.perf_counter()
            row = measure(model, n, idents, plain_blobs)
            row.update(verify(model, n, idents, round(args.verify_mparams * 1e6)))
            row["wall_s"] = round(time.perf_counter() - started, 1)
            failed |= not row["rel_err"] < 1e-9
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)  # progress
        del model, plain_blobs
    total = time.perf_counter() - t0
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
               "processor": platform.processor() or platform.machine()}
    print(table(rows))
    print(f"\ntotal wall {total:.0f} s; CPU seconds are per site per round (time.process_time); "
          f"rel err: max |secure - float64 weighted mean| / max |mean|, all N and one dropout; "
          f"over cap: envelopes of this site larger than layout.max_size (put_envelope refuses them)")
    if failed:
        print("FAILED: relative error of the secure merge not below 1e-9")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "total_s": round(total), "rows": rows}, indent=1))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
