"""benchmarks/quality.py: its surface metrics give the known answers on hand-made masks, and
its --quick run (every method trained for real, 2 sites) reports DSC and HD95 for every
method and site. No quality thresholds: the quick budget is far too small to learn."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "quality.py"), "--quick", "--jobs", "2",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    doc = json.loads((tmp_path / "quality.json").read_text())
    cells = {(r["method"], r["site"], r["label"]): r for r in doc["rows"]}
    expected = {(m, s, label) for m in quality.METHODS for s in ("SiteA", "SiteB", "mean")
                for label in ("organ", "lesion", "mean")}
    assert set(cells) == expected
    for key, row in cells.items():
        assert 0.0 <= row["dsc"] <= 1.0 and math.isfinite(row["hd95"]) and row["hd95"] >= 0, key
        assert row["cases"] == (2 if key[1] == "mean" else 1), key  # one test case per site
    with open(tmp_path / "quality.csv") as f:
        assert len(list(csv.DictReader(f))) == len(expected)
    table = (tmp_path / "quality.md").read_text()
    assert all(f"| {m} |" in table for m in quality.METHODS) and "SiteB HD95" in table
    assert (tmp_path / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert doc["steps_per_site"] == 2 and doc["wall_s"]["total"] > 0
