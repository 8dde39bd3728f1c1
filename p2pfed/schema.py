"""Strict parsing and the schema of everything a member or the storage hands us
(docs/design.md, section 4.5 "Strict parsing, schemas and size caps").

Two steps, both before anything is used:

1. `strict_json`: valid UTF-8, no NaN/Infinity, no duplicate keys, a nesting depth
   cap, and (where the spec says canonical) bytes that re-encode to themselves. It runs
   before a signature is checked, so its failures are plain IntegrityErrors naming the
   object: never a RecursionError or a ValueError from re-encoding.
2. `check(schema, value, where)`: a declarative description of each object (types,
   ranges, allowed fields, list lengths, string patterns). The tables at the end of
   this module are the one place that says what each record body, envelope header and
   payload may hold; `p2pfed.objects` applies them by kind.

No imports of the rest of p2pfed except errors: crypto, layout and ffe build on this."""
from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping

from .errors import IntegrityError

MAX_DEPTH = 32  # deepest stored JSON: nnU-Net plans nest about 6 levels
RECORD_MAX_BYTES = 1 << 20  # any signed record; the largest (a commit) lists a few dozen shards
SITE = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"  # docs/design.md section 1 (also layout.SITE_NAME)
HEX64 = r"[0-9a-f]{64}"
FED_ID = r"[0-9a-f]{32}"
B64 = r"[A-Za-z0-9+/]*={0,2}"

# Data limits, from which the payload size caps follow (layout.KINDS).
MAX_SITE_CASES = 100_000  # training cases one site describes in its FFE summary
MAX_CHANNELS = 32  # image channels (modalities) of a dataset
MAX_LABELS = 1_000  # labels (classes) of a dataset
MAX_DIMS = 4  # axes of a case's spacing and shape (nnU-Net: 3, 2-D data included)
MAX_BINS = 1 << 16  # FFE histogram bins (ffe.DEFAULT_BINS)
MAX_CASES = 10_000_000  # a site's declared case count (its merge weight)
MAX_REASON = 4096  # one exclusion reason (a sentence naming a site, a tensor and a shape)
SHARD_TENSOR_BYTES = 32 << 20  # tensor data per weight shard (shards.DEFAULT_MAX_BYTES)
SHARD_HEADER_BYTES = 1 << 20  # a shard's safetensors JSON header (names of ~1000 layers: ~100 KiB)
SHARD_MAX_DIMS = 8


class SchemaError(ValueError):
    """What is wrong and where (a dotted path); callers add whose object it is."""


