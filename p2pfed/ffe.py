"""Federated Fingerprint Extraction (FFE): the pure merge (docs/design.md section 6 is normative).

Every site publishes a *summary* (dataset.json compatibility info, per-case geometry, and
per-channel foreground moments and min/max aggregated over its cases), then, once all
summaries are in, a *histogram* of its foreground intensities over the federation-wide
min..max range. `merge_fingerprint` turns them into the `dataset_fingerprint.json` that
nnU-Net's DatasetFingerprintExtractor would compute on the pooled data:

* nnU-Net draws the same number of foreground voxels from every case, so the pooled
  intensity distribution is the equal-weight mixture of the per-case distributions. Its
  mean and variance follow exactly from per-case moments; its quantiles from the sum of
  per-case histograms each normalized to mass 1 (interpolated within one bin).
* spacings, shapes and relative sizes after cropping are per case, as in nnU-Net.

No I/O, no nnU-Net import; sums use math.fsum (exactly rounded, order-free) or a fixed
site-sorted order, so every member computes bit-identical output from the same payloads.
"""
from __future__ import annotations

import base64
import copy
import json
import math
from typing import Mapping, Sequence

import numpy as np

from . import schema
from .errors import ContributionRejected, DatasetError

SUMMARY_FORMAT = "p2pfed.ffe.summary/1"
HISTOGRAM_FORMAT = "p2pfed.ffe.histogram/1"
DEFAULT_BINS = schema.MAX_BINS  # the most a histogram may have (schema.PAYLOADS["histogram"])
# dataset.json fields that must agree across the federation (absent == absent).
COMPAT_FIELDS = ("channel_names", "labels", "regions_class_order", "file_ending",
                 "overwrite_image_reader_writer")
QUANTILES = {"median": 0.5, "percentile_99_5": 0.995, "percentile_00_5": 0.005}
# Plans fields that name the local dataset rather than describe the data.
SITE_SPECIFIC_PLAN_KEYS = ("dataset_name",)


# --- dataset.json compatibility ------------------------------------------------------------

def dataset_info(dataset_json: Mapping) -> dict:
    """The part of a dataset.json that members compare, plus numTraining."""
    missing = [k for k in ("channel_names", "labels", "file_ending", "numTraining") if k not in dataset_json]
    if missing:
        raise DatasetError(f"dataset.json lacks {', '.join(missing)}")
    info = {k: dataset_json[k] for k in COMPAT_FIELDS if k in dataset_json}
    info["numTraining"] = int(dataset_json["numTraining"])
    return info


def merge_dataset_info(infos: Mapping[str, Mapping], *, same_modalities: bool = True) -> dict:
    """Check that all sites declare the same labels, channels and file ending; sum numTraining.

    Without `same_modalities` (asym: each site plans and normalizes its own data) only the
    channels' number and order must agree, the input of the shared first convolution; a
    CT site and an MRI site may then federate."""
    sites = sorted(infos)
    if not sites:
        raise ValueError("no sites to merge")
    first = infos[sites[0]]
    for site in sites[1:]:
        for field in COMPAT_FIELDS:
            mine, theirs = infos[site].get(field), first.get(field)
            if field == "channel_names" and not same_modalities:
                mine, theirs = sorted(mine or {}), sorted(theirs or {})  # the channels, not their names
                if mine != theirs:
                    raise DatasetError(
                        f"site {site}: dataset.json has channels {', '.join(mine)}, "
                        f"but site {sites[0]} has {', '.join(theirs)}",
                        "asym members may image in other modalities, but need the same number of input channels")
            elif mine != theirs:
                hint = ("all members must declare the same channel_names, labels and file_ending"
                        + ("; sites with other modalities can federate with --mode asym"
                           if field == "channel_names" else ""))
                raise DatasetError(f"site {site}: dataset.json {field} is {json.dumps(mine)}, "
                                   f"but site {sites[0]} has {json.dumps(theirs)}", hint)
    merged = {k: first[k] for k in COMPAT_FIELDS if k in first}
    merged["numTraining"] = sum(int(infos[s]["numTraining"]) for s in sites)
    return merged


# --- site side: building the payloads ------------------------------------------------------

def case_moments(values: np.ndarray) -> dict | None:
    """Moments of one case's foreground voxels in one channel (None if it has none)."""
    if values.size == 0:
        return None
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    return {"n": int(v.size), "mean": mean, "var": float(np.mean((v - mean) ** 2)),
            "min": float(v.min()), "max": float(v.max())}


