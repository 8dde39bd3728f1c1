"""FFE against nnU-Net itself: three deliberately different sites, their pooled union.

nnU-Net extracts the fingerprint and plans on the pooled dataset. The three sites form a
real federation on the S3-protocol server and run FFE through `p2pfed round --until plan`
ticks, each site in its own process with its own nnU-Net folders. The fingerprint every
site wrote must agree with the pooled one (intensities within sampling/bin tolerance)
and every site's plans must equal the pooled plans in every data-dependent field.
"""
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import SimpleITK as sitk

from p2pfed import ffe, layout, simulate
from p2pfed.errors import DatasetError
from p2pfed.node import open_site
from p2pfed.objects import read_envelope
from p2pfed.nnunet.fingerprint import run_calls
from p2pfed.synthetic import make_pooled, make_site

from conftest import new_bucket

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


def _payloads(sim, kind_key):
    """Decrypt every site's FFE payload of one kind from the shared storage, as SiteA."""
    home, _, fed = open_site(sim.home, "SiteA")
    kind, key = kind_key
    return {s: json.loads(read_envelope(fed, key(s), kind, home.identity(), author=s)[1]) for s in SITES}


@pytest.fixture(scope="module")
def federation(tmp_path_factory, s3_endpoint):
    root = tmp_path_factory.mktemp("ffe")
    sim = simulate.setup(root, 3, storage=new_bucket(s3_endpoint), n_train=CASES, channels=CHANNELS,
                         init_args=["--configuration", "2d"])
    make_pooled([next(s.folders["raw"].glob("Dataset*")) for s in sim.sites], root / "raw", POOLED)
    with ThreadPoolExecutor(1) as background:  # nnU-Net on the union, meanwhile the sites
        pooled = background.submit(run_calls, _folders(root), [
            {"fn": "local_fingerprint", "kwargs": {"dataset": POOLED}},
            {"fn": "plan_and_preprocess", "kwargs": {"dataset": POOLED, "configuration": None}}])
        planned = set()
        for _ in range(4):  # ticks, round-robin, until every site has planned and agreed
            for site in SITES:
                if sim.tick(site, "--until", "plan")["message"].startswith("stopped after plan"):
                    planned.add(site)
            if planned == set(SITES):
                break
        pooled_fingerprint, pooled_plans = pooled.result()
    assert planned == set(SITES)
    pre = {s.name: next(s.folders["preprocessed"].glob("Dataset*")) for s in sim.sites}
    return {"root": root, "sim": sim, "pre": pre,
            "summaries": _payloads(sim, ("summary", layout.summary)),
            "histograms": _payloads(sim, ("histogram", layout.histogram)),
            "fingerprint": json.loads((pre["SiteA"] / "dataset_fingerprint.json").read_text()),
            "fingerprints": {s: json.loads((p / "dataset_fingerprint.json").read_text()) for s, p in pre.items()},
            "plans": {s: json.loads((p / "nnUNetPlans.json").read_text()) for s, p in pre.items()},
            "pooled_fingerprint": pooled_fingerprint, "pooled_plans": pooled_plans}


def test_every_site_wrote_the_same_fingerprint(federation):
    assert all(f == federation["fingerprint"] for f in federation["fingerprints"].values())


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
    for (site, out), n in zip(federation["pre"].items(), CASES):
        assert len(list((out / "nnUNetPlans_2d").glob("*.pkl"))) == n, site
        assert not (out / "nnUNetPlans_3d_fullres").exists()
        assert (out / "dataset.json").is_file() and len(list((out / "gt_segmentations").iterdir())) == n


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