# --------------------------------------------------------------------------- strict JSON
def canonical_json(obj: Any) -> bytes:
    """The one byte encoding of JSON that is signed and hashed (sorted keys, no spaces)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def _no_constant(token: str):
    raise SchemaError(f"JSON constant {token} is not allowed")


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise SchemaError(f"duplicate key {k!r}")
        out[k] = v
    return out


def depth(obj: Any) -> int:
    """Nesting depth of a parsed JSON value (iterative: a deep value cannot recurse)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        value, d = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, d)
            stack.extend((v, d + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def strict_json(data: bytes, name: str, *, max_bytes: int = RECORD_MAX_BYTES, canonical: bytes | None = None,
                error=IntegrityError) -> Any:
    """Parse `data` strictly; `canonical`: the suffix the canonical encoding ends with
    (b"" or b"\\n"), None where the bytes need not be canonical. Raises `error`."""
    why = _strict_json_problem(data, max_bytes, canonical)
    if isinstance(why, str):
        raise error(f"{name}: {why}")
    return why[0]


def _strict_json_problem(data: bytes, max_bytes: int, canonical: bytes | None):
    """(value,) when `data` is strict JSON, else a one-line reason."""
    if len(data) > max_bytes:
        return f"{len(data)} bytes of JSON, more than the {max_bytes} allowed"
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not valid UTF-8 (byte {exc.start})"
    try:
        value = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    except RecursionError:
        return f"JSON nested deeper than {MAX_DEPTH} levels"
    except SchemaError as exc:
        return f"not strict JSON: {exc}"
    except ValueError as exc:  # JSONDecodeError, or an integer of more than 4300 digits
        return f"not JSON ({str(exc).splitlines()[0][:80]})"
    if depth(value) > MAX_DEPTH:
        return f"JSON nested deeper than {MAX_DEPTH} levels"
    if canonical is not None:
        try:
            again = canonical_json(value) + canonical
        except UnicodeEncodeError:  # a lone surrogate escape ("\ud800") parses but cannot be encoded
            return "JSON string is not valid Unicode"
        if again != bytes(data):
            return "JSON is not in canonical form"
    return (value,)


# --------------------------------------------------------------------------- schemas
class Schema:
    def check(self, value: Any, where: str) -> None:
        raise NotImplementedError


def _fail(where: str, why: str):
    raise SchemaError(f"{where}: {why}")


class Str(Schema):
    def __init__(self, pattern: str | None = None, max_len: int = 256):
        self.pattern = re.compile(f"(?:{pattern})\\Z") if pattern else None
        self.max_len = max_len

    def check(self, value, where):
        if not isinstance(value, str):
            _fail(where, f"expected a string, got {_kind(value)}")
        if len(value) > self.max_len:
            _fail(where, f"string of {len(value)} characters, at most {self.max_len} allowed")
        if self.pattern and not self.pattern.match(value):
            _fail(where, f"{value[:80]!r} is not of the form {self.pattern.pattern[3:-3]}")


class Int(Schema):
    def __init__(self, lo: int | None = None, hi: int | None = None):
        self.lo, self.hi = lo, hi

    def check(self, value, where):
        if type(value) is not int:  # bool is not an int here
            _fail(where, f"expected an integer, got {_kind(value)}")
        _range(value, self.lo, self.hi, where)


class Num(Schema):
    """A finite JSON number (int or float)."""

    def __init__(self, lo: float | None = None, hi: float | None = None):
        self.lo, self.hi = lo, hi

    def check(self, value, where):
        if type(value) not in (int, float) or not math.isfinite(value):
            _fail(where, f"expected a finite number, got {_kind(value)}")
        _range(value, self.lo, self.hi, where)


class Bool(Schema):
    def check(self, value, where):
        if type(value) is not bool:
            _fail(where, f"expected true or false, got {_kind(value)}")


class Const(Schema):
    def __init__(self, value):
        self.value = value

    def check(self, value, where):
        if value != self.value or type(value) is not type(self.value):
            _fail(where, f"expected {self.value!r}, got {_short(value)}")


class Opt(Schema):
    """The schema, or null."""

    def __init__(self, inner: Schema):
        self.inner = inner

    def check(self, value, where):
        if value is not None:
            self.inner.check(value, where)


class OneOf(Schema):
    def __init__(self, *options: Schema):
        self.options = options

    def check(self, value, where):
        errors = []
        for option in self.options:
            try:
                return option.check(value, where)
            except SchemaError as exc:
                errors.append(str(exc))
        _fail(where, f"matches none of the allowed forms ({errors[0].split(': ', 1)[-1]})")


class List(Schema):
    def __init__(self, item: Schema, min_len: int = 0, max_len: int = 1000):
        self.item, self.min_len, self.max_len = item, min_len, max_len

    def check(self, value, where):
        if not isinstance(value, list):
            _fail(where, f"expected a list, got {_kind(value)}")
        if not self.min_len <= len(value) <= self.max_len:
            _fail(where, f"list of {len(value)} items, expected {self.min_len}..{self.max_len}")
        for i, item in enumerate(value):
            self.item.check(item, f"{where}[{i}]")


class Map(Schema):
    """An object with free keys (matching `key`) and values of one schema."""

    def __init__(self, key: Schema, value: Schema, max_len: int = 1000):
        self.key, self.value, self.max_len = key, value, max_len

    def check(self, value, where):
        if not isinstance(value, dict):
            _fail(where, f"expected an object, got {_kind(value)}")
        if len(value) > self.max_len:
            _fail(where, f"object of {len(value)} fields, at most {self.max_len} allowed")
        for k, v in value.items():
            self.key.check(k, f"{where} key")
            self.value.check(v, f"{where}.{k}")


class Obj(Schema):
    """An object with exactly these fields: `required` must be there, `optional` may be."""

    def __init__(self, required: Mapping[str, Schema], optional: Mapping[str, Schema] | None = None):
        self.required, self.optional = dict(required), dict(optional or {})

    def extend(self, required: Mapping[str, Schema] | None = None,
               optional: Mapping[str, Schema] | None = None) -> "Obj":
        return Obj({**self.required, **(required or {})}, {**self.optional, **(optional or {})})

    def check(self, value, where):
        if not isinstance(value, dict):
            _fail(where, f"expected an object, got {_kind(value)}")
        missing = [k for k in self.required if k not in value]
        if missing:
            _fail(where, f"lacks field {missing[0]!r}")
        unknown = sorted(k for k in value if k not in self.required and k not in self.optional)
        if unknown:
            _fail(where, f"has unknown field {unknown[0][:40]!r}")
        for k, v in value.items():
            (self.required.get(k) or self.optional[k]).check(v, f"{where}.{k}")


class AnyJSON(Schema):
    """Any JSON value (already depth-capped by strict_json): plans are nnU-Net's to define."""

    def check(self, value, where):
        if depth(value) > MAX_DEPTH:
            _fail(where, f"nested deeper than {MAX_DEPTH} levels")


def _range(value, lo, hi, where):
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        _fail(where, f"{value!r} is outside {'' if lo is None else lo}..{'' if hi is None else hi}")


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), _short(value))


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check(schema: Schema, value: Any, where: str, error=IntegrityError, hint: str | None = None) -> None:
    """Validate `value`; a failure raises `error` with the path and the reason."""
    try:
        schema.check(value, where)
    except SchemaError as exc:
        raise error(str(exc), hint) from None


