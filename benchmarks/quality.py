"""Segmentation quality of p2pfed against its baselines, as in the FednnU-Net paper (Tables
7-9): per site, Dice (DSC) and HD95 (mm) on the site's held-out test cases, for

    local           each site trains nnU-Net alone on its own data
    centralized     nnU-Net on the pooled data of all sites
    FFE             p2pfed --mode ffe
    AsymFedAvg      p2pfed --mode asym
    AsymFedAvg-ref  p2pfed --mode asym --weighting uniform --layers intersection (the
                    reference FednnU-Net rule)
    FFE+SecAgg      p2pfed --mode ffe --secure-aggregation (3 sites or more)
    FFE+DP          p2pfed --mode ffe --secure-aggregation --weighting uniform with
                    distributed differential privacy (--dp-clip, --dp-noise-multiplier;
                    3 sites or more); its epsilon goes into quality.json and quality.md

The first five run with the plain protocol (--no-secure-aggregation, which p2pfed init
would otherwise turn on for 3 sites or more).

    .venv/bin/python benchmarks/quality.py --out out/quality [--quick] [--jobs 2] [--methods A,B]
    .venv/bin/python benchmarks/quality.py --out out/all --merge out/quality out/other

--methods runs only some methods (default: all that the site count allows); --merge writes
the combined outputs of earlier runs with the same settings (no training).

Synthetic heterogeneous CT sites (p2pfed.synthetic), 2-D, CPU. Same budget: every site
makes rounds x epochs-per-round x iterations optimizer steps with the same PolyLR schedule,
federated or alone; the centralized model makes n_sites times as many per epoch, the
federation's total. Writes quality.{csv,json,md,png} to --out. See docs/benchmark.md.
"""
from __future__ import annotations

import argparse
import csv
import filecmp
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from p2pfed import simulate, synthetic
from p2pfed.simulate import SimSite

WORKER = Path(__file__).with_name("quality_worker.py")
CONFIGURATION = "2d"
TRAINER_FOLDER = f"nnUNetTrainer__nnUNetPlans__{CONFIGURATION}"
POOLED_ID = 199
PLAIN = ["--no-secure-aggregation"]
# Distributed DP at the one setting measured in docs/benchmark.md ("Secure aggregation and
# differential privacy"): C near the L2 norm of one site's per-round update (measured 10-12
# in round 1 and 2-5 in round 4 at 4 x 100 iterations, about 17 in rounds 1-2 at 8 x 200);
# z small enough not to destroy the model: 3 sites and 1.9 M parameters put noise of norm
# z x C / 3 x sqrt(1.9 M), about 460 z C, on every merge, so z near 1 (a useful epsilon) would.
DP_CLIP, DP_NOISE_MULTIPLIER, DP_DELTA = 10.0, 0.001, 1e-5
FEDERATED = {"FFE": ["--mode", "ffe", *PLAIN], "AsymFedAvg": ["--mode", "asym", *PLAIN],
             "AsymFedAvg-ref": ["--mode", "asym", "--weighting", "uniform", "--layers", "intersection", *PLAIN],
             "FFE+SecAgg": ["--mode", "ffe", "--secure-aggregation"],
             "FFE+DP": ["--mode", "ffe", "--secure-aggregation", "--weighting", "uniform"]}  # + dp_args(args)
SECURE_METHODS = ("FFE+SecAgg", "FFE+DP")  # secure aggregation needs 3 sites or more (secagg.MIN_GROUP)
METHODS = ("local", "centralized", "FFE", "AsymFedAvg", "AsymFedAvg-ref")  # what any site count can run
ALL_METHODS = (*METHODS, *SECURE_METHODS)
MIN_SECURE_SITES = 3
# the settings that fix the data, the budget and the evaluation: runs to merge must agree on them
SAME_SETTINGS = ("sites", "rounds", "epochs_per_round", "iterations", "val_iterations", "train_cases",
                 "test_cases", "size", "tta", "seed", "optimizer_state")
