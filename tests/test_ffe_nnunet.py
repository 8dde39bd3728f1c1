"""FFE against nnU-Net itself: three deliberately different sites, their pooled union.

nnU-Net extracts the fingerprint and plans on the pooled dataset; every site runs our
summary -> global ranges -> histograms -> merge -> write -> nnU-Net planner on its own
dataset. The fingerprints must agree (intensities within sampling/bin tolerance) and the
plans must be equal in every data-dependent field. nnU-Net fixes its folders at import, so
all nnU-Net work runs in fresh processes (`run_calls`); the sites share one nnUNet_raw under
different dataset ids and exchange payloads only through this test.
"""
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import SimpleITK as sitk

from p2pfed import ffe
from p2pfed.errors import DatasetError
from p2pfed.nnunet.fingerprint import run_calls
from p2pfed.synthetic import make_federation, make_pooled, make_site

SITES = {"SiteA": 101, "SiteB": 102, "SiteC": 103}
POOLED = 199
# 62 cases: nnU-Net caps the batch size at 5 % of the dataset, so the pooled plan gets a
# batch size of 3 where any single site would get 2: the planner must see the federation.
CASES = (14, 32, 16)
CHANNELS = ("MRI", "CT")
REL_MOMENTS = 1e-3  # mean, std: relative to pooled
REL_QUANTILES = 5e-3  # median, percentiles: fraction of pooled p99.5 - p0.5


def _folders(root):
    return [root / d for d in ("raw", "preprocessed", "results")]


def _calls(fn, **kwargs):
    return [{"fn": fn, "kwargs": {"dataset": d, **kwargs}} for d in SITES.values()]


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("ffe")
    folders = make_federation(root / "raw", 3, first_id=101, n_train=CASES, n_test=0, channels=CHANNELS)
    make_pooled(folders, root / "raw", POOLED)
    with ThreadPoolExecutor(1) as background:  # nnU-Net on the union, meanwhile the sites
        pooled = background.submit(run_calls, _folders(root), [
            {"fn": "local_fingerprint", "kwargs": {"dataset": POOLED}},
            {"fn": "plan_and_preprocess", "kwargs": {"dataset": POOLED, "configuration": None}}])
        summaries = dict(zip(SITES, run_calls(_folders(root), _calls("local_summary"))))
        ranges = ffe.global_ranges(summaries)
        histograms = dict(zip(SITES, run_calls(_folders(root), _calls("local_histograms", ranges=ranges))))
        fingerprint = ffe.merge_fingerprint(summaries, histograms)
        plan_calls = [  # preprocessing is slow-ish: one site shows it
            {"fn": "plan_and_preprocess", "kwargs": {"dataset": d, "configuration": "2d" if d == 101 else None}}
            for d in SITES.values()]
        planned = run_calls(_folders(root), _calls("write_fingerprint", fingerprint=fingerprint) + plan_calls)
        pooled_fingerprint, pooled_plans = pooled.result()
    return {"root": root, "summaries": summaries, "histograms": histograms, "fingerprint": fingerprint,
            "plans": dict(zip(SITES, planned[len(SITES):])),
            "pooled_fingerprint": pooled_fingerprint, "pooled_plans": pooled_plans}


def _intensity_errors(ours, pooled):
    """Per channel and field, the error in units of that field's tolerance (ok if <= 1)."""
    errors = {}
    for ch, ref in pooled.items():
        spread = ref["percentile_99_5"] - ref["percentile_00_5"]
        for key in ref:
            scale = REL_MOMENTS * abs(ref[key]) if key in ("mean", "std") else \
                REL_QUANTILES * spread if key in ffe.QUANTILES else 0.0
            diff = abs(ours[ch][key] - ref[key])
            errors[ch, key] = diff / scale if scale else (0.0 if diff == 0 else np.inf)
    return errors