# --------------------------------------------------------------------------- the tables
Site, Hex64, Count = Str(SITE, 63), Str(HEX64, 64), Int(0, 2 ** 53)
Time = Int(0, 2 ** 53)
Finite = Num()
Ref = Obj({"key": Str(r"[A-Za-z0-9_./-]+", 512), "sha256": Hex64})
Identity = Obj({"site": Site, "ed25519": Str(B64, 44), "x25519": Str(B64, 44)})

# Fields every record body carries (objects.put_record adds them; the signature binds them).
_RECORD = Obj({"federation": Str(FED_ID, 32), "kind": Str(r"[a-z-]+", 32), "name": Str(r"[A-Za-z0-9_./-]+", 512),
               "author": Site})
# each setting's type: federation.Settings.schema(), derived from the dataclass
_SETTINGS = Map(Str(r"[a-z_]+", 64), AnyJSON(), 64)
_SCHEMA_LABEL = OneOf(Int(0, 2 ** 31), List(Int(0, 2 ** 31), 1, MAX_LABELS))
DATASET_SCHEMA = Obj({}, {"channel_names": Map(Str(max_len=64), Str(max_len=256), MAX_CHANNELS),
                          "labels": Map(Str(max_len=256), _SCHEMA_LABEL, MAX_LABELS),
                          "file_ending": Str(max_len=32),
                          "regions_class_order": List(Int(0, 2 ** 31), 0, MAX_LABELS),
                          "overwrite_image_reader_writer": Str(max_len=256)})