LABELS = {v: k for k, v in synthetic.LABELS.items() if v}  # 1: organ, 2: lesion
PRESETS = {
    "default": dict(sites=3, rounds=8, epochs_per_round=1, iterations=200, val_iterations=10, train_cases=None,
                    test_cases=10, size=None, tta=True),
    "quick": dict(sites=2, rounds=1, epochs_per_round=1, iterations=2, val_iterations=1, train_cases=5,
                  test_cases=1, size=[32, 32], tta=False),
}


# --- surface metrics ------------------------------------------------------------------------

def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty (nothing to find, as nnU-Net does)."""
    total = int(pred.sum()) + int(gt.sum())
    return 2.0 * int((pred & gt).sum()) / total if total else float("nan")


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of the mask with a face-neighbour outside it (the image border counts as outside)."""
    return mask & ~ndimage.binary_erosion(mask, ndimage.generate_binary_structure(mask.ndim, 1))


def hd95(pred: np.ndarray, gt: np.ndarray, spacing) -> float:
    """95th percentile Hausdorff distance in mm: the larger of the two directed 95th percentiles
    of surface-to-surface distances (as MedPy's and MONAI's hd95). Singleton axes (the slice
    axis of 2-D images) are dropped first, or every voxel would be surface. Both masks empty:
    NaN (excluded from means); exactly one empty: the image diagonal, the largest distance the
    image allows, so a missed or hallucinated structure is penalized, not skipped."""
    keep = [axis for axis, n in enumerate(gt.shape) if n > 1]
    spacing = [float(spacing[a]) for a in keep]
    pred, gt = pred.reshape([gt.shape[a] for a in keep]), gt.reshape([gt.shape[a] for a in keep])
    if not pred.any() and not gt.any():
        return float("nan")
    if not pred.any() or not gt.any():
        return float(np.linalg.norm(np.multiply(gt.shape, spacing)))
    sp, sg = _surface(pred), _surface(gt)
    to_gt = ndimage.distance_transform_edt(~sg, sampling=spacing)[sp]
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)[sg]
    return float(max(np.percentile(to_gt, 95), np.percentile(to_pred, 95)))


def _read(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), tuple(image.GetSpacing()[::-1])  # numpy (z, y, x) order


def case_metrics(pred_file: Path, gt_file: Path) -> dict[str, dict[str, float]]:
    (pred, _), (gt, spacing) = _read(pred_file), _read(gt_file)
    if pred.shape != gt.shape:
        raise ValueError(f"{pred_file.name}: prediction shape {pred.shape}, label shape {gt.shape}")
    return {name: {"dsc": dice(pred == v, gt == v), "hd95": hd95(pred == v, gt == v, spacing)}
            for v, name in LABELS.items()}


# --- running the methods ------------------------------------------------------------------------

def dataset_dir(site: SimSite) -> Path:
    return site.folders["raw"] / f"Dataset{site.dataset_id:03d}_{site.name}"


def model_folder(site: SimSite) -> Path:
    """The standard nnU-Net results folder that nnUNetv2_predict -d ID -c 2d -f 0 uses."""
    return site.folders["results"] / dataset_dir(site).name / TRAINER_FOLDER


def _worker(command: str, folders: dict[str, Path], log: Path, **kwargs) -> None:
    """Run quality_worker.py in a fresh process pointed at `folders`; its chatter goes to `log`."""
    request = json.dumps({"folders": [str(folders[k]) for k in ("raw", "preprocessed", "results")],
                          "kwargs": kwargs}, default=str)
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, str(WORKER), command], input=request, text=True,
                              stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"quality_worker.py {command} exited {proc.returncode}, see {log}")


def _budget(args, iterations: int) -> dict:
    return dict(configuration=CONFIGURATION, epochs=args.rounds * args.epochs_per_round, iterations=iterations,
                val_iterations=args.val_iterations)


def run_local(args, site: SimSite, logs: Path) -> dict:
    _worker("train", site.folders, logs / f"local-{site.name}.log", dataset=site.dataset_id,
            **_budget(args, args.iterations))
    return {("local", site.name): model_folder(site)}


