"""benchmarks/scale.py runs (its smoke setting, 3 and 5 sites) and reports what it claims:
per variant and site count, traffic per site and round by object kind, requests per tick
and peak RSS; sharded rounds download less than full ones, flat in N."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_scale_run_compares_full_and_sharded_aggregation(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--quick",
                           "--variants", "secure,sharded", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {(r["variant"], r["sites"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(v, n) for v in ("secure", "sharded") for n in (3, 5)}
    assert "| sharded | 5 |" in proc.stdout
    for (variant, n), r in rows.items():
        assert r["model_bytes"] == 8 * 1_000_000  # masked: 8 bytes a parameter
        assert r["down_round_mean"] < r["down_mean"] and r["idle_requests"] > 0 and r["peak_rss_mib"] > 0
        kinds = r["down_by_kind"]
        assert kinds["once: shard"] > 0  # the initial model, read once, counted apart
        # what a round downloads is the sum of its kinds
        steady = sum(v for k, v in kinds.items() if not k.startswith("once: "))
        assert abs(steady - r["down_round_mean"]) <= 1e-6 * r["down_round_mean"]
    full, sharded = rows["secure", 5], rows["sharded", 5]
    assert full["down_round_mean"] > 4.5 * full["model_bytes"]  # every site reads all five uploads
    assert sharded["down_round_mean"] < 3 * sharded["model_bytes"]
    assert "slice" in sharded["down_by_kind"] and "slice" not in full["down_by_kind"]