def site_summary(info: Mapping, cases: Sequence[Mapping], moments: Sequence[Sequence[dict | None]]) -> dict:
    """The summary payload from per-case geometry and per-case, per-channel `case_moments`.

    Per channel only the site's equal-weight mixture is kept (cases with foreground, their
    mean, m2 = cases x mixture variance, min, max): enough for the exact federated mean and
    std (Chan et al.'s pairwise update), and less revealing than per-case moments."""
    foreground = []
    for channel in zip(*moments):
        present = [m for m in channel if m is not None]
        if not present:
            foreground.append({"cases": 0, "mean": 0.0, "m2": 0.0, "min": None, "max": None})
            continue
        mean = math.fsum(m["mean"] for m in present) / len(present)
        m2 = math.fsum(m["var"] + (m["mean"] - mean) ** 2 for m in present)
        foreground.append({"cases": len(present), "mean": mean, "m2": m2,
                           "min": min(m["min"] for m in present), "max": max(m["max"] for m in present)})
    return {"format": SUMMARY_FORMAT, "dataset": dict(info), "cases": [dict(c) for c in cases],
            "foreground": foreground}


def _bin_range(lo: float, hi: float) -> tuple[float, float]:
    # np.histogram widens an empty range the same way; the inversion must agree with it.
    return (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)


