"""FFE error table: our federated fingerprint and the reference FednnU-Net rule (case-weighted
means of per-site nnU-Net fingerprints), both against nnU-Net's fingerprint of the pooled data,
field by field; then the plan fields that each makes differ from the pooled plan.

    .venv/bin/python benchmarks/ffe_error.py [--cases 14 32 16] [--channels MRI CT] [--dim 2]

Runs nnU-Net (CPU, fresh processes) on synthetic heterogeneous sites: about a minute.
"""
from __future__ import annotations

import argparse
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from p2pfed import ffe
from p2pfed.nnunet.fingerprint import run_calls
from p2pfed.synthetic import make_federation, make_pooled

FIRST_ID, POOLED_ID = 101, 199
FIELDS = ("mean", "std", "median", "percentile_00_5", "percentile_99_5", "min", "max")


def _calls(fn, ids, **kwargs):
    return [{"fn": fn, "kwargs": {"dataset": d, **kwargs}} for d in ids]


def _fingerprints(root: Path, ids: list[int], bins: int):
    """nnU-Net's pooled fingerprint and plans, each site's own, and our FFE merge."""
    folders = [root / d for d in ("raw", "preprocessed", "results")]
    with ThreadPoolExecutor(1) as background:
        pooled = background.submit(run_calls, folders, _calls("local_fingerprint", [POOLED_ID])
                                   + _calls("plan_and_preprocess", [POOLED_ID], configuration=None))
        local = run_calls(folders, _calls("local_fingerprint", ids) + _calls("local_summary", ids))
        per_site, summaries = dict(zip(map(str, ids), local[:len(ids)])), dict(zip(map(str, ids), local[len(ids):]))
        ranges = ffe.global_ranges(summaries)
        histograms = dict(zip(map(str, ids), run_calls(folders, _calls("local_histograms", ids, ranges=ranges,
                                                                         bins=bins))))
        ours, reference = ffe.merge_fingerprint(summaries, histograms), ffe.reference_merge(per_site)
        # plan site 1's dataset from each merged fingerprint (plans differ only through it)
        plans = run_calls(folders, [
            *_calls("write_fingerprint", ids[:1], fingerprint=ours),
            *_calls("plan_and_preprocess", ids[:1], configuration=None, plans_identifier="FFEPlans"),
            *_calls("write_fingerprint", ids[:1], fingerprint=reference),
            *_calls("plan_and_preprocess", ids[:1], configuration=None, plans_identifier="RefPlans")])
        pooled_fingerprint, pooled_plans = pooled.result()
    return pooled_fingerprint, pooled_plans, ours, plans[1], reference, plans[3]


def _row(name, truth, *estimates):
    cells = [f"{name:<36}{truth:>12.6g}"]
    for value in estimates:
        err = abs(value - truth)
        cells.append(f"{value:>12.6g}{err:>10.2g}{err / abs(truth) if truth else float('nan'):>10.2g}")
    return "".join(cells)


def report(pooled, pooled_plans, ours, our_plans, reference, ref_plans, channels) -> str:
    header = f"{'field':<36}{'pooled':>12}" + "".join(f"{n:>12}{'abs err':>10}{'rel err':>10}"
                                                       for n in ("FFE", "reference"))
    lines = [header, "-" * len(header)]
    key = "foreground_intensity_properties_per_channel"
    for ch, name in enumerate(channels):
        p, o, r = (f[key][str(ch)] for f in (pooled, ours, reference))
        lines += [_row(f"{name}.{field}", p[field], o[field], r[field]) for field in FIELDS]
    field = "median_relative_size_after_cropping"
    lines.append(_row(field, pooled[field], ours[field], reference[field]))
    lines.append("")
    for label, plans in (("FFE", our_plans), ("reference", ref_plans)):
        diff = ffe.plan_diff(ffe.plan_summary(pooled_plans), ffe.plan_summary(plans))
        other = [d for d in diff if not d.startswith(key) and not d.startswith("plans_name")
                 and ".data_identifier" not in d]
        lines.append(f"{label}: plan differs from pooled in {len(diff) - len(other)} intensity properties"
                     + (" and in: " + "; ".join(other) if other else " and nowhere else"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, nargs="+", default=[14, 32, 16], help="training cases per site")
    parser.add_argument("--channels", nargs="+", default=["MRI", "CT"])
    parser.add_argument("--dim", type=int, default=2, choices=(2, 3))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bins", type=int, default=ffe.DEFAULT_BINS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="p2pfed-ffe-bench-") as tmp:
        root = Path(tmp)
        sites = make_federation(root / "raw", len(args.cases), first_id=FIRST_ID, n_train=args.cases, n_test=0,
                                dim=args.dim, seed=args.seed, channels=args.channels)
        make_pooled(sites, root / "raw", POOLED_ID)
        results = _fingerprints(root, [FIRST_ID + i for i in range(len(sites))], args.bins)
    print(f"{len(sites)} sites, cases {args.cases}, {args.dim}-D, channels {args.channels}, seed {args.seed}, "
          f"{args.bins} bins")
    print(report(*results, channels=args.channels))


if __name__ == "__main__":
    main()