def _pooled(work: Path) -> SimSite:
    return SimSite("Pooled", POOLED_ID, work / "centralized")


def run_centralized(args, sites: list[SimSite], work: Path, logs: Path) -> dict:
    pooled = _pooled(work)
    synthetic.make_pooled([dataset_dir(s) for s in sites], pooled.folders["raw"], POOLED_ID, name=pooled.name)
    _worker("train", pooled.folders, logs / "centralized.log", dataset=POOLED_ID,
            pooled_from=[dataset_dir(s) for s in sites], **_budget(args, args.iterations * len(sites)))
    return {("centralized", s.name): model_folder(pooled) for s in sites}


def dp_args(args) -> list[str]:
    return ["--dp-clip", str(args.dp_clip), "--dp-noise-multiplier", str(args.dp_noise_multiplier),
            "--dp-delta", str(args.dp_delta)]


def run_federation(args, method: str, sites: list[SimSite], work: Path, say, secure: dict) -> dict:
    init = ["--configuration", CONFIGURATION, "--rounds", str(args.rounds),
            "--epochs-per-round", str(args.epochs_per_round), "--iterations-per-epoch", str(args.iterations),
            "--val-iterations", str(args.val_iterations), "--no-final-validation",
            "--optimizer-state", args.optimizer_state, *FEDERATED[method],
            *(dp_args(args) if method == "FFE+DP" else [])]
    sim = simulate.setup(work / method, args.sites, init_args=init, seed=args.seed, n_train=args.train_cases,
                         size=args.size)
    for fed_site, site in zip(sim.sites, sites):
        _check_same_training_data(dataset_dir(fed_site), dataset_dir(site))
    status = simulate.run_until_done(sim, say=lambda line: say(f"[{method}] {line}"))
    secure[method] = status.get("secure_aggregation")  # with DP: the epsilon spent over all rounds
    return {(method, s.name): model_folder(s) for s in sim.sites}


def _check_same_training_data(a: Path, b: Path) -> None:
    """Every method must train on the same bytes (the generator is deterministic; check it)."""
    for sub in ("imagesTr", "labelsTr"):
        names = sorted(p.name for p in (a / sub).iterdir())
        _, mismatch, errors = filecmp.cmpfiles(a / sub, b / sub, names, shallow=False)
        if mismatch or errors or names != sorted(p.name for p in (b / sub).iterdir()):
            raise RuntimeError(f"{a.name}/{sub}: training data differs between methods")


def _check_pooled_split(sites: list[SimSite], work: Path) -> None:
    """The centralized fold 0 must train on exactly the cases the sites' fold 0 trains on."""
    def fold0(folder: Path) -> set[str]:
        return set(json.loads((folder / "splits_final.json").read_text())[0]["train"])

    union = set().union(*(fold0(s.folders["preprocessed"] / dataset_dir(s).name) for s in sites))
    pooled = _pooled(work)
    if fold0(pooled.folders["preprocessed"] / dataset_dir(pooled).name) != union:
        raise RuntimeError("the centralized training cases differ from the union of the sites' training cases")


def train_all(args, sites: list[SimSite], work: Path, logs: Path, say) -> tuple[dict, dict, dict]:
    """Every chosen method's model folder per (method, site), each method's wall time, and the
    federated methods' secure_aggregation section of `p2pfed status --json` after all rounds."""
    tasks, secure = {}, {}
    if "local" in args.methods:
        tasks.update({f"local {s.name}": (run_local, args, s, logs) for s in sites})
    if "centralized" in args.methods:
        tasks["centralized"] = (run_centralized, args, sites, work, logs)
    tasks.update({m: (run_federation, args, m, sites, work, say, secure) for m in args.methods if m in FEDERATED})

    def timed(name):
        fn, *fn_args = tasks[name]
        started = time.monotonic()
        say(f"{name}: started")
        models = fn(*fn_args)
        say(f"{name}: done in {time.monotonic() - started:.0f} s")
        return models, time.monotonic() - started

    with ThreadPoolExecutor(args.jobs) as pool:
        done = dict(zip(tasks, pool.map(timed, tasks)))
    if "centralized" in args.methods:
        _check_pooled_split(sites, work)
    models = {key: folder for m, _ in done.values() for key, folder in m.items()}
    return models, {name: round(seconds, 1) for name, (_, seconds) in done.items()}, secure