RECORDS: dict[str, Obj] = {
    # the genesis is signed by the founder named inside it; it has no name/author fields
    "federation": Obj({"kind": Const("federation"), "format": Int(1, 1000), "federation": Str(FED_ID, 32),
                       "created": Time, "founder": Identity, "settings": _SETTINGS,
                       "dataset_schema": DATASET_SCHEMA,
                       "versions": Map(Str(r"[a-z0-9_.-]+", 64), Str(max_len=64), 16)}),
    "member": _RECORD.extend({"site": Site, "identity": Identity, "created": Time}),
    "join": _RECORD.extend({"site": Site, "identity": Identity, "created": Time}),
    "fingerprint-seal": _RECORD.extend({"participants": List(Site, 1, 10_000), "sealed_at": Time,
                                        "epoch": Count, "epoch_sha256": Hex64}),
    "handover": _RECORD.extend({"round": Count, "site": Site, "model": Hex64, "shards": List(Hex64, 1, 10_000),
                                "fingerprint": Hex64}),
    "plan-hash": _RECORD.extend({"plan_sha256": Hex64}),
    "commit": _RECORD.extend({"round": Count, "base": Opt(Hex64), "shards": List(Ref, 1, 10_000), "meta": Ref}),
    "seal": _RECORD.extend({"round": Count, "contributions": Map(Site, Hex64, 10_000),
                            "reason": Str("all|deadline|initial", 16), "opened_at": Time, "sealed_at": Time,
                            "previous": Hex64}, {"keys": Hex64}),  # keys: the key seal (secure aggregation)
    "keyseal": _RECORD.extend({"round": Count, "keys": Map(Site, Hex64, 10_000), "reason": Str("all|deadline", 16),
                               "opened_at": Time, "sealed_at": Time}),
    "complaint": _RECORD.extend({"object": Str(r"[A-Za-z0-9_./-]+", 512), "accused": Site}),
    "slice-hash": _RECORD.extend({"round": Count, "slice": Count, "sha256": Hex64, "sum": Ref}),
    "merged": _RECORD.extend({"round": Count, "result": Hex64, "per_site": Map(Site, Hex64, 10_000),
                              "seal": Hex64, "previous": Opt(Hex64), "excluded": List(Site, 0, 10_000),
                              "reasons": Opt(Ref)}),
}

# A signed record as stored: its body is checked by kind once the signature holds (RECORDS).
SIGNED_RECORD = Obj({"body": Map(Str(max_len=64), AnyJSON(), 64), "signer": Site, "signature": Str(B64, 88)})

# (the federation id's exact value is a binding field: objects.read_envelope expects fed.id)
ENVELOPE_HEADER = Obj({"federation": Str(r"[0-9A-Za-z_-]+", 64), "kind": Str(r"[a-z-]+", 32),
                       "name": Str(r"[A-Za-z0-9_./-]+", 512), "author": Site, "plaintext_sha256": Hex64,
                       "plaintext_size": Int(0, 2 ** 40), "chunk_size": Int(1, 1 << 30),
                       "recipients": Map(Site, Str(B64, 256), 10_000), "key_commitment": Hex64},
                      {"round": Count})

_Metric = Opt(Num())
_METRICS = Obj({}, {"train_loss": _Metric, "val_loss": _Metric, "pseudo_dice": _Metric,
                    "pseudo_dice_per_class": List(_Metric, 0, MAX_LABELS), "ema_pseudo_dice": _Metric,
                    "learning_rate": _Metric})
_CASE = Obj({"spacing": List(Num(0, 1e6), 1, MAX_DIMS), "shape_after_crop": List(Int(0, 2 ** 31), 1, MAX_DIMS),
             "relative_size_after_crop": Num(0, 1)})
_FOREGROUND = Obj({"cases": Int(0, MAX_SITE_CASES), "mean": Finite, "m2": Num(0), "min": Opt(Num()),
                   "max": Opt(Num())})
_DATASET_INFO = DATASET_SCHEMA.extend({"channel_names": DATASET_SCHEMA.optional["channel_names"],
                                       "labels": DATASET_SCHEMA.optional["labels"],
                                       "file_ending": Str(max_len=32), "numTraining": Int(0, MAX_SITE_CASES)})
