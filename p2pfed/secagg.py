"""Secure aggregation, the arithmetic (docs/design.md 7.8): fixed point modulo 2^64,
pairwise and self masks, secure groups. Pure: arrays in, arrays out; the keys come from
p2pfed/crypto.py, the protocol around it is p2pfed/protocol/secure.py.

A contributor i of a secure group G (the sites that hold one tensor with one shape)
uploads, element by element and modulo 2^64,

    y_i = enc(s_i x_i) + PRG(self_i) + sum over j in G, j != i of sign(i, j) PRG(k_ij)

with sign(i, j) = +1 if i < j else -1, so the pairwise masks cancel in the sum over G.
Once the round is sealed, the self masks of the contributors and the pairwise masks
between contributors and the sites that dropped out are regenerated from reconstructed
secrets and removed. What is left is sum enc(s_i x_i): integers, so the sum is the same
bits in any order, on any machine.

Fixed point: x is clipped to [-CLIP, CLIP] (clipped values are counted and reported,
never silent), multiplied in float64 by the contributor's share s_i = w_i / W (its merge
weight over the total weight of the sites that published keys, so sum s_i <= 1), scaled
by 2^FRACTION_BITS and rounded half to even. |sum| <= CLIP 2^48 = 2^60 < 2^63: no wrap
for any number of sites or case counts, 3 bits of headroom for DP noise; the rounding
error of one term is at most 2^-49 (about 1.8e-15), far below the 1e-9 relative the
merge must keep against float64."""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from . import crypto

FRACTION_BITS = 48
SCALE = float(2 ** FRACTION_BITS)
CLIP = float(2 ** 12)
MIN_GROUP = 3  # fewer: each contributor could subtract its own values from the sum and read the others'


def threshold(n: int) -> int:
    """Shares needed to reconstruct a secret dealt to n participants: a majority."""
    return n // 2 + 1


def minimum(n: int, quorum: int) -> int:
    """The fewest contributions a secure round may be sealed with: the quorum, enough to
    reconstruct, and a secure group's minimum."""
    return max(quorum, threshold(n), MIN_GROUP)


def encode(x: np.ndarray, share: float) -> tuple[np.ndarray, int]:
    """(fixed-point uint64 words of share * x, how many values were clipped)."""
    v = np.asarray(x, dtype=np.float64).ravel()
    clipped = int(np.count_nonzero(np.abs(v) > CLIP))
    v = np.clip(v, -CLIP, CLIP)
    v = np.rint(v * np.float64(share) * SCALE)  # rint: round half to even; * 2^48 is exact
    return v.astype(np.int64).view(np.uint64), clipped


def decode(total: np.ndarray, factor: float) -> np.ndarray:
    """float64 values of a fixed-point sum, times `factor` (the total weight of the sites
    that published keys over that of the contributors: the sum of shares becomes 1)."""
    return total.view(np.int64).astype(np.float64) / SCALE * np.float64(factor)


def sign(site: str, peer: str) -> int:
    return 1 if site < peer else -1


def label(skey: str, shape: Iterable[int]) -> bytes:
    """What a tensor's mask streams are labelled with: its structural key and shape."""
    return crypto.canonical_json([skey, list(shape)])


def context(federation: str, epoch_sha: str, r: int, *sites: str) -> bytes:
    """The binding of every key and commitment of round r: federation, epoch, round, sites."""
    return crypto.canonical_json([federation, epoch_sha, r, *sites])


def groups(layouts: Mapping[str, Mapping[str, tuple]], layers: str = "subset") -> dict[tuple, list[str]]:
    """(structural key, shape) -> the sites (name order) that merge that tensor securely:
    those holding it with that shape, if at least MIN_GROUP do ("intersection": only if
    every site does). FFE: every tensor, every site."""
    holders: dict[tuple, list[str]] = {}
    for site in sorted(layouts):
        for skey, shape in layouts[site].items():
            holders.setdefault((skey, tuple(shape)), []).append(site)
    needed = max(MIN_GROUP, len(layouts)) if layers == "intersection" else MIN_GROUP
    return {k: v for k, v in sorted(holders.items()) if len(v) >= needed}