def test_spacings_shapes_and_crop_sizes_are_the_pooled_ones(federation):
    ours, pooled = federation["fingerprint"], federation["pooled_fingerprint"]
    for key in ("spacings", "shapes_after_crop"):
        assert sorted(map(tuple, ours[key])) == sorted(map(tuple, pooled[key]))
    assert len(ours["spacings"]) == sum(CASES)
    assert ours["median_relative_size_after_cropping"] == pooled["median_relative_size_after_cropping"]


def test_intensity_properties_match_pooled_within_tolerance(federation):
    errors = _intensity_errors(federation["fingerprint"]["foreground_intensity_properties_per_channel"],
                               federation["pooled_fingerprint"]["foreground_intensity_properties_per_channel"])
    assert {k: e for k, e in errors.items() if e > 1} == {}


def test_the_reference_rule_fails_the_same_tolerances(federation):
    """The check above can fail: on this data the case-weighted mean rule is far off."""
    summaries, histograms = federation["summaries"], federation["histograms"]
    per_site = {s: ffe.merge_fingerprint({s: summaries[s]}, {s: histograms[s]}) for s in summaries}
    errors = _intensity_errors(ffe.reference_merge(per_site)["foreground_intensity_properties_per_channel"],
                               federation["pooled_fingerprint"]["foreground_intensity_properties_per_channel"])
    assert errors["1", "std"] > 10 and errors["0", "std"] > 10  # CT and MRI spread
    assert errors["1", "percentile_99_5"] > 1  # the CT clipping bound


def test_every_site_plans_exactly_like_the_pooled_dataset(federation):
    pooled = ffe.plan_summary(federation["pooled_plans"])
    assert pooled["configurations"]["2d"]["batch_size"] > 2  # the federation-size cap is exercised
    assert pooled["configurations"]["2d"]["use_mask_for_norm"] == [True, False]
    spacings = {tuple(c["spacing"]) for s in federation["summaries"].values() for c in s["cases"]}
    assert len(spacings) == 3  # sites alone would pick other target spacings
    key = "foreground_intensity_properties_per_channel"
    for site, plans in federation["plans"].items():
        ours = ffe.plan_summary(plans)
        assert ffe.plan_diff({**ours, key: None}, {**pooled, key: None}) == [], site
        assert ours[key] == federation["fingerprint"][key]
        assert plans["configurations"]["2d"]["normalization_schemes"] == ["ZScoreNormalization", "CTNormalization"]


def test_preprocessing_ran_for_the_requested_configuration_only(federation):
    out = federation["root"] / "preprocessed" / "Dataset101_SiteA"
    assert len(list((out / "nnUNetPlans_2d").glob("*.pkl"))) == CASES[0]
    assert not (out / "nnUNetPlans_3d_fullres").exists()
    assert (out / "dataset.json").is_file() and len(list((out / "gt_segmentations").iterdir())) == CASES[0]


def _missing_label(folder):
    (folder / "labelsTr" / "sited_001.nii.gz").unlink()


def _nan_voxel(folder):
    # ITK's NIfTI reader turns NaN/inf into 0, so nnU-Net's SimpleITKIO never shows them;
    # nibabel (nnU-Net's NibabelIO) does.
    dataset_json = json.loads((folder / "dataset.json").read_text())
    dataset_json["overwrite_image_reader_writer"] = "NibabelIO"
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    path = folder / "imagesTr" / "sited_002_0000.nii.gz"
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    array[0, 5, 5] = np.nan
    broken = sitk.GetImageFromArray(array)
    broken.CopyInformation(image)
    sitk.WriteImage(broken, str(path), True)


@pytest.mark.parametrize("damage, message", [(_missing_label, "case sited_001: images but no label"),
                                             (_nan_voxel, "case sited_002: image has NaN")])
def test_dataset_problems_are_one_line_naming_the_case(tmp_path, damage, message):
    damage(make_site(tmp_path / "raw", 104, 3, n_train=3, n_test=0, channels=CHANNELS))
    with pytest.raises(DatasetError, match=f"^Dataset104_SiteD: {message}[^\n]*$"):
        run_calls(_folders(tmp_path), [{"fn": "local_summary", "kwargs": {"dataset": 104}}])