_CHANNEL = Obj({"index": Str(B64, 4 * -(-4 * MAX_BINS // 3)), "weight": Str(B64, 4 * -(-8 * MAX_BINS // 3))})

# JSON payloads of envelopes, by kind (shards are safetensors: SHARD_* below).
PAYLOADS: dict[str, Schema] = {
    "meta": Obj({"round": Count, "base": Opt(Hex64), "cases": Int(1, MAX_CASES), "metrics": _METRICS},
                {"epoch": Int(0, 2 ** 31), "clipped": Int(0, 2 ** 40)}),
    # secure aggregation (docs/design.md 7.8): a site's key material of one round, and its reveal
    "keys": Obj({"round": Count, "mask_public": Str(B64, 44), "seed_commitment": Hex64,
                 "layout": Opt(List(List(AnyJSON(), 2, 2), 1, 100_000)),  # null: FFE, the base model's
                 "shares": Map(Site, Obj({"sealed": Str(B64, 256), "mask": Hex64, "seed": Hex64}), 10_000)}),
    "reveal": Obj({"round": Count, "seal": Hex64,
                   "shares": Map(Site, Obj({"kind": Str("mask|seed", 8), "share": Str(B64, 64)}), 10_000)}),
    "final": Obj({"model": Hex64, "validation_dice": Opt(Map(Str(max_len=256), _Metric, MAX_LABELS + 1))}),
    "plan": Map(Str(max_len=256), AnyJSON(), 1000),
    "reasons": Map(Site, Str(max_len=MAX_REASON), 10_000),
    "declaration": Obj({"cases": Int(1, MAX_CASES)}),
    "summary": Obj({"format": Const("p2pfed.ffe.summary/1"), "dataset": _DATASET_INFO,
                    "cases": List(_CASE, 0, MAX_SITE_CASES), "foreground": List(_FOREGROUND, 1, MAX_CHANNELS)}),
    "histogram": Obj({"format": Const("p2pfed.ffe.histogram/1"), "bins": Int(1, MAX_BINS),
                      "ranges": List(List(Finite, 2, 2), 1, MAX_CHANNELS), "channels": List(_CHANNEL, 1, MAX_CHANNELS)}),
}


def _json_len(obj) -> int:
    return len(json.dumps(obj, separators=(",", ":")))


# Payload caps follow from the limits: the largest canonical JSON of one item, on worst
# cases (the longest float repr, 10-digit ints), times the most items.
_F, _I = -1.2345678901234567e-300, 2 ** 31
_CASE_BYTES = _json_len({"relative_size_after_crop": _F, "shape_after_crop": [_I] * MAX_DIMS,
                         "spacing": [_F] * MAX_DIMS}) + 1
_FOREGROUND_BYTES = _json_len({"cases": MAX_SITE_CASES, "m2": _F, "max": _F, "mean": _F, "min": _F}) + 1
_INFO_BYTES = 512 << 10  # dataset.json labels and channel names (MAX_LABELS names of up to 256 bytes)
PAYLOAD_MAX_BYTES: dict[str, int] = {
    "meta": 64 << 10,
    "final": 64 << 10,
    "declaration": 1 << 10,
    "reasons": 4 << 20,  # why sites were excluded from a merge: about 1000 reasons of MAX_REASON
    "plan": 1 << 20,
    "summary": MAX_SITE_CASES * _CASE_BYTES + MAX_CHANNELS * _FOREGROUND_BYTES + _INFO_BYTES,
    "histogram": MAX_CHANNELS * (_CHANNEL.required["index"].max_len + _CHANNEL.required["weight"].max_len + 64) + 4096,
    "shard": 8 + SHARD_HEADER_BYTES + SHARD_TENSOR_BYTES,
    "masked": 8 + SHARD_HEADER_BYTES + 2 * SHARD_TENSOR_BYTES,  # uint64 words: twice the float32 bytes
    "keys": 8 << 20,  # a layout of up to 100k tensors and a sealed share for each of 10k sites
    "reveal": 2 << 20,
}

# A shard's safetensors header and the p2pfed metadata inside it (docs/design.md section 5).
SHARD_TENSOR = Obj({"dtype": Str(r"[A-Z0-9_]+", 16), "shape": List(Int(0, 2 ** 40), 0, SHARD_MAX_DIMS),
                    "data_offsets": List(Int(0, 2 ** 40), 2, 2)})
SHARD_TENSORS = Map(Str(max_len=1024), SHARD_TENSOR, 100_000)  # the header without "__metadata__"
SHARD_METADATA = Obj({"p2pfed": Str(max_len=SHARD_HEADER_BYTES)})
SHARD_NAMES = Obj({"names": Map(Str(max_len=1024), List(Str(max_len=1024), 1, 100), 100_000),
                   "version": Int()})
