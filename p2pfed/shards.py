"""Weight shards and the streaming merge (docs/design.md, section 5, "Shard format").

A state dict travels as a list of shards: safetensors blobs of at most
`max_bytes` of tensor data each (one tensor larger than that gets a shard of its
own). Every distinct storage is stored once, under its structural key
(`p2pfed.merge.structural_keys`); all shards of a model together list the
structural keys in strictly increasing order. The only safetensors metadata entry,
"p2pfed", is canonical JSON `{"names": {structural key: [name, alias, ...]},
"version": 1}`: the state-dict names of each tensor, canonical name first, so
loading restores every nnU-Net key name, aliases sharing one array. (A single
metadata entry: safetensors writes several in hash-map order, which changes bytes
from run to run.)

Because every site's shards walk the same key order, the streaming merge advances
all sites together by structural key, holding one shard per site: its memory grows
with shard size x sites, not model size x sites. It gives the same bits as
`to_shards(asym_fedavg(...)[site])`.

No storage and no crypto here: the streaming merge reads through a `load(site,
index) -> bytes` callable, which downloads and decrypts.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import safetensors.numpy

from . import schema
from .errors import ContributionRejected
from .schema import canonical_json
from .merge import LAYER_MODES, Layer, as_float32, canonical_layers, check_layout, check_weights, merge_layer

FORMAT_VERSION = 1
METADATA_KEY = "p2pfed"
DEFAULT_MAX_BYTES = schema.SHARD_TENSOR_BYTES  # readers refuse larger shards (layout.KINDS caps)
MASKED_MAX_BYTES = 2 * DEFAULT_MAX_BYTES  # uint64 words of secure aggregation: as many shards as float32

Loader = Callable[[str, int], bytes]
Sink = Callable[[str, int, bytes], None]


def shard_hash(blob: bytes) -> str:
    """The sha256 (hex) that commits and merge announcements list for a shard."""
    return hashlib.sha256(blob).hexdigest()


# --------------------------------------------------------------------------- writing
def to_shards(state_dict: Mapping[str, Any], *, site: str = "this site",
              max_bytes: int = DEFAULT_MAX_BYTES) -> list[bytes]:
    """Serialize a state dict (float32 numpy arrays or torch tensors) into shards."""
    return layer_shards(sorted(canonical_layers(state_dict, site).items()), max_bytes)


def layer_shards(layers: Sequence[tuple[str, Layer]], max_bytes: int = DEFAULT_MAX_BYTES) -> list[bytes]:
    """Serialize (structural key, Layer) items, in key order, into shards of any dtype
    (secure aggregation: the masked uint64 words of each tensor)."""
    chunker, chunks = _Chunker(max_bytes), []
    for skey, layer in layers:
        chunks.append(chunker.add(skey, layer))
    chunks.append(chunker.flush())
    return [_serialize(chunk) for chunk in chunks if chunk]


def one_shard(layers: Sequence[tuple[str, Layer]]) -> bytes:
    """(structural key or entry name, Layer) items as exactly one shard, also when empty
    (a sharded secure round: one masked shard per slice, docs/design.md 7.9)."""
    return _serialize(layers)


class _Chunker:
    """Greedy split of (structural key, Layer) items, in order, into shards: a new
    shard starts when the next tensor would take the current one over max_bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.items, self.size = max_bytes, [], 0

    def add(self, skey: str, layer: Layer) -> list | None:
        full = self.flush() if self.items and self.size + layer.array.nbytes > self.max_bytes else None
        self.items.append((skey, layer))
        self.size += layer.array.nbytes
        return full

    def flush(self) -> list | None:
        items, self.items, self.size = self.items, [], 0
        return items or None


def _serialize(items: Sequence[tuple[str, Layer]]) -> bytes:
    names = {skey: list(layer.names) for skey, layer in items}
    meta = canonical_json({"names": names, "version": FORMAT_VERSION}).decode()
    tensors = {skey: np.ascontiguousarray(layer.array) for skey, layer in items}
    return safetensors.numpy.save(tensors, metadata={METADATA_KEY: meta})