def predict_all(args, models: dict, sites: list[SimSite], work: Path, logs: Path) -> dict:
    """Predict each site's test cases with each method's model; returns the output folders."""
    outputs, jobs, by_name = {}, {}, {s.name: s for s in sites}
    for (method, name), model in sorted(models.items()):
        outputs[method, name] = work / "predictions" / method / name
        jobs.setdefault(str(model), []).append([str(dataset_dir(by_name[name]) / "imagesTs"),
                                                str(outputs[method, name])])
    folders = SimSite("predict", 0, work / "predict").folders
    _worker("predict", folders, logs / "predict.log", tta=args.tta,
            jobs=[{"model": m, "inputs": inputs} for m, inputs in jobs.items()])
    return outputs


# --- the table --------------------------------------------------------------------------------

def evaluate(outputs: dict, sites: list[SimSite]) -> dict:
    """{(method, site): [per-case metrics]} from the predictions and the sites' labelsTs."""
    per_case, by_name = {}, {s.name: s for s in sites}
    for (method, name), folder in outputs.items():
        labels = dataset_dir(by_name[name]) / "labelsTs"
        per_case[method, name] = [{"case": f.name, **case_metrics(folder / f.name, f)}
                                  for f in sorted(labels.glob(f"*{synthetic.FILE_ENDING}"))]
    return per_case


def _nanmean(values) -> float:
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def _methods_of(keys) -> list[str]:
    """The methods among `keys` (method names, or rows' or (method, site) keys), in table order."""
    present = {k if isinstance(k, str) else k["method"] if isinstance(k, dict) else k[0] for k in keys}
    return [m for m in ALL_METHODS if m in present]


def table_rows(per_case: dict, site_names: list[str]) -> list[dict]:
    """Rows (method, site, label, dsc, hd95, cases): per label the mean over cases, label
    "mean" the mean over labels; site "mean" the unweighted mean over sites."""
    rows = []
    for method in _methods_of(per_case):
        for name in site_names:
            cases = per_case[method, name]
            by_label = {label: {k: _nanmean(c[label][k] for c in cases) for k in ("dsc", "hd95")}
                        for label in LABELS.values()}
            by_label["mean"] = {k: _nanmean(m[k] for m in by_label.values()) for k in ("dsc", "hd95")}
            rows += [dict(method=method, site=name, label=label, cases=len(cases), **m)
                     for label, m in by_label.items()]
        for label in (*LABELS.values(), "mean"):
            same = [r for r in rows if r["method"] == method and r["label"] == label]
            rows.append(dict(method=method, site="mean", label=label, cases=sum(r["cases"] for r in same),
                             **{k: _nanmean(r[k] for r in same) for k in ("dsc", "hd95")}))
    return rows


