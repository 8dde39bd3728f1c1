"""p2pfed.shards: the shard format (round trip of every nnU-Net key, canonical bytes,
size bound), rejection of bad shards, and the streaming merge giving the same bits as
the in-memory merge while reading one shard per site at a time."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import safetensors.numpy

from p2pfed.errors import ContributionRejected
from p2pfed.merge import asym_fedavg
from p2pfed.shards import METADATA_KEY, from_shards, shard_hash, stream_merge, to_shards
from test_merge import WEIGHTS, asym_federation, unet

SMALL = 48 << 10  # bytes: several shards per small test network


def shards_of(models, max_bytes=SMALL):
    return {site: to_shards(sd, site=site, max_bytes=max_bytes) for site, sd in models.items()}


def stream(blobs, max_bytes=SMALL, **kwargs):
    return stream_merge(lambda site, i: blobs[site][i], {s: len(b) for s, b in blobs.items()},
                        max_bytes=max_bytes, **kwargs)


def in_memory(blobs, max_bytes=SMALL, **kwargs):
    merged = asym_fedavg({site: from_shards(b, site=site) for site, b in blobs.items()}, **kwargs)
    return {site: [shard_hash(b) for b in to_shards(sd, max_bytes=max_bytes)] for site, sd in merged.items()}


def header(blob):
    """The safetensors header as stored: tensors in byte order, then metadata."""
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n])


def metadata(blob):
    return json.loads(header(blob)["__metadata__"][METADATA_KEY])


# --------------------------------------------------------------------------- format
def test_round_trip_restores_every_key_name_bit_for_bit_with_aliases_shared():
    sd = unet("res", 4, prefix="_orig_mod.")
    blobs = to_shards(sd, max_bytes=SMALL)
    back = from_shards(blobs)
    assert sorted(back) == sorted(sd)
    assert all(np.array_equal(back[k], sd[k].numpy()) for k in sd)
    assert back["_orig_mod.encoder.stem.convs.0.conv.weight"] is \
        back["_orig_mod.decoder.encoder.stem.convs.0.all_modules.0.weight"]
    stored = sum(len(safetensors.numpy.load(b)) for b in blobs)
    assert stored == len({v.untyped_storage().data_ptr() for v in sd.values()}) < len(sd)


def test_shards_are_canonical_sorted_and_bounded():
    sd = unet("plain", 4)
    blobs = to_shards(sd, max_bytes=SMALL)
    assert len(blobs) > 3
    keys = [k for b in blobs for k in header(b) if k != "__metadata__"]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    for b in blobs:
        tensors = safetensors.numpy.load(b)
        size = sum(t.nbytes for t in tensors.values())
        assert size <= SMALL or len(tensors) == 1
        assert metadata(b)["version"] == 1
    reversed_dict = dict(reversed(list(sd.items())))
    assert to_shards(reversed_dict, max_bytes=SMALL) == blobs  # same bytes whatever the key order
    assert shard_hash(blobs[0]) == hashlib.sha256(blobs[0]).hexdigest()


def test_metadata_names_every_alias_canonical_name_first():
    blob = to_shards(unet("plain", 3))[0]
    names = metadata(blob)["names"]["decoder.stages.L0.convs.0.conv.weight"]
    assert names == ["decoder.stages.1.convs.0.conv.weight", "decoder.stages.1.convs.0.all_modules.0.weight"]


# --------------------------------------------------------------------------- bad shards
def forged(items, meta, encode=lambda m: json.dumps(m, sort_keys=True, separators=(",", ":"))):
    """A shard with these tensors and p2pfed metadata (canonical JSON unless `encode` says otherwise)."""
    return safetensors.numpy.save(items, metadata={METADATA_KEY: encode(meta)})


def overlapping():
    """Two tensors whose data offsets overlap, padded so the file length still fits."""
    blob = forged({"a": np.ones(2, np.float32), "b": np.ones(2, np.float32)},
                  {"names": {"a": ["a"], "b": ["b"]}, "version": 1})
    return blob.replace(b'"data_offsets":[8,16]', b'"data_offsets":[4,12]')


def with_header(blob, change):
    """The same shard with its safetensors header changed by change(header)."""
    h = header(blob)
    change(h)
    raw = json.dumps(h).encode()
    return len(raw).to_bytes(8, "little") + raw + blob[8 + int.from_bytes(blob[:8], "little"):]


EMPTY = forged({"w": np.zeros(0, np.float32)}, {"names": {"w": ["w"]}, "version": 1})


@pytest.mark.parametrize("blob, match", [
    (b"not a shard at all", "not a p2pfed shard"),
    # 2**64 elements wrap to 0 in int64: the shape must not pass as an empty tensor
    (with_header(EMPTY, lambda h: h["w"].update(shape=[2 ** 32, 2 ** 32])), "inconsistent shape and offsets"),
    (with_header(EMPTY, lambda h: h["w"].update(shape=[-1, 0])), r"shard header\.w\.shape\[0\]: -1 is outside 0\.\."),
    (with_header(EMPTY, lambda h: h["w"].update(shape="[0]")), r"shard header\.w\.shape: expected a list"),
    (safetensors.numpy.save({"w": np.ones(2, np.float32)}), "shard __metadata__: expected an object, got null"),
    (forged({"w": np.ones(2, np.float32)}, {"names": {"w": ["w"]}, "version": 1}, json.dumps),
     "shard metadata: JSON is not in canonical form"),
    (forged({"w": np.ones(2, np.float32)}, {"names": {"w": ["w"]}, "version": 1, "x": 1}),
     "shard metadata: has unknown field 'x'"),
    (forged({"w": np.ones(2, np.float32)}, {"names": {"w": ["w"]}, "version": 1})[:-1], "does not fill"),
    (overlapping(), "holes or overlaps"),
    (forged({"w": np.ones(2, np.float32)}, {"names": {"w": ["w"]}, "version": 9}), "version 9"),
    (forged({"w": np.ones(2, np.float32)}, {"names": {}, "version": 1}), "does not list"),
    (forged({"w": np.ones(2, np.float16)}, {"names": {"w": ["w"]}, "version": 1}), "'w' has dtype F16"),
    (forged({"w": np.array([np.nan], np.float32)}, {"names": {"w": ["w"]}, "version": 1}), "'w' has non-finite"),
])
def test_unusable_shards_are_rejected_naming_site_and_shard(blob, match):
    with pytest.raises(ContributionRejected, match=rf"site 'x'.*{match}"):
        from_shards([blob], site="x")


def test_shards_that_claim_a_layer_their_names_do_not_give_are_rejected():
    sd = unet("plain", 4)
    items = {k: v for k, v in safetensors.numpy.load(to_shards(sd)[0]).items()}
    meta = metadata(to_shards(sd)[0])
    # claim that the level-2 decoder stage is the level-0 one, to be averaged with it
    meta["names"]["decoder.stages.L0.convs.0.conv.weight"], meta["names"]["decoder.stages.L2.convs.0.conv.weight"] = \
        meta["names"]["decoder.stages.L2.convs.0.conv.weight"], meta["names"]["decoder.stages.L0.convs.0.conv.weight"]
    with pytest.raises(ContributionRejected, match="site 'x'.*wrong key"):
        from_shards([forged(items, meta)], site="x")


def test_shards_out_of_canonical_order_are_rejected():
    blobs = to_shards(unet("plain", 3), max_bytes=SMALL)
    with pytest.raises(ContributionRejected, match="site 'x' shard 1: .*out of canonical key order"):
        from_shards([blobs[1], blobs[0]] + blobs[2:], site="x")


# --------------------------------------------------------------------------- streaming merge
@pytest.mark.parametrize("layers", ["subset", "intersection"])
def test_streaming_merge_gives_the_in_memory_bits(layers):
    blobs = shards_of(asym_federation())
    assert stream(blobs, weights=WEIGHTS, layers=layers) == in_memory(blobs, weights=WEIGHTS, layers=layers)


def test_streaming_merge_is_independent_of_input_shard_size_and_site_order():
    models = asym_federation()
    expected = stream(shards_of(models), weights=WEIGHTS)
    other = shards_of(dict(reversed(list(models.items()))), max_bytes=7 << 10)
    assert stream(other, weights=WEIGHTS) == expected
    whole = shards_of(models, max_bytes=1 << 30)
    assert all(len(b) == 1 for b in whole.values())
    assert stream(whole, weights=WEIGHTS) == expected


def test_ffe_streaming_serializes_once_for_all_sites():
    models = {f"s{i}": unet("plain", 3, seed=i) for i in range(4)}
    out = {}
    hashes = stream(shards_of(models), sink=lambda site, i, blob: out.setdefault(site, []).append(blob))
    assert all(out[s][i] is out["s0"][i] for s in out for i in range(len(out["s0"])))
    assert hashes["s3"] == [shard_hash(b) for b in out["s3"]] == in_memory(shards_of(models))["s3"]


def test_streaming_merge_reads_each_shard_once_in_order_and_emits_as_it_goes():
    blobs = shards_of(asym_federation())
    events = []

    def load(site, index):
        events.append(("load", site, index))
        return blobs[site][index]

    stream_merge(load, {s: len(b) for s, b in blobs.items()}, max_bytes=SMALL,
                 sink=lambda site, index, blob: events.append(("emit", site, index)))
    loads = [e[1:] for e in events if e[0] == "load"]
    assert sorted(loads) == sorted((s, i) for s, b in blobs.items() for i in range(len(b)))
    for site in blobs:
        assert [i for s, i in loads if s == site] == list(range(len(blobs[site])))
    first_emit = next(n for n, e in enumerate(events) if e[0] == "emit")
    assert first_emit < len(loads) // 2  # merged shards leave before most inputs are read


def test_streaming_merge_names_the_site_of_a_bad_shard():
    blobs = shards_of(asym_federation())
    bad = forged({"w": np.array([np.inf], np.float32)}, {"names": {"w": ["w"]}, "version": 1})
    blobs["beta"] = blobs["beta"][:-1] + [bad]
    with pytest.raises(ContributionRejected, match="site 'beta'"):
        stream(blobs)