# --------------------------------------------------------------------------- reading
def read_shard(blob: bytes, origin: str, dtype: str = "F32") -> list[tuple[str, Layer]]:
    """Parse one shard into (structural key, Layer) items in key order. The arrays
    are read-only views into `blob` (no copy: the streaming merge holds one shard
    per site, and copying would double that). `dtype`: F32 for weights, U64 for the
    masked fixed-point words of secure aggregation (p2pfed/secagg.py).

    `origin` names the shard in errors (site and index). A shard that is not a valid
    p2pfed shard raises ContributionRejected."""
    meta, tensors = _parse_safetensors(blob, origin, dtype)
    meta = schema.strict_json(meta[METADATA_KEY].encode(), f"{origin}: shard metadata",
                              max_bytes=schema.SHARD_HEADER_BYTES, canonical=b"", error=ContributionRejected)
    schema.check(schema.SHARD_NAMES, meta, f"{origin}: shard metadata", ContributionRejected)
    version, names = meta["version"], meta["names"]
    if version != FORMAT_VERSION:
        raise ContributionRejected(f"{origin}: shard format version {version!r}, expected {FORMAT_VERSION}",
                                   "all members must run a p2pfed with the same shard format")
    if sorted(names) != sorted(tensors):
        raise ContributionRejected(f"{origin}: shard metadata does not list the names of its tensors")
    return [(skey, Layer(tuple(names[skey]), tensors[skey])) for skey in sorted(tensors)]


_DTYPES = {"F32": "<f4", "U64": "<u8"}