def markdown(rows: list[dict], label: str = "mean", dp: dict | None = None) -> str:
    """The paper-style table: a row per method, DSC and HD95 (mm) per site and averaged; with
    `dp` (the FFE+DP row's setting and epsilon) a line on it below."""
    sites = list(dict.fromkeys(r["site"] for r in rows))
    cell = {(r["method"], r["site"]): r for r in rows if r["label"] == label}
    lines = ["| method | " + " | ".join(f"{s} DSC | {s} HD95" for s in sites) + " |",
             "|---|" + "---:|---:|" * len(sites)]
    for method in _methods_of(rows):
        values = [f"{cell[method, s]['dsc']:.3f} | {cell[method, s]['hd95']:.2f}" for s in sites]
        lines.append(f"| {method} | " + " | ".join(values) + " |")
    if dp:
        lines += ["", f"FFE+DP: clip C = {dp['clip']:g}, noise multiplier z = {dp['noise_multiplier']:g}, "
                      f"delta = {dp['delta']:g}: epsilon = {dp['epsilon']:.4g} after {dp['rounds']} rounds"]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Grouped bars per site (and the mean): DSC left, HD95 right, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = list(dict.fromkeys(r["site"] for r in rows))
    cell = {(r["method"], r["site"]): r for r in rows if r["label"] == "mean"}
    methods = _methods_of(rows)  # the methods of this run, in table order
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    width = 0.8 / len(methods)
    for ax, key, title in zip(axes, ("dsc", "hd95"), ("DSC (higher is better)", "HD95 in mm (lower is better)")):
        for i, method in enumerate(methods):
            ax.bar(np.arange(len(sites)) + (i - (len(methods) - 1) / 2) * width,
                   [cell[method, s][key] for s in sites], width, label=method)
        ax.set_xticks(range(len(sites)), sites)
        ax.set_title(title, fontsize=10)
    # near-perfect scores would be indistinguishable bars on a 0..1 axis: start at a tenth below
    low = max(0.0, np.floor(min(cell[m, s]["dsc"] for m in methods for s in sites) * 10 - 0.5) / 10)
    axes[0].set_ylim(low, 1)
    if low:
        axes[0].set_title(f"DSC (higher is better; axis starts at {low:.1f})", fontsize=10)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(methods), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_outputs(out: Path, rows: list[dict], per_case: dict, meta: dict) -> None:
    with open(out / "quality.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "site", "label", "cases", "dsc", "hd95"])
        writer.writeheader()
        writer.writerows(rows)
    cases = [{"method": m, "site": s, **c} for (m, s), cs in sorted(per_case.items()) for c in cs]
    (out / "quality.json").write_text(json.dumps({**meta, "rows": rows, "cases": cases}, indent=1))
    (out / "quality.md").write_text(markdown(rows, dp=meta.get("dp")))
    plot(rows, out / "quality.png")


# --- command line ---------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for quality.{csv,json,md,png}")
    p.add_argument("--quick", action="store_true", help="tiny settings (a few minutes): the test's")
    p.add_argument("--sites", type=int)
    p.add_argument("--rounds", type=int, help="federated rounds")
    p.add_argument("--epochs-per-round", type=int)
    p.add_argument("--iterations", type=int, help="nnU-Net iterations per epoch (per site)")
    p.add_argument("--val-iterations", type=int)
    p.add_argument("--train-cases", type=int, help="training cases per site [default: heterogeneous]")
    p.add_argument("--test-cases", type=int, help="held-out test cases per site")
    p.add_argument("--size", type=int, nargs=2, help="image size at the nominal spacing (H W)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, help="mirroring at prediction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optimizer-state", choices=["local", "reset"], default="local",
                   help="federated methods: each site's SGD momentum after a merge (p2pfed init --optimizer-state)")
    p.add_argument("--jobs", type=int, default=1, help="methods trained at the same time")
    p.add_argument("--workdir", type=Path, help="keep the sites, models and predictions here [default: temporary]")
    p.add_argument("--methods", help=f"comma-separated, of {','.join(ALL_METHODS)} [default: all; "
                                     f"{','.join(SECURE_METHODS)} only with --sites {MIN_SECURE_SITES} or more]")
    p.add_argument("--dp-clip", type=float, default=DP_CLIP, help="FFE+DP: the L2 bound of each site's update")
    p.add_argument("--dp-noise-multiplier", type=float, default=DP_NOISE_MULTIPLIER,
                   help="FFE+DP: the aggregate's noise std over --dp-clip")
    p.add_argument("--dp-delta", type=float, default=DP_DELTA, help="FFE+DP: the delta epsilon is reported for")
    p.add_argument("--merge", type=Path, nargs="+", metavar="RUN",
                   help="no training: combine the quality.json of these earlier runs (same settings, "
                        "different methods) into --out")
    args = p.parse_args(argv)
    for key, value in PRESETS["quick" if args.quick else "default"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.merge:
        if args.methods:
            p.error("--merge takes the methods of the runs it merges, not --methods")
        return args
    if args.methods is None:
        args.methods = list(ALL_METHODS if args.sites >= MIN_SECURE_SITES else METHODS)
    else:
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in args.methods if m not in ALL_METHODS]
        if unknown or not args.methods:
            p.error(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from {','.join(ALL_METHODS)}")
        secure = [m for m in args.methods if m in SECURE_METHODS]
        if secure and args.sites < MIN_SECURE_SITES:
            p.error(f"--methods {','.join(secure)}: secure aggregation needs --sites {MIN_SECURE_SITES} or more")
        args.methods = [m for m in ALL_METHODS if m in args.methods]
    return args


def _dp(secure: dict) -> dict | None:
    """The FFE+DP row's setting and the epsilon spent after all rounds (from its status)."""
    doc = (secure.get("FFE+DP") or {}).get("dp")
    return {"method": "FFE+DP", **doc} if doc else None


def merge(args) -> int:
    """Combine earlier runs' quality.json (each method from one run only) into --out."""
    docs = [(run, json.loads((run / "quality.json").read_text())) for run in args.merge]
    first_run, first = docs[0]
    for run, doc in docs[1:]:
        differ = [k for k in SAME_SETTINGS if doc["settings"].get(k) != first["settings"].get(k)]
        if differ:
            raise SystemExit(f"--merge: {run} and {first_run} differ in {', '.join(differ)}; not comparable")
    owner = {}
    for run, doc in docs:
        for method in _methods_of(doc["rows"]):
            if method in owner:
                raise SystemExit(f"--merge: {method} is in both {owner[method]} and {run}")
            owner[method] = run
    rows = [r for m in _methods_of(owner) for _, doc in docs for r in doc["rows"] if r["method"] == m]
    per_case = {}
    for _, doc in docs:
        for c in doc["cases"]:
            per_case.setdefault((c["method"], c["site"]), []).append(
                {k: v for k, v in c.items() if k not in ("method", "site")})
    dp = next((doc["dp"] for _, doc in docs if doc.get("dp")), None)
    meta = {"settings": {k: first["settings"].get(k) for k in SAME_SETTINGS}, "methods": _methods_of(owner),
            "steps_per_site": first["steps_per_site"],
            "merged_from": [{"run": str(run), "methods": _methods_of(doc["rows"]), "settings": doc["settings"],
                             "machine": doc.get("machine"), "wall_s": doc.get("wall_s")} for run, doc in docs],
            "secure_aggregation": {k: v for _, doc in docs for k, v in (doc.get("secure_aggregation") or {}).items()},
            "dp": dp, "wall_s": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    write_outputs(args.out, rows, per_case, meta)
    print(markdown(rows, dp=dp))
    print("methods from: " + "; ".join(f"{run}: {', '.join(_methods_of(doc['rows']))}" for run, doc in docs))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    args.out.mkdir(parents=True, exist_ok=True)
    say = lambda line: print(line, flush=True)  # noqa: E731
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="p2pfed-quality-") as tmp:
        work = (args.workdir or Path(tmp)).absolute()
        logs = args.out / "logs"
        logs.mkdir(exist_ok=True)
        # The local sites' folders hold the test cases every method is evaluated on.
        sites = simulate.make_sites(work / "local", args.sites, seed=args.seed, n_train=args.train_cases,
                                    n_test=args.test_cases, size=args.size)
        models, wall, secure = train_all(args, sites, work, logs, say)
        per_case = evaluate(predict_all(args, models, sites, work, logs), sites)
    rows = table_rows(per_case, [s.name for s in sites])
    wall["total"] = round(time.monotonic() - started, 1)
    meta = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "steps_per_site": args.rounds * args.epochs_per_round * args.iterations,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "wall_s": wall, "secure_aggregation": secure, "dp": _dp(secure)}
    write_outputs(args.out, rows, per_case, meta)
    say("\n" + markdown(rows, dp=meta["dp"]))
    say(f"{meta['steps_per_site']} optimizer steps per site; wall {wall}; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