def group_sizes_ok(secure: Mapping[tuple, list[str]], contributors: Iterable[str]) -> tuple | None:
    """The first secure group left with 1 or 2 contributors (which would reveal them), or None."""
    contributors = set(contributors)
    for key, sites in secure.items():
        if 0 < len(contributors & set(sites)) < MIN_GROUP:
            return key
    return None


class Masker:
    """Adds (or, with `sign=-1`, removes) masks word by word: the streams of `keys`
    {(key, sign)} for one tensor label, from word `start` on."""

    def __init__(self, keys: Iterable[tuple[bytes, int]]):
        self.keys = list(keys)

    def apply(self, words: np.ndarray, lab: bytes, start: int = 0, direction: int = 1) -> np.ndarray:
        out = words.copy()
        for key, s in self.keys:
            stream = crypto.keystream_u64(key, lab, start, out.size)
            (np.add if s * direction > 0 else np.subtract)(out, stream, out=out)
        return out


def mask_keys(site: str, peers: Mapping[str, bytes], self_key: bytes) -> list[tuple[bytes, int]]:
    """The streams contributor `site` adds: its self mask, and each peer's pairwise mask
    with the sign of the pair."""
    return [(self_key, 1)] + [(k, sign(site, peer)) for peer, k in sorted(peers.items())]


def noise(key: bytes, lab: bytes, count: int, sigma: float, start: int = 0) -> np.ndarray:
    """`count` int64 draws of a Gaussian of std `sigma` (fixed-point units) rounded to
    integers, for the words `start`.. of a tensor, from the ChaCha20 stream of (key, lab):
    a cryptographic source, never numpy's generator, and seekable (draw k uses stream
    words 2k and 2k+1). Box-Muller on 53-bit uniforms; at the sigmas DP uses here
    (2^20 units and more) the rounded Gaussian is the discrete Gaussian to within a
    negligible distance."""
    words = crypto.keystream_u64(key, b"noise\x00" + lab, 2 * start, 2 * count).reshape(count, 2)
    u1 = ((words[:, 0] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0 ** -53  # (0, 1]: log is finite
    u2 = (words[:, 1] >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    return np.rint(np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2) * sigma).astype(np.int64)


# --------------------------------------------------------------------------- sharded aggregation
REPLICAS = 2  # sites that sum each slice; their results must agree by hash


def slices(secure: Mapping[tuple, list[str]], n: int) -> list[list[tuple[int, int, int]]]:
    """The flat concatenation of the secure tensors (in key order) cut into n slices of
    about equal size: slice j is a list of (tensor index, first word, end word)."""
    sizes = [int(np.prod(shape, dtype=np.int64)) for _, shape in secure]
    total = sum(sizes)
    bounds = [total * j // n for j in range(n + 1)]
    out: list[list[tuple[int, int, int]]] = [[] for _ in range(n)]
    offset = 0
    for i, size in enumerate(sizes):
        for j in range(n):
            a, b = max(bounds[j], offset), min(bounds[j + 1], offset + size)
            if a < b:
                out[j].append((i, a - offset, b - offset))
        offset += size
    return out


def slice_count(secure: Mapping[tuple, list[str]], sites: int, max_words: int) -> int:
    """As many slices as key-sealed sites (each site then sums about REPLICAS slices),
    more if a slice would not fit one masked shard of `max_words` words."""
    total = sum(int(np.prod(shape, dtype=np.int64)) for _, shape in secure)
    return max(sites, -(-total // max_words), 1)


def entry_name(index: int, start: int) -> str:
    """A slice's piece of secure tensor `index` from word `start` on (sorts in order)."""
    return f"g{index:06d}@{start:012d}"


def owners(seal_sha: str, j: int, contributors) -> list[str]:
    """Contributors ranked for slice j of the round sealed by `seal_sha`: the first
    REPLICAS sum it, the next step in when they disagree or are late (docs/design.md 7.9).
    One order of the contributors, by hash of the seal (no site chooses its place), turned
    by REPLICAS x j: with S slices and n contributors every site sums REPLICAS x S/n
    slices, to within one (a hash ranking per slice left the busiest site 3x the mean)."""
    order = sorted(contributors, key=lambda s: crypto.sha256_hex(f"{seal_sha}/{s}".encode()))
    k = REPLICAS * j % len(order) if order else 0
    return order[k:] + order[:k]