def case_histogram(values: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    """One case's foreground histogram over [lo, hi] normalized to mass 1 (float64).

    Normalizing per case weights cases equally, as nnU-Net's per-case sampling does."""
    counts, _ = np.histogram(values, bins=bins, range=_bin_range(lo, hi))
    if counts.sum() != values.size:
        raise DatasetError("foreground intensities outside the federation's range: "
                           "the dataset changed since the summary was published",
                           "restart the fingerprint exchange")
    return counts / np.float64(values.size)


def histogram_payload(ranges: Sequence[Sequence[float]], bins: int, dense: Sequence[np.ndarray]) -> dict:
    """Encode per-channel dense histograms sparsely: nonzero bin indices (uint32 LE) and
    their weights (float64 LE), both base64."""
    channels = []
    for h in dense:
        index = np.flatnonzero(h).astype("<u4")
        channels.append({"index": base64.b64encode(index.tobytes()).decode(),
                         "weight": base64.b64encode(np.asarray(h[index], dtype="<f8").tobytes()).decode()})
    return {"format": HISTOGRAM_FORMAT, "bins": int(bins), "ranges": [[float(a), float(b)] for a, b in ranges],
            "channels": channels}


def _decode_channel(site: str, channel: Mapping, bins: int) -> np.ndarray:
    try:
        index = np.frombuffer(base64.b64decode(channel["index"], validate=True), dtype="<u4")
        weight = np.frombuffer(base64.b64decode(channel["weight"], validate=True), dtype="<f8")
    except (KeyError, TypeError, ValueError):  # binascii.Error is a ValueError
        index, weight = None, ()
    if (index is None or len(index) != len(weight) or np.any(np.diff(index.astype(np.int64)) <= 0)
            or (len(index) and index[-1] >= bins) or not np.all(np.isfinite(weight)) or np.any(weight < 0)):
        raise ContributionRejected(f"site {site}: malformed histogram")
    dense = np.zeros(bins, dtype=np.float64)
    dense[index] = weight
    return dense


# --- the merge -----------------------------------------------------------------------------

def _summaries_checked(summaries: Mapping[str, Mapping]) -> tuple[list[str], dict]:
    """Sorted site names and the merged dataset info; rejects malformed summaries."""
    sites = sorted(summaries)
    if not sites:
        raise ValueError("no summaries")
    info = merge_dataset_info({s: summaries[s]["dataset"] for s in sites})
    for s in sites:
        summary = summaries[s]
        schema.check(schema.PAYLOADS["summary"], summary, "summary",
                     lambda m, hint=None, s=s: ContributionRejected(f"site {s}: malformed fingerprint summary ({m})"))
        try:  # what the schema cannot say: fields that must agree with each other
            if len(summary["foreground"]) != len(info["channel_names"]):
                raise ValueError("one foreground entry per channel expected")
            for c in summary["cases"]:
                if len(c["spacing"]) != len(c["shape_after_crop"]) or not 0 < c["relative_size_after_crop"] <= 1:
                    raise ValueError("bad case geometry")
            for f in summary["foreground"]:
                if f["cases"] and (f["min"] is None or f["max"] is None or not f["min"] <= f["max"]):
                    raise ValueError("foreground statistics without a min..max range")
        except ValueError as e:
            raise ContributionRejected(f"site {s}: malformed fingerprint summary ({e})") from None
    return sites, info


def global_ranges(summaries: Mapping[str, Mapping]) -> list[list[float]]:
    """Per channel, the federation-wide [min, max] of foreground intensities."""
    sites, info = _summaries_checked(summaries)
    return _ranges(sites, len(info["channel_names"]), summaries)


def _ranges(sites: Sequence[str], n_channels: int, summaries: Mapping[str, Mapping]) -> list[list[float]]:
    ranges = []
    for ch in range(n_channels):
        stats = [summaries[s]["foreground"][ch] for s in sites if summaries[s]["foreground"][ch]["cases"]]
        if not stats:
            raise DatasetError(f"channel {ch}: no case of any site has foreground voxels")
        ranges.append([float(min(f["min"] for f in stats)), float(max(f["max"] for f in stats))])
    return ranges


def _pooled_moments(stats: Sequence[Mapping]) -> tuple[float, float, int]:
    """Mean and (population) std of the equal-weight mixture of all cases, and their count."""
    cases = sum(f["cases"] for f in stats)
    mean = math.fsum(f["cases"] * f["mean"] for f in stats) / cases
    m2 = math.fsum(f["m2"] + f["cases"] * (f["mean"] - mean) ** 2 for f in stats)
    return mean, math.sqrt(max(m2, 0.0) / cases), cases


def _quantile(pmf: np.ndarray, lo: float, hi: float, q: float) -> float:
    """Inverse of the histogram's CDF, with mass spread uniformly within each bin.

    Where the CDF equals q exactly over a gap (whole cases below and above, e.g. sites with
    disjoint intensity ranges and half of the cases on each side), np.percentile on nnU-Net's
    q*M-th and next sample gives a + (1 - q) * (b - a), a and b the values around the gap."""
    cdf = np.cumsum(pmf)  # sequential: the same bits everywhere
    target, tol = q * cdf[-1], 1e-9 * cdf[-1]
    k = min(int(np.searchsorted(cdf, target - tol, side="left")), len(pmf) - 1)
    start, stop = _bin_range(lo, hi)
    width = (stop - start) / len(pmf)
    above = np.flatnonzero(pmf[k + 1:])
    if abs(cdf[k] - target) <= tol and above.size:
        a, b = k + 1, k + 1 + above[0]  # upper edge of bin k, lower edge of the next nonempty bin
        return float(start + (a + (1 - q) * (b - a)) * width)
    below = cdf[k - 1] if k else 0.0
    frac = (target - below) / pmf[k] if pmf[k] > 0 else 0.0
    return float(start + (k + min(max(float(frac), 0.0), 1.0)) * width)


def _channel_histograms(sites: Sequence[str], histograms: Mapping[str, Mapping],
                        summaries: Mapping[str, Mapping], ranges: list) -> tuple[list, list[np.ndarray]]:
    """The histograms' common bin ranges (covering `ranges`, normally equal to them) and, per
    channel, the sum over sites (sorted order) of the decoded, checked histograms."""
    if set(histograms) != set(sites):
        raise ContributionRejected(f"histograms from {sorted(histograms)}, summaries from {list(sites)}")
    for s in sites:
        schema.check(schema.PAYLOADS["histogram"], histograms[s], "histogram",
                     lambda m, hint=None, s=s: ContributionRejected(f"site {s}: malformed histogram ({m})"))
    bins, grid = histograms[sites[0]]["bins"], histograms[sites[0]]["ranges"]
    totals = [np.zeros(bins) for _ in ranges]
    for s in sites:
        h = histograms[s]
        if h.get("format") != HISTOGRAM_FORMAT or h.get("bins") != bins or h.get("ranges") != grid \
                or len(grid) != len(ranges) or len(h.get("channels", ())) != len(ranges) \
                or any(not a <= lo <= hi <= b for (a, b), (lo, hi) in zip(grid, ranges)):
            raise ContributionRejected(f"site {s}: histogram is not over this federation's ranges and bins")
        for ch, (total, channel) in enumerate(zip(totals, h["channels"])):
            dense = _decode_channel(s, channel, bins)
            expected = summaries[s]["foreground"][ch]["cases"]
            if abs(math.fsum(dense) - expected) > 1e-6 * max(1, expected):
                raise ContributionRejected(
                    f"site {s}: channel {ch} histogram mass {math.fsum(dense):.6g} != {expected} cases "
                    "(its data changed between summary and histogram?)")
            total += dense
    return grid, totals


def merge_fingerprint(summaries: Mapping[str, Mapping], histograms: Mapping[str, Mapping]) -> dict:
    """The pooled nnU-Net dataset fingerprint (dataset_fingerprint.json content).

    Cases are listed site by site (sites sorted by name), each site in its own case order."""
    sites, info = _summaries_checked(summaries)
    ranges = _ranges(sites, len(info["channel_names"]), summaries)
    grid, totals = _channel_histograms(sites, histograms, summaries, ranges)
    cases = [c for s in sites for c in summaries[s]["cases"]]
    properties = {}
    for ch, ((lo, hi), (start, stop), total) in enumerate(zip(ranges, grid, totals)):
        mean, std, n_cases = _pooled_moments([summaries[s]["foreground"][ch] for s in sites])
        q = {k: min(max(_quantile(total / n_cases, start, stop, p), lo), hi) for k, p in QUANTILES.items()}
        # key order as nnU-Net writes it
        properties[str(ch)] = {"mean": mean, "median": q["median"], "std": std, "min": lo, "max": hi,
                               "percentile_99_5": q["percentile_99_5"], "percentile_00_5": q["percentile_00_5"]}
    return {
        "spacings": [[float(v) for v in c["spacing"]] for c in cases],
        "shapes_after_crop": [[int(v) for v in c["shape_after_crop"]] for c in cases],
        "foreground_intensity_properties_per_channel": properties,
        "median_relative_size_after_cropping": float(np.median([c["relative_size_after_crop"] for c in cases])),
    }


def reference_merge(fingerprints: Mapping[str, Mapping]) -> dict:
    """The reference FednnU-Net rule, for comparison only: per-site nnU-Net fingerprints
    merged by concatenation (spacings, shapes), min/max, and case-count-weighted means of
    everything else (mean, median, std, percentiles, median relative size)."""
    sites = sorted(fingerprints)
    weights = [len(fingerprints[s]["spacings"]) for s in sites]

    def weighted(values):
        return math.fsum(w * v for w, v in zip(weights, values)) / sum(weights)

    properties = {}
    for ch in fingerprints[sites[0]]["foreground_intensity_properties_per_channel"]:
        per_site = [fingerprints[s]["foreground_intensity_properties_per_channel"][ch] for s in sites]
        properties[str(ch)] = {k: (min if k == "min" else max if k == "max" else weighted)([p[k] for p in per_site])
                               for k in per_site[0]}
    return {
        "spacings": [list(v) for s in sites for v in fingerprints[s]["spacings"]],
        "shapes_after_crop": [list(v) for s in sites for v in fingerprints[s]["shapes_after_crop"]],
        "foreground_intensity_properties_per_channel": properties,
        "median_relative_size_after_cropping": weighted(
            [fingerprints[s]["median_relative_size_after_cropping"] for s in sites]),
    }


# --- plans ---------------------------------------------------------------------------------

def plan_summary(plans: Mapping) -> dict:
    """The data-dependent part of an nnU-Net plans.json: everything but the local dataset name
    (spacing, patch and batch size, architecture, normalization, intensity properties,
    transpose, ...)."""
    return {k: copy.deepcopy(v) for k, v in plans.items() if k not in SITE_SPECIFIC_PLAN_KEYS}


def plan_diff(a, b, rel_tol: float = 0.0, _path: str = "") -> list[str]:
    """Dotted paths where two JSON-like trees differ, with both values.

    Numbers compare with math.isclose(rel_tol); bools, ints in lists and strings exactly."""
    where = _path or "<root>"
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            sub = f"{_path}.{k}" if _path else str(k)
            if k not in a or k not in b:
                out.append(f"{sub}: only in {'first' if k in a else 'second'}")
            else:
                out += plan_diff(a[k], b[k], rel_tol, sub)
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: {json.dumps(a)} != {json.dumps(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in plan_diff(x, y, rel_tol, f"{_path}[{i}]")]
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        same = a == b or math.isclose(a, b, rel_tol=rel_tol)
    else:
        same = type(a) is type(b) and a == b
    return [] if same else [f"{where}: {json.dumps(a)} != {json.dumps(b)}"]