def _parse_safetensors(blob: bytes, origin: str, want: str = "F32") -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, views) of a safetensors file, checked as its spec demands: JSON
    header, known entries, and data offsets that tile the byte buffer exactly (no
    holes, no overlaps). Only tensors of dtype `want` are accepted."""
    def bad(why: str) -> ContributionRejected:
        return ContributionRejected(f"{origin}: not a p2pfed shard ({why})")

    if len(blob) < 8:
        raise bad("truncated")
    header_len = int.from_bytes(blob[:8], "little")
    if header_len > min(len(blob) - 8, schema.SHARD_HEADER_BYTES):
        raise bad("header length out of bounds")
    # safetensors pads its header with spaces to 8 bytes: strict, but not canonical JSON
    header = schema.strict_json(blob[8:8 + header_len], f"{origin}: not a p2pfed shard (header)",
                                max_bytes=schema.SHARD_HEADER_BYTES, error=ContributionRejected)
    if not isinstance(header, dict):
        raise bad("header is not an object")
    meta = header.pop("__metadata__", None)
    schema.check(schema.SHARD_METADATA, meta, f"{origin}: shard __metadata__", ContributionRejected)
    schema.check(schema.SHARD_TENSORS, header, f"{origin}: shard header", ContributionRejected)
    entries = []
    for name, entry in header.items():
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype != want:
            raise ContributionRejected(f"{origin}: tensor {name!r} has dtype {dtype}, expected {want}")
        # Python ints: a declared shape like [2**32, 2**32] must not wrap around in int64
        count = math.prod(shape)
        if end != begin + np.dtype(_DTYPES[want]).itemsize * count:
            raise bad(f"tensor {name!r} has inconsistent shape and offsets")
        entries.append((begin, end, name, tuple(shape), count))
    entries.sort()
    data_start, position = 8 + header_len, 0
    for begin, end, *_ in entries:
        if begin != position:
            raise bad("tensor data has holes or overlaps")
        position = end
    if data_start + position != len(blob):
        raise bad("tensor data does not fill the file")
    return meta, {name: np.frombuffer(blob, _DTYPES[want], count, data_start + begin).reshape(shape)
                  for begin, _, name, shape, count in entries}


def from_shards(blobs: Sequence[bytes], *, site: str = "this site") -> dict[str, np.ndarray]:
    """Restore a state dict from its shards: every name, aliases sharing one array."""
    layers = list(_site_stream(site, lambda _, i: blobs[i], len(blobs)))
    check_layout(((skey, layer.names) for skey, layer in layers), site)
    return {name: layer.array for _, layer in layers for name in layer.names}


def _site_stream(site: str, load: Loader, n_shards: int, seen: list | None = None) -> Iterator[tuple[str, Layer]]:
    """One site's layers in key order, one shard in memory at a time. Checks each
    array (finite) and the strictly increasing key order; appends (key, names) to
    `seen` for the final layout check."""
    last = None
    for index in range(n_shards):
        origin = f"site {site!r} shard {index}"
        for skey, layer in read_shard(load(site, index), origin):
            if last is not None and skey <= last:
                raise ContributionRejected(f"{origin}: tensor {skey!r} is out of canonical key order")
            as_float32(layer.array, site, layer.names[0])
            if seen is not None:
                seen.append((skey, layer.names))
            last = skey
            yield skey, layer


# --------------------------------------------------------------------------- streaming merge
def stream_merge(load: Loader, shard_counts: Mapping[str, int], *, weights: Mapping[str, Any] | None = None,
                 layers: str = "subset", sink: Sink | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, list[str]]:
    """AsymFedAvg over shards, streaming: same bits as the in-memory merge.

    load(site, index) returns a site's shard (downloaded, decrypted, verified);
    shard_counts gives each site's number of shards; weights and layers are as in
    `p2pfed.merge.asym_fedavg`. Each merged shard is handed to sink(site, index,
    blob) as soon as it is complete. Returns site -> sha256 of its merged shards.
    """
    if layers not in LAYER_MODES:
        raise ValueError(f"layers must be one of {LAYER_MODES}, not {layers!r}")
    sites = sorted(shard_counts)
    w = check_weights(weights, sites)
    seen = {site: [] for site in sites}
    streams = {site: _site_stream(site, load, shard_counts[site], seen[site]) for site in sites}
    heads = {site: next(streams[site], None) for site in sites}
    out = _Outputs(sites, sink, max_bytes)
    while any(heads.values()):
        skey = min(head[0] for head in heads.values() if head)
        holders = {site: head[1] for site, head in heads.items() if head and head[0] == skey}
        merged = merge_layer({site: layer.array for site, layer in holders.items()}, w, len(sites), layers)
        out.add(skey, {site: Layer(layer.names, merged[site]) for site, layer in holders.items()})
        for site in holders:
            heads[site] = next(streams[site], None)
    for site in sites:
        check_layout(seen[site], site)
    return out.finish()


class _Outputs:
    """Per-site chunkers that serialize and hand over merged shards. Sites whose
    shard holds the very same arrays (FFE: all of them) share one serialization."""

    def __init__(self, sites: Sequence[str], sink: Sink | None, max_bytes: int):
        self.sink = sink
        self.chunkers = {site: _Chunker(max_bytes) for site in sites}
        self.hashes: dict[str, list[str]] = {site: [] for site in sites}

    def add(self, skey: str, layers: Mapping[str, Layer]) -> None:
        cache: dict = {}
        for site, layer in layers.items():
            self._emit(site, self.chunkers[site].add(skey, layer), cache)

    def finish(self) -> dict[str, list[str]]:
        cache: dict = {}
        for site, chunker in self.chunkers.items():
            self._emit(site, chunker.flush(), cache)
        return self.hashes

    def _emit(self, site: str, items: list | None, cache: dict) -> None:
        if not items:
            return
        # array ids are a safe key: the cache keeps the items, hence the arrays, alive
        ident = tuple((skey, layer.names, id(layer.array)) for skey, layer in items)
        if ident not in cache:
            blob = _serialize(items)
            cache[ident] = (items, blob, shard_hash(blob))
        _, blob, digest = cache[ident]
        if self.sink is not None:
            self.sink(site, len(self.hashes[site]), blob)
        self.hashes[site].append(digest)
