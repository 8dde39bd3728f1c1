"""Weight merges: AsymFedAvg and FedAvg as one pure function (docs/design.md, section 5).

Pure: arrays in, arrays out; no I/O, no logging, no torch import. Every site runs
this merge itself, so the result must be the same bits on any CPU, with any thread
count, whatever order the inputs came in:

- sites are visited in sorted name order;
- each term is `acc = acc + (x * w)`: a float64 multiply, then a float64 add, each a
  separate element-wise numpy op (no fused multiply-add, no reduction whose order
  depends on the SIMD width or the thread count);
- the sum is divided once by the float64 sum of the weights (normalized *after*
  accumulation: with integer case counts every product `x * w` is exact, so only
  the additions and the one division round), then cast once to float32.

Layers are matched by their *structural key* (`structural_keys`), not by raw name:
prefixes from torch.compile and DataParallel are dropped, and the decoder stages of
dynamic_network_architectures UNets, numbered from the bottleneck, are renamed by
their resolution level counted from the input.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterable, Mapping

import numpy as np

from .errors import ContributionRejected

WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile, (Distributed)DataParallel
LAYER_MODES = ("subset", "intersection")

# dynamic_network_architectures PlainConvUNet / ResidualEncoderUNet (and nnU-Net's
# aliases of the encoder under decoder.encoder.*). Groups: (part, index, rest).
_UNET_KEY = re.compile(
    r"^(?P<part>encoder\.stem|decoder\.encoder\.stem"
    r"|encoder\.stages|decoder\.encoder\.stages"
    r"|decoder\.stages|decoder\.transpconvs|decoder\.seg_layers)"
    r"(?:\.(?P<index>\d+))?\.(?P<rest>.+)$"
)
_DECODER_PARTS = ("decoder.stages", "decoder.transpconvs", "decoder.seg_layers")


@dataclass(frozen=True)
class Layer:
    """One stored tensor of a site: its names (the first is the canonical one, the
    others alias the same storage) and its value as a float32 array."""

    names: tuple[str, ...]
    array: np.ndarray


# --------------------------------------------------------------------------- structural keys
def strip_prefixes(name: str) -> str:
    """Drop leading torch.compile / DataParallel wrapper prefixes, in any nesting."""
    while True:
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        else:
            return name


def structural_keys(names: Iterable[str]) -> dict[str, str]:
    """Map each state-dict key of one network to its structural key.

    For a dynamic_network_architectures UNet (every key under encoder.stem,
    encoder.stages, decoder.stages, decoder.transpconvs, decoder.seg_layers or the
    decoder.encoder alias, with one decoder stage per encoder stage but the
    bottleneck), each stage index becomes `L<level>`, the resolution level counted
    from the input (0 = full resolution): encoder stage s is level s, decoder stage,
    transposed convolution and segmentation head i of an n-stage encoder are level
    n-2-i. Any other architecture keeps its plain (prefix-stripped) names.
    """
    names = list(names)
    plain = {name: strip_prefixes(name) for name in names}
    parsed = {name: _UNET_KEY.match(key) for name, key in plain.items()}
    levels = _unet_levels(parsed.values())
    if levels is None:
        return plain
    return {name: _unet_key(m, levels) for name, m in parsed.items()}


def _unet_levels(matches: Iterable[re.Match | None]) -> dict[tuple[str, int], int] | None:
    """(part, index) -> resolution level, or None when the keys are not a known UNet."""
    indices: dict[str, set[int]] = {}
    for m in matches:
        stem = m is not None and m["part"].endswith("stem")
        if m is None or stem == (m["index"] is not None):  # unknown key, or stem with index
            return None
        if not stem:
            indices.setdefault(m["part"], set()).add(int(m["index"]))
    n = len(indices.get("encoder.stages", ()))
    if n < 2 or indices["encoder.stages"] != set(range(n)) \
            or not indices.get("decoder.encoder.stages", set()) <= set(range(n)) \
            or any(indices.get(part) != set(range(n - 1)) for part in _DECODER_PARTS):
        return None
    levels = {(part, i): i for part in ("encoder.stages", "decoder.encoder.stages") for i in range(n)}
    levels.update({(part, i): n - 2 - i for part in _DECODER_PARTS for i in range(n - 1)})
    return levels


def _unet_key(m: re.Match, levels: Mapping[tuple[str, int], int]) -> str:
    if m["index"] is None:
        return f"{m['part']}.{m['rest']}"
    return f"{m['part']}.L{levels[m['part'], int(m['index'])]}.{m['rest']}"


# --------------------------------------------------------------------------- one site's layers
def canonical_layers(state_dict: Mapping[str, Any], site: str) -> dict[str, Layer]:
    """Validate one site's state dict and key its distinct storages by structural key.

    Accepts numpy arrays and torch tensors (float32 only). Names that alias one
    storage (nnU-Net's decoder.encoder.* and all_modules.*) become one Layer whose
    canonical name is the shortest, then alphabetically first, prefix-stripped name,
    so every site picks the same one. Raises ContributionRejected naming the site and
    the tensor for a wrong dtype, non-finite values or colliding structural keys.
    """
    arrays = {name: as_float32(value, site, name) for name, value in state_dict.items()}
    groups: dict[tuple, list[str]] = {}
    for name, array in arrays.items():
        groups.setdefault(_storage_id(array, name), []).append(name)
    skeys = structural_keys(arrays)
    layers: dict[str, Layer] = {}
    for aliases in groups.values():
        names = tuple(sorted(aliases, key=alias_order))
        skey = skeys[names[0]]
        if skey in layers:
            raise ContributionRejected(
                f"site {site!r}: tensors {layers[skey].names[0]!r} and {names[0]!r} are the same layer {skey!r}")
        layers[skey] = Layer(names, arrays[names[0]])
    return layers


def alias_order(name: str) -> tuple:
    """Sort key among the names of one storage: the first is its canonical name."""
    plain = strip_prefixes(name)
    return (plain.count("."), plain, name)


def check_layout(entries: Iterable[tuple[str, tuple[str, ...]]], site: str) -> None:
    """Check (structural key, alias names) pairs read from a site's shards against the
    names alone: no name twice, canonical name first, structural key as computed.
    So shards cannot claim a layer match that the site's own key names do not give."""
    entries = list(entries)
    names = [name for _, aliases in entries for name in aliases]
    if len(set(names)) != len(names):
        raise ContributionRejected(f"site {site!r}: a tensor name appears twice in its shards")
    skeys = structural_keys(names)
    for skey, aliases in entries:
        if not aliases or list(aliases) != sorted(aliases, key=alias_order) or skeys[aliases[0]] != skey:
            raise ContributionRejected(f"site {site!r}: tensor {skey!r} is stored under a wrong key or name order")


def as_float32(value: Any, site: str, name: str) -> np.ndarray:
    """The value as a numpy array (a view, no copy), checked: float32 and finite.
    Raises ContributionRejected naming the site and the tensor."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        if str(value.dtype) != "torch.float32":
            raise ContributionRejected(f"site {site!r}: tensor {name!r} has dtype {value.dtype}, expected float32")
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise ContributionRejected(f"site {site!r}: tensor {name!r} is a {type(value).__name__}, not an array")
    if value.dtype != np.float32:
        raise ContributionRejected(f"site {site!r}: tensor {name!r} has dtype {value.dtype}, expected float32")
    if not np.isfinite(value).all():
        raise ContributionRejected(f"site {site!r}: tensor {name!r} has non-finite values (NaN or infinity)")
    return value


def _storage_id(array: np.ndarray, name: str) -> tuple:
    """Equal for two arrays that view the same bytes the same way (an alias)."""
    if array.size == 0:  # empty arrays may share any address: never aliases
        return ("empty", name)
    return (array.__array_interface__["data"][0], array.shape, array.strides)


# --------------------------------------------------------------------------- the weights
def capped_weights(cases: Mapping[str, int], cap: Fraction | None) -> dict[str, Fraction]:
    """Merge weights from case counts such that no site's share of the total exceeds `cap`.

    Water-filling, exact in fractions: sites over the cap are capped, the rest keep
    weights proportional to their case counts, repeated until no site is over. A capped
    site's weight is cap x U / (1 - k x cap) (U: the uncapped sites' cases, k: capped
    sites), so its share is exactly `cap` and the uncapped weights stay the integer
    case counts. When cap x n <= 1 no distribution but the uniform one can come closer
    (with n x cap < 1 none satisfies the cap): every site gets weight 1.
    Depends on the mapping only, not on its order."""
    sites = sorted(cases)
    if cap is None:
        return {s: Fraction(cases[s]) for s in sites}
    if cap * len(sites) <= 1:
        return {s: Fraction(1) for s in sites}
    capped: set[str] = set()
    while True:
        free = sum(cases[s] for s in sites if s not in capped)
        level = cap * free / (1 - cap * len(capped))  # the weight of a capped site
        over = {s for s in sites if s not in capped and cases[s] > level}
        if not over:
            return {s: level if s in capped else Fraction(cases[s]) for s in sites}
        capped |= over


def as_merge_weights(weights: Mapping[str, Fraction]) -> dict[str, int | float]:
    """The one conversion to numbers the merge multiplies with: integers stay exact,
    a capped weight is rounded once to the nearest float64 (Fraction.__float__)."""
    return {s: int(w) if w.denominator == 1 else float(w) for s, w in sorted(weights.items())}


# --------------------------------------------------------------------------- the merge
def check_weights(weights: Mapping[str, Any] | None, sites: Iterable[str]) -> dict[str, np.float64]:
    """Each site's weight as float64 (uniform 1.0 when `weights` is None).

    Raises ValueError when the sites differ from the models' sites, and
    ContributionRejected for a weight that is not a positive finite number."""
    sites = sorted(sites)
    if weights is None:
        return {site: np.float64(1.0) for site in sites}
    if sorted(weights) != sites:
        raise ValueError(f"weights are given for sites {sorted(weights)}, models for {sites}")
    checked = {}
    for site in sites:
        w = weights[site]
        if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)) \
                or not np.isfinite(w) or w <= 0:
            raise ContributionRejected(f"site {site!r}: weight {w!r} is not a positive finite number")
        checked[site] = np.float64(w)
    return checked


def merge_layer(holders: Mapping[str, np.ndarray], weights: Mapping[str, np.float64],
                n_sites: int, layers: str = "subset") -> dict[str, np.ndarray]:
    """Merge one structural key across the sites that hold it.

    Sites whose arrays have the same shape form a group. A group is averaged when it
    has two sites or more ("subset") or every one of `n_sites` sites ("intersection");
    its members all get the same read-only result. Other sites keep their array.
    """
    by_shape: dict[tuple, list[str]] = {}
    for site in sorted(holders):
        by_shape.setdefault(holders[site].shape, []).append(site)
    needed = 2 if layers == "subset" else max(n_sites, 2)
    out = {}
    for group in by_shape.values():
        if len(group) >= needed:
            merged = weighted_mean([holders[s] for s in group], [weights[s] for s in group])
            out.update((site, merged) for site in group)
        else:
            out.update((site, holders[site]) for site in group)
    return out


def weighted_mean(arrays: list[np.ndarray], weights: list[np.float64]) -> np.ndarray:
    """sum(x_i * w_i) / sum(w_i) in float64, in the given order, cast once to float32.

    Every op is element-wise and separate (multiply, then add), so each element's
    result depends only on that element: no SIMD-width or thread-count effects."""
    acc = np.zeros(arrays[0].shape, dtype=np.float64)
    total = np.float64(0.0)
    term = np.empty_like(acc)
    for x, w in zip(arrays, weights):
        np.multiply(x, w, out=term, dtype=np.float64)
        np.add(acc, term, out=acc)
        total = total + w
    np.divide(acc, total, out=acc)
    merged = acc.astype(np.float32)
    merged.flags.writeable = False
    return merged


def asym_fedavg(models: Mapping[str, Mapping[str, Any]], weights: Mapping[str, Any] | None = None,
                layers: str = "subset") -> dict[str, dict[str, np.ndarray]]:
    """AsymFedAvg: each site's complete merged state dict.

    models:  site name -> state dict (name -> numpy array or torch tensor, float32).
    weights: site name -> positive weight (the federation uses case counts);
             None means uniform.
    layers:  "subset" averages each layer over the sites that share it (same
             structural key and shape); "intersection" only layers that every site
             has. With identical architectures (FFE) both are plain FedAvg and every
             site gets the same dict.

    Returns site -> {name: float32 array} with exactly the site's own keys, in its
    order: shared layers replaced by their weighted mean, other layers copied
    unchanged; aliased names share one array. The arrays are read-only and may be
    shared between sites: copy before changing them in place.

    With layers="intersection" and weights=None this is the reference rule
    (FednnU-Net): the element-wise mean over sites of each tensor whose key and
    shape match in all sites, with keys matched structurally.
    """
    if layers not in LAYER_MODES:
        raise ValueError(f"layers must be one of {LAYER_MODES}, not {layers!r}")
    sites = sorted(models)
    w = check_weights(weights, sites)
    canon = {site: canonical_layers(models[site], site) for site in sites}
    merged: dict[str, dict[str, np.ndarray]] = {site: {} for site in sites}
    for skey in sorted(set().union(*canon.values())):
        holders = {site: canon[site][skey].array for site in sites if skey in canon[site]}
        for site, array in merge_layer(holders, w, len(sites), layers).items():
            merged[site][skey] = array
    return {site: _expand(models[site], canon[site], merged[site]) for site in sites}


def _expand(state_dict: Mapping[str, Any], canon: Mapping[str, Layer],
            merged: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Give every name of the site its layer's merged (or read-only copied) value."""
    by_name = {}
    for skey, layer in canon.items():
        value = merged[skey]
        if value is layer.array:  # untouched: copy, so the result never views the input
            value = np.array(value, dtype=np.float32)
            value.flags.writeable = False
        by_name.update((name, value) for name in layer.names)
    return {name: by_name[name] for name in state_dict}
