"""The FFE merge (p2pfed.ffe) against numpy on synthetic intensities: no nnU-Net, no files."""
import json
import math

import numpy as np
import pytest

from p2pfed import ffe
from p2pfed.errors import ContributionRejected, DatasetError

INFO = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "file_ending": ".nii.gz"}
BINS = 2 ** 14


def _site(rng, n_cases, loc, scale, spacing):
    """Per-case foreground intensities (sizes dividing 400) and geometry of one site."""
    values = [rng.normal(loc + rng.normal(0, scale), scale, rng.choice([50, 100, 200, 400]))
              for _ in range(n_cases)]
    cases = [{"spacing": [999.0, spacing, spacing], "shape_after_crop": [1, int(rng.integers(30, 60)), 48],
              "relative_size_after_crop": float(rng.uniform(0.4, 1.0))} for _ in range(n_cases)]
    return values, cases


@pytest.fixture(scope="module")
def federation():
    """Three sites with different intensity distributions and case counts; the pooled truth
    is the equal-weight mixture of all cases, built by tiling each case to 400 values."""
    rng = np.random.default_rng(7)
    sites = {"c": _site(rng, 3, 300.0, 40.0, 1.4), "a": _site(rng, 5, 40.0, 10.0, 1.0),
             "b": _site(rng, 4, 120.0, 25.0, 0.8)}
    summaries = {
        s: ffe.site_summary({**INFO, "numTraining": len(v)}, cases, [[ffe.case_moments(x)] for x in v])
        for s, (v, cases) in sites.items()}
    ranges = ffe.global_ranges(summaries)
    histograms = {
        s: ffe.histogram_payload(ranges, BINS, [sum(ffe.case_histogram(x, *ranges[0], BINS) for x in v)])
        for s, (v, _) in sites.items()}
    pooled = np.concatenate([np.tile(x, 400 // x.size) for s in sorted(sites) for x in sites[s][0]])
    return sites, summaries, histograms, ranges, pooled


def test_merge_equals_the_equal_weight_mixture(federation):
    sites, summaries, histograms, ((lo, hi),), pooled = federation
    fp = ffe.merge_fingerprint(summaries, histograms)
    props = fp["foreground_intensity_properties_per_channel"]["0"]
    assert math.isclose(props["mean"], pooled.mean(), rel_tol=1e-12)
    assert math.isclose(props["std"], pooled.std(), rel_tol=1e-12)
    assert (props["min"], props["max"]) == (pooled.min(), pooled.max())
    bin_width = (hi - lo) / BINS
    for key, q in ffe.QUANTILES.items():
        assert abs(props[key] - np.percentile(pooled, 100 * q)) < 2 * bin_width, key
    cases = [c for s in sorted(sites) for c in sites[s][1]]
    assert fp["spacings"] == [c["spacing"] for c in cases]  # site-sorted, then case order
    assert fp["shapes_after_crop"] == [c["shape_after_crop"] for c in cases]
    assert fp["median_relative_size_after_cropping"] == np.median([c["relative_size_after_crop"] for c in cases])


def test_merge_is_order_free_and_plain_json(federation):
    _, summaries, histograms, _, _ = federation
    forward = ffe.merge_fingerprint(summaries, histograms)
    backward = ffe.merge_fingerprint(dict(reversed(summaries.items())), dict(reversed(histograms.items())))
    assert json.dumps(forward) == json.dumps(backward)

    def leaves(x):
        return [v for y in x.values() for v in leaves(y)] if isinstance(x, dict) else \
            [v for y in x for v in leaves(y)] if isinstance(x, list) else [x]
    assert {type(v) for v in leaves(forward)} <= {float, int}


def test_reference_rule_drops_between_site_variance(federation):
    sites, summaries, histograms, _, pooled = federation
    per_site = {s: ffe.merge_fingerprint({s: summaries[s]}, {s: histograms[s]}) for s in sites}
    ref = ffe.reference_merge(per_site)["foreground_intensity_properties_per_channel"]["0"]
    weights = [len(sites[s][0]) for s in sorted(sites)]
    stds = [per_site[s]["foreground_intensity_properties_per_channel"]["0"]["std"] for s in sorted(sites)]
    assert math.isclose(ref["std"], np.average(stds, weights=weights), rel_tol=1e-12)
    assert ref["std"] < 0.5 * pooled.std()  # sites sit far apart: the rule loses most of the spread
    assert ffe.reference_merge(per_site)["spacings"] == ffe.merge_fingerprint(summaries, histograms)["spacings"]


def test_gap_in_the_distribution_matches_np_percentile():
    # Two equally many cases on either side of a gap: the median is flat over the gap, and
    # np.percentile (nnU-Net) takes the midpoint of the two samples around it.
    low, high = np.linspace(10.0, 20.0, 100), np.linspace(80.0, 90.0, 100)
    geometry = [{"spacing": [1.0, 1.0], "shape_after_crop": [10, 10], "relative_size_after_crop": 1.0}] * 2
    moments = [[ffe.case_moments(low)], [ffe.case_moments(high)]]
    summary = ffe.site_summary({**INFO, "numTraining": 2}, geometry, moments)
    hist = ffe.histogram_payload([[10.0, 90.0]], BINS, [ffe.case_histogram(low, 10.0, 90.0, BINS)
                                                        + ffe.case_histogram(high, 10.0, 90.0, BINS)])
    fp = ffe.merge_fingerprint({"s": summary}, {"s": hist})
    median = fp["foreground_intensity_properties_per_channel"]["0"]["median"]
    assert abs(median - np.percentile(np.concatenate([low, high]), 50)) < 2 * 80.0 / BINS  # 50.0, mid-gap


def test_cases_without_foreground_are_left_out_as_nnunet_does():
    a, b, empty = np.array([1.0, 2.0, 3.0]), np.array([10.0, 14.0]), np.array([])
    summary = ffe.site_summary({**INFO, "numTraining": 3}, [], [[ffe.case_moments(v)] for v in (a, empty, b)])
    mixture = np.concatenate([a, a, b, b, b])  # equal weight for the two cases with foreground
    assert summary["foreground"][0]["cases"] == 2
    assert math.isclose(summary["foreground"][0]["mean"], mixture.mean())
    assert math.isclose(summary["foreground"][0]["m2"], 2 * mixture.var())


def test_incompatible_dataset_json_names_site_and_field(federation):
    _, summaries, histograms, _, _ = federation
    bad = json.loads(json.dumps(summaries))
    bad["b"]["dataset"]["labels"] = {"background": 0, "tumour": 1}
    with pytest.raises(DatasetError, match=r"site b: dataset.json labels .* site a has"):
        ffe.merge_fingerprint(bad, histograms)
    bad["b"]["dataset"] = {**summaries["b"]["dataset"], "file_ending": ".nrrd"}
    with pytest.raises(DatasetError, match="site b: dataset.json file_ending"):
        ffe.global_ranges(bad)
    assert ffe.merge_dataset_info({s: summaries[s]["dataset"] for s in summaries})["numTraining"] == 12


def test_asym_lets_the_modalities_differ_but_not_the_number_of_channels():
    ct, mri = {**INFO, "numTraining": 5}, {**INFO, "channel_names": {"0": "MRI"}, "numTraining": 6}
    with pytest.raises(DatasetError, match="channel_names") as refused:  # one plan normalizes every site alike
        ffe.merge_dataset_info({"a": ct, "b": mri})
    assert "--mode asym" in refused.value.hint
    assert ffe.merge_dataset_info({"a": ct, "b": mri}, same_modalities=False)["numTraining"] == 11
    two = {**mri, "channel_names": {"0": "MRI", "1": "CT"}}
    with pytest.raises(DatasetError, match="site b: dataset.json has channels 0, 1, but site a has 0"):
        ffe.merge_dataset_info({"a": ct, "b": two}, same_modalities=False)
    with pytest.raises(DatasetError, match="labels"):  # the labels still must agree
        ffe.merge_dataset_info({"a": ct, "b": {**mri, "labels": {"background": 0, "tumour": 1}}},
                               same_modalities=False)


def test_histograms_that_do_not_fit_are_rejected(federation):
    _, summaries, histograms, ranges, _ = federation
    other_ranges = {**histograms, "a": {**histograms["a"], "ranges": [[0.0, 1.0]]}}
    with pytest.raises(ContributionRejected, match="site a"):
        ffe.merge_fingerprint(summaries, other_ranges)
    half = ffe.histogram_payload(ranges, BINS, [np.full(BINS, 1.0 / BINS)])  # mass 1, site b has 4 cases
    with pytest.raises(ContributionRejected, match="site b: channel 0 histogram mass"):
        ffe.merge_fingerprint(summaries, {**histograms, "b": half})
    missing_c = r"histograms from \['a', 'b'\], summaries from \['a', 'b', 'c'\]"
    with pytest.raises(ContributionRejected, match=missing_c):
        ffe.merge_fingerprint(summaries, {s: histograms[s] for s in ("a", "b")})
    garbled = {**histograms, "c": {**histograms["c"], "channels": [{"index": "AAAA", "weight": ""}]}}
    with pytest.raises(ContributionRejected, match="site c: malformed histogram"):
        ffe.merge_fingerprint(summaries, garbled)


def test_malformed_summary_is_rejected(federation):
    _, summaries, _, _, _ = federation
    bad = json.loads(json.dumps(summaries))
    bad["a"]["foreground"][0]["mean"] = float("nan")
    with pytest.raises(ContributionRejected, match="site a: malformed"):
        ffe.global_ranges(bad)


def test_values_outside_the_federation_range_are_a_dataset_error():
    with pytest.raises(DatasetError, match="changed since the summary"):
        ffe.case_histogram(np.array([0.0, 5.0]), 1.0, 5.0, 16)


def test_plan_summary_and_diff():
    plans = {"dataset_name": "Dataset101_SiteA", "plans_name": "nnUNetPlans", "transpose_forward": [0, 1, 2],
             "configurations": {"2d": {"patch_size": [48, 48], "batch_size": 2, "spacing": [1.0, 0.9]}},
             "foreground_intensity_properties_per_channel": {"0": {"mean": 100.0}}}
    other = json.loads(json.dumps(plans))
    other.update(dataset_name="Dataset102_SiteB")
    assert ffe.plan_diff(ffe.plan_summary(plans), ffe.plan_summary(other)) == []
    other["configurations"]["2d"]["patch_size"] = [64, 48]
    other["configurations"]["2d"]["use_mask_for_norm"] = [True]
    other["foreground_intensity_properties_per_channel"]["0"]["mean"] = 100.05
    diff = ffe.plan_diff(ffe.plan_summary(plans), ffe.plan_summary(other))
    assert diff == ["configurations.2d.patch_size[0]: 48 != 64",
                    "configurations.2d.use_mask_for_norm: only in second",
                    "foreground_intensity_properties_per_channel.0.mean: 100.0 != 100.05"]
    assert len(ffe.plan_diff(plans, other, rel_tol=1e-3)) == 3  # dataset_name now differs, mean is close
    assert ffe.plan_diff([True], [1]) == ["[0]: true != 1"]
