"""benchmarks/quality.py: its surface metrics give the known answers on hand-made masks, its
tables and paired comparisons over seeds are computed as documented (on hand-made per-case
metrics), runs of several seeds merge, and its --quick run (every method trained for real,
2 sites and the unseen one) reports DSC and HD95 for every method and site. No quality
thresholds: the quick budget is far too small to learn."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from p2pfed import synthetic

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import quality  # noqa: E402

SPACING = (999.0, 1.0, 2.0)  # a 2-D image as nnU-Net stores it: 1 x H x W, x twice as coarse


def masks(*points, shape=(1, 20, 20)):
    mask = np.zeros(shape, dtype=bool)
    for y, x in points:
        mask[0, y, x] = True
    return mask


def test_hd95_is_in_mm_and_ignores_the_singleton_slice_axis():
    assert quality.hd95(masks((5, 5)), masks((5, 8)), SPACING) == pytest.approx(6.0)  # 3 voxels x 2 mm
    assert quality.hd95(masks((5, 5)), masks((8, 5)), SPACING) == pytest.approx(3.0)  # 3 voxels x 1 mm
    square = np.zeros((1, 20, 20), dtype=bool)
    square[0, 4:12, 4:12] = True
    assert quality.hd95(square, square, SPACING) == 0.0


def test_hd95_is_the_95th_percentile_not_the_maximum():
    line = [(10, x) for x in range(0, 20)] + [(11, x) for x in range(0, 20)]  # 40 surface voxels
    outlier = masks(*line, (0, 0))  # one stray voxel out of 41: above the 95th percentile
    assert quality.hd95(outlier, masks(*line), SPACING) == 0.0
    assert quality.hd95(masks(*line, (0, 0), (1, 0), (0, 1)), masks(*line), SPACING) > 0  # 3 of 43: not


def test_empty_masks_are_defined_explicitly():
    empty, one = masks(), masks((3, 3))
    diagonal = math.hypot(20 * 1.0, 20 * 2.0)
    assert math.isnan(quality.hd95(empty, empty, SPACING)) and math.isnan(quality.dice(empty, empty))
    assert quality.hd95(empty, one, SPACING) == pytest.approx(diagonal)
    assert quality.hd95(one, empty, SPACING) == pytest.approx(diagonal)
    assert quality.dice(empty, one) == 0.0
    assert quality.dice(masks((1, 1), (1, 2)), masks((1, 2), (1, 3), (1, 4))) == pytest.approx(2 / 5)


@pytest.mark.slow
def test_quick_run_reports_every_method_and_site(tmp_path):
    # and the one variant that changes what a model holds, and the pooled training at a site's updates
    methods = [*quality.METHODS, "FFE-merged", "centralized-big-batch"]
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "quality.py"), "--quick", "--jobs", "2",
                           "--methods", ",".join(methods), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    doc = json.loads((tmp_path / "quality.json").read_text())
    cells = {(r["method"], r["site"], r["label"]): r for r in doc["rows"]}
    expected = {(m, s, label) for m in methods for s in ("SiteA", "SiteB", "mean", "SiteD")
                for label in ("organ", "lesion", "mean")}
    assert set(cells) == expected and doc["unseen_site"] == "SiteD"
    for key, row in cells.items():
        assert 0.0 <= row["dsc"] <= 1.0 and math.isfinite(row["hd95"]) and row["hd95"] >= 0, key
        # one test case per site; the unseen site's is predicted by both sites' models
        assert row["cases"] == (2 if key[1] in ("mean", "SiteD") else 1), key
        assert row["seeds"] == 1 and math.isnan(row["dsc_std"]), key
    unseen = [c for c in doc["cases"] if c["site"] == "SiteD" and c["method"] == "local"]
    assert sorted(c["model"] for c in unseen) == ["SiteA", "SiteB"]
    assert set(doc["paired"]) >= {"local − centralized", "FFE − local", "AsymFedAvg − AsymFedAvg-ref"}
    with open(tmp_path / "quality.csv") as f:
        assert len(list(csv.DictReader(f))) == len(expected)
    table = (tmp_path / "quality.md").read_text()
    assert all(f"| {m} |" in table for m in methods) and "SiteB HD95" in table
    assert "SiteD (unseen) DSC" in table and "| FFE − centralized |" in table
    assert (tmp_path / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert doc["steps_per_site"] == 2 and doc["wall_s"]["total"] > 0
    batch = doc["batch_size"]  # from each model's plans.json: the big batch is the sites' together
    assert batch["centralized-big-batch"]["SiteA"] == 2 * batch["centralized"]["SiteA"] == 2 * batch["FFE"]["SiteB"]
    assert doc["settings"]["scanners"] == synthetic.scanners_digest("hard")  # the calibration it ran


# --- tables, seeds and paired comparisons on hand-made per-case metrics ----------------------

def case(seed, name, dsc, model=None, lesion=None):
    lesion = dsc if lesion is None else lesion
    return {"case": name, "seed": seed, "model": model,
            "organ": {"dsc": dsc, "hd95": 1.0}, "lesion": {"dsc": lesion, "hd95": 3.0}}


def per_case_of(values):
    """{(method, site): cases} from {(method, site): {seed: [dsc, ...]}}."""
    return {key: [case(seed, f"c{i}", d, model=key[1] if key[1] != "SiteD" else "SiteA")
                  for seed, ds in by_seed.items() for i, d in enumerate(ds)] for key, by_seed in values.items()}


def test_table_rows_average_over_cases_then_sites_then_seeds():
    per_case = per_case_of({("FFE", "SiteA"): {0: [0.8, 0.6], 1: [0.9, 0.9]},
                            ("FFE", "SiteB"): {0: [0.5, 0.5], 1: [0.7, 0.7]},
                            ("FFE", "SiteD"): {0: [0.2], 1: [0.4]}})
    rows = {(r["site"], r["label"]): r for r in quality.table_rows(per_case, ["SiteA", "SiteB"], "SiteD")}
    assert rows["SiteA", "mean"]["dsc"] == pytest.approx((0.7 + 0.9) / 2)
    assert rows["SiteA", "mean"]["dsc_std"] == pytest.approx(np.std([0.7, 0.9], ddof=1))
    assert rows["mean", "mean"]["dsc"] == pytest.approx(((0.7 + 0.5) / 2 + (0.9 + 0.7) / 2) / 2)  # SiteD not in it
    assert rows["SiteD", "organ"]["dsc"] == pytest.approx(0.3) and rows["SiteD", "mean"]["seeds"] == 2
    assert rows["mean", "organ"]["cases"] == 8 and rows["SiteA", "lesion"]["hd95"] == 3.0


def test_nan_labels_are_left_out_not_counted_as_zero():
    per_case = {("FFE", "SiteA"): [case(0, "c0", 0.8, "SiteA", lesion=float("nan")), case(0, "c1", 0.6, "SiteA")]}
    rows = {(r["site"], r["label"]): r for r in quality.table_rows(per_case, ["SiteA"])}
    assert rows["SiteA", "lesion"]["dsc"] == pytest.approx(0.6)
    assert quality.case_dsc(per_case["FFE", "SiteA"][0]) == pytest.approx(0.8)


def test_paired_differences_match_cases_and_their_interval_covers_the_mean():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.5, 0.9, 40)
    per_case = per_case_of({("FFE", "SiteA"): {0: list(base[:20] + 0.05), 1: list(base[20:] + 0.05)},
                            ("local", "SiteA"): {0: list(base[:20]), 1: list(base[20:])},
                            ("FFE", "SiteB"): {0: list(base[:10])}, ("local", "SiteB"): {1: list(base[:10])}})
    pairs = quality.paired(per_case, "FFE", "local", ["SiteA", "SiteB"])
    assert pairs["SiteA"]["cases"] == 40 and pairs["SiteA"]["diff"] == pytest.approx(0.05)
    assert pairs["SiteA"]["low"] == pytest.approx(0.05) == pytest.approx(pairs["SiteA"]["high"])  # no spread
    assert "SiteB" not in pairs  # different seeds: nothing to pair
    assert pairs["SiteA"]["seeds"] == 2
    noisy = quality.bootstrap_ci([rng.normal(0.02, 0.05, 200)])
    assert noisy[0] < 0.02 < noisy[1] and noisy[1] - noisy[0] < 0.03
    assert quality.bootstrap_ci([np.array([0.1, 0.3])]) == quality.bootstrap_ci([np.array([0.1, 0.3])])  # seeded


def test_the_interval_widens_with_the_disagreement_between_seeds():
    """Two trainings that disagree (+0.10 and 0.00 on every case) are training noise: resampling
    the seeds puts it in the interval, where pooling their cases would call +0.05 resolved."""
    agree = [np.full(20, 0.05), np.full(20, 0.05)]
    disagree = [np.full(20, 0.10), np.full(20, 0.00)]
    assert quality.bootstrap_ci(agree) == pytest.approx((0.05, 0.05))
    low, high = quality.bootstrap_ci(disagree)
    assert low == pytest.approx(0.0) and high == pytest.approx(0.10)
    pooled = quality.bootstrap_ci([np.concatenate(disagree)])
    assert 0.0 < pooled[0] < pooled[1] < 0.10
    per_case = per_case_of({("FFE", "SiteA"): {0: [0.6] * 20, 1: [0.5] * 20},
                            ("local", "SiteA"): {0: [0.5] * 20, 1: [0.5] * 20}})
    pairs = quality.paired(per_case, "FFE", "local", ["SiteA"])
    assert pairs["SiteA"]["low"] == pytest.approx(0.0) and pairs["mean"]["high"] == pytest.approx(0.10)


def _run(tmp_path, name, seed, methods, settings=None):
    """A quality.json as a run writes it (hand-made cases)."""
    folder = tmp_path / name
    folder.mkdir()
    per_case = per_case_of({(m, s): {seed: [0.5 + 0.1 * i + 0.01 * seed, 0.6]} for i, m in enumerate(methods)
                            for s in ("SiteA", "SiteB", "SiteD")})
    meta = {"settings": {**dict.fromkeys(quality.SAME_SETTINGS), "seed": seed, **(settings or {})},
            "site_names": ["SiteA", "SiteB"], "unseen_site": "SiteD", "steps_per_site": 10}
    quality.write_outputs(folder, per_case, meta)
    return folder


def test_runs_of_several_seeds_merge_into_mean_and_spread(tmp_path):
    runs = [_run(tmp_path, "s0", 0, ["local", "FFE"]), _run(tmp_path, "s1", 1, ["local", "FFE"]),
            _run(tmp_path, "s1c", 1, ["centralized"])]
    assert quality.main(["--out", str(tmp_path / "all"), "--merge", *map(str, runs)]) == 0
    doc = json.loads((tmp_path / "all" / "quality.json").read_text())
    rows = {(r["method"], r["site"], r["label"]): r for r in doc["rows"]}
    assert doc["seeds"] == [0, 1] and rows["FFE", "SiteA", "organ"]["seeds"] == 2
    assert rows["FFE", "SiteA", "organ"]["dsc"] == pytest.approx(((0.6 + 0.6) / 2 + (0.61 + 0.6) / 2) / 2)
    assert rows["centralized", "SiteA", "organ"]["seeds"] == 1
    assert doc["paired"]["FFE − local"]["mean"]["cases"] == 8  # 2 seeds x 2 sites x 2 cases
    assert doc["paired"]["FFE − centralized"]["mean"]["cases"] == 4  # seed 1 only
    assert "0.603 ± 0.004" in (tmp_path / "all" / "quality.md").read_text()
    # the merged table merges again with a third seed: its cases keep their own seeds
    again = tmp_path / "again"
    assert quality.main(["--out", str(again), "--merge", str(tmp_path / "all"),
                         str(_run(tmp_path, "s2", 2, ["FFE"]))]) == 0
    doc = json.loads((again / "quality.json").read_text())
    assert doc["seeds"] == [0, 1, 2]
    assert [e["run"] for e in doc["merged_from"]] == ["s0", "s1", "s1c", "s2"]  # folder names, flattened
    assert {(r["method"], r["seeds"]) for r in doc["rows"]} >= {("FFE", 3), ("local", 2), ("centralized", 1)}
    with pytest.raises(SystemExit, match="FFE with seed 1 is in both"):
        quality.main(["--out", str(tmp_path / "m"), "--merge", str(tmp_path / "all"), str(runs[1])])
    # RUN:METHODS takes only some methods of a run: here local of seed 1, without its FFE
    assert quality.main(["--out", str(tmp_path / "m"), "--merge", str(runs[0]), f"{runs[1]}:local"]) == 0
    doc = json.loads((tmp_path / "m" / "quality.json").read_text())
    assert {(r["method"], r["seeds"]) for r in doc["rows"]} == {("FFE", 1), ("local", 2)}


def test_merge_refuses_a_method_and_seed_twice_and_runs_of_other_settings(tmp_path):
    a, b = _run(tmp_path, "a", 0, ["FFE"]), _run(tmp_path, "b", 0, ["FFE"])
    with pytest.raises(SystemExit, match="FFE with seed 0 is in both"):
        quality.main(["--out", str(tmp_path / "m"), "--merge", str(a), str(b)])
    c = _run(tmp_path, "c", 1, ["FFE"], {"rounds": 5})
    with pytest.raises(SystemExit, match="differ in rounds"):
        quality.main(["--out", str(tmp_path / "m"), "--merge", str(a), str(c)])
    # a run of the task before its recalibration: same name and settings, other scanners
    d = _run(tmp_path, "d", 1, ["FFE"], {"scanners": synthetic.scanners_digest("easy")})
    with pytest.raises(SystemExit, match="differ in scanners"):
        quality.main(["--out", str(tmp_path / "m"), "--merge", str(a), str(d)])


def test_variants_keep_the_step_budget_and_bad_settings_are_refused():
    args = quality.parse_args(["--out", "x", "--methods", "FFE,FFE-few-merges,FFE-many-merges"])
    schedules = {m: quality.schedule(args, m) for m in args.methods}
    assert schedules == {"FFE": (20, 1, 50), "FFE-few-merges": (5, 4, 50), "FFE-many-merges": (40, 1, 25)}
    assert len({r * e * i for r, e, i in schedules.values()}) == 1  # the same steps per site
    assert args.train_cases == [5, 6, 5] and args.unseen and args.task == "hard"
    assert quality.parse_args(["--out", "x", "--task", "easy"]).rounds == 8
    for bad in (["--methods", "FFE-few-merges", "--rounds", "10"], ["--methods", "FFE-many-merges", "--iterations", "5"],
                ["--train-cases", "5", "6"],
                ["--sites", "4"], ["--configuration", "3d_fullres", "--size", "32", "32"]):
        with pytest.raises(SystemExit):
            quality.parse_args(["--out", "x", *bad])


def test_mixed_modalities_train_the_asym_methods_and_draw_the_unseen_site_in_each(tmp_path, capsys):
    args = quality.parse_args(["--out", "x", "--modalities", "ct", "MRI", "--size", "24", "24", "--test-cases", "2"])
    assert quality.site_modalities(args) == ["CT", "MRI", "CT"]  # cycled over the three sites
    assert args.methods == list(quality.ANY_MODALITY)  # the methods that can run
    with pytest.raises(SystemExit):  # one plan cannot normalize CT and MRI sites alike
        quality.parse_args(["--out", "x", "--modalities", "CT", "MRI", "--methods", "local,FFE"])
    assert "FFE" in capsys.readouterr().err
    assert quality.parse_args(["--out", "x", "--modalities", "CT"]).modalities is None  # as earlier runs record it
    assert quality.site_modalities(quality.parse_args(["--out", "x", "--modalities", "MRI"])) == ["MRI"] * 3
    unseen = quality.make_unseen(args, tmp_path)  # checks that both modalities hold the same labels
    assert sorted(unseen) == ["CT", "MRI"] and {s.name for s in unseen.values()} == {"SiteD"}
    channels = {m: json.loads((quality.dataset_dir(s) / "dataset.json").read_text())["channel_names"]
                for m, s in unseen.items()}
    assert channels == {"CT": {"0": "CT"}, "MRI": {"0": "MRI"}}
    images = {m: sorted((quality.dataset_dir(s) / "imagesTs").iterdir())[0].read_bytes() for m, s in unseen.items()}
    assert images["CT"] != images["MRI"]
