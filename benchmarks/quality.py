"""Segmentation quality of p2pfed against its baselines, as in the FednnU-Net paper (Tables
7-9): per site, Dice (DSC) and HD95 (mm) on the site's held-out test cases, for

    local           each site trains nnU-Net alone on its own data
    centralized     nnU-Net on the pooled data of all sites
    centralized-big-batch  the pooled data with one site's updates: batch x n_sites, the
                    iterations of one site (the same images seen as centralized; the same
                    number of optimizer steps as a federated site, so as FFE's merged model)
    FFE             p2pfed --mode ffe
    AsymFedAvg      p2pfed --mode asym
    AsymFedAvg-ref  p2pfed --mode asym --weighting uniform --layers intersection (the
                    reference FednnU-Net rule)
    FFE+SecAgg      p2pfed --mode ffe --secure-aggregation (3 sites or more)
    FFE+DP          p2pfed --mode ffe --secure-aggregation --weighting uniform with
                    distributed differential privacy (--dp-clip, --dp-noise-multiplier;
                    3 sites or more); its epsilon goes into quality.json and quality.md

and variants of FFE that measure what the gap to centralized training comes from:

    FFE-few-merges  a quarter of the merges: rounds/4 rounds of 4 x epochs-per-round epochs
                    (the same steps and learning-rate schedule)
    FFE-many-merges twice the merges: 2 x rounds rounds of epochs of half the iterations
                    (the same steps; PolyLR over twice the epochs of half the length)
    FFE-reset       --optimizer-state reset (no SGD momentum carried over a merge)
    FFE-merged      --optimizer-state merged (the SGD momentum averaged with the weights)
    FFE-uniform     --weighting uniform (sites weighted alike, not by their cases)
    FFE-cosine      --trainer nnUNetTrainerCosAnneal (nnU-Net's cosine learning-rate schedule
                    across all rounds instead of PolyLR)
    FFE-scaled-lr   --learning-rate n_sites x nnU-Net's 0.01: a merge averages n_sites
                    updates, like one step on an n_sites times larger batch, and the linear
                    scaling rule scales the learning rate with the batch

All but FFE+SecAgg and FFE+DP run with the plain protocol (--no-secure-aggregation, which
p2pfed init would otherwise turn on for 3 sites or more).

--modalities CT MRI CT images each site in its own modality (cycled over the sites): CT and
MRI-like sites federate only in asym mode, so such a run trains local, AsymFedAvg and
AsymFedAvg-ref (centralized and FFE need one plan, one normalization, for every site); the
unseen site is drawn in each modality (the same cases and labels) and every model predicts
it in its own.

    .venv/bin/python benchmarks/quality.py --out out/s0 [--seed 0] [--quick] [--jobs 2] [--methods A,B]
    .venv/bin/python benchmarks/quality.py --out out/all --merge out/s0 out/s1 out/s2

--methods runs only some methods (default: local, centralized, FFE, AsymFedAvg and
AsymFedAvg-ref); --merge writes the combined outputs of earlier runs (no training): runs
with the same settings, and any seeds; a table over several seeds gives the mean and the
standard deviation over seeds, and the paired comparisons pool the test cases of all seeds.

Synthetic heterogeneous CT sites (p2pfed.synthetic), CPU. --task hard (the default) is the
task on which one site's few cases are not enough, with a fourth site that no model trains
on (the "unseen" column); --task easy is the first study's task (docs/benchmark.md). Same
budget: every site makes rounds x epochs-per-round x iterations optimizer steps with the
same learning-rate schedule, federated or alone; the centralized model makes n_sites times
as many per epoch, the federation's total. Writes quality.{csv,json,md,png} to --out.
See docs/benchmark.md.
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
from quality_worker import nnunet_split

WORKER = Path(__file__).with_name("quality_worker.py")
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
             "FFE+DP": ["--mode", "ffe", "--secure-aggregation", "--weighting", "uniform"],  # + dp_args(args)
             "FFE-few-merges": ["--mode", "ffe", *PLAIN],  # with rounds / FEW_MERGES (schedule)
             "FFE-many-merges": ["--mode", "ffe", *PLAIN],  # with rounds x MANY_MERGES (schedule)
             "FFE-reset": ["--mode", "ffe", "--optimizer-state", "reset", *PLAIN],
             "FFE-merged": ["--mode", "ffe", "--optimizer-state", "merged", *PLAIN],
             "FFE-uniform": ["--mode", "ffe", "--weighting", "uniform", *PLAIN],
             "FFE-cosine": ["--mode", "ffe", "--trainer", "nnUNetTrainerCosAnneal", *PLAIN],
             "FFE-scaled-lr": ["--mode", "ffe", *PLAIN]}  # + scaled_lr_args(args)
FEW_MERGES = 4  # FFE-few-merges: rounds / 4 merges, each round 4 times as long
MANY_MERGES = 2  # FFE-many-merges: rounds x 2 merges, each epoch (and round) half as long
NNUNET_LR = 0.01  # nnUNetTrainer.initial_lr
SECURE_METHODS = ("FFE+SecAgg", "FFE+DP")  # secure aggregation needs 3 sites or more (secagg.MIN_GROUP)
METHODS = ("local", "centralized", "FFE", "AsymFedAvg", "AsymFedAvg-ref")  # the default; any site count
VARIANTS = ("FFE-few-merges", "FFE-many-merges", "FFE-reset", "FFE-merged", "FFE-uniform", "FFE-cosine",
            "FFE-scaled-lr")
CENTRALIZED = ("centralized", "centralized-big-batch")
ALL_METHODS = (*METHODS, *SECURE_METHODS, *VARIANTS, "centralized-big-batch")
MIN_SECURE_SITES = 3
# the settings that fix the data, the budget and the evaluation: runs to merge must agree on them
# (the seed may differ: a merge of several seeds reports their mean and spread)
SAME_SETTINGS = ("task", "configuration", "sites", "rounds", "epochs_per_round", "iterations", "val_iterations",
                 "train_cases", "test_cases", "unseen", "size", "tta", "optimizer_state", "modalities", "scanners")
# the methods whose sites may image in different modalities (each plans and normalizes its own)
ANY_MODALITY = ("local", "AsymFedAvg", "AsymFedAvg-ref")
LABELS = {v: k for k, v in synthetic.LABELS.items() if v}  # 1: organ, 2: lesion
UNSEEN = "unseen"  # the site key of the unseen site's rows; its name is in the settings
PRESETS = {
    # the study: a site's few cases are not enough; 20 merges of one 50-iteration epoch
    "hard": dict(sites=3, rounds=20, epochs_per_round=1, iterations=50, val_iterations=5,
                 train_cases=[5, 6, 5], test_cases=10, size=None, tta=True, unseen=True),
    # the first study (docs/benchmark.md, "Results (seed 0)")
    "easy": dict(sites=3, rounds=8, epochs_per_round=1, iterations=200, val_iterations=10, train_cases=None,
                 test_cases=10, size=None, tta=True, unseen=False),
    "quick": dict(sites=2, rounds=1, epochs_per_round=1, iterations=2, val_iterations=1, train_cases=[5],
                  test_cases=1, size=[32, 32], tta=False, unseen=True),
}
BOOTSTRAP_RESAMPLES = 10000


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


def model_folder(site: SimSite, configuration: str, trainer: str = "nnUNetTrainer") -> Path:
    """The standard nnU-Net results folder that nnUNetv2_predict -d ID -c CONFIG -f 0 uses."""
    return site.folders["results"] / dataset_dir(site).name / f"{trainer}__nnUNetPlans__{configuration}"


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
    return dict(configuration=args.configuration, epochs=args.rounds * args.epochs_per_round,
                iterations=iterations, val_iterations=args.val_iterations)


def run_local(args, site: SimSite, logs: Path) -> dict:
    _worker("train", site.folders, logs / f"local-{site.name}.log", dataset=site.dataset_id,
            **_budget(args, args.iterations))
    return {("local", site.name): model_folder(site, args.configuration)}


def _pooled(work: Path, method: str) -> SimSite:
    return SimSite("Pooled", POOLED_ID, work / method)


def run_centralized(args, sites: list[SimSite], work: Path, logs: Path, method: str) -> dict:
    """centralized: n_sites x the iterations of a site at the planned batch size;
    centralized-big-batch: a site's iterations at n_sites x the batch size."""
    pooled, n = _pooled(work, method), len(sites)
    big = method == "centralized-big-batch"
    synthetic.make_pooled([dataset_dir(s) for s in sites], pooled.folders["raw"], POOLED_ID, name=pooled.name)
    _worker("train", pooled.folders, logs / f"{method}.log", dataset=POOLED_ID,
            pooled_from=[dataset_dir(s) for s in sites], batch_scale=n if big else 1,
            **_budget(args, args.iterations * (1 if big else n)))
    return {(method, s.name): model_folder(pooled, args.configuration) for s in sites}


def site_modalities(args) -> list[str]:
    """Each site's modality (--modalities cycled over the sites; CT when not given)."""
    given = args.modalities or ["CT"]
    return [given[i % len(given)] for i in range(args.sites)]


def site_channels(args) -> list[tuple[str]]:
    """Each site's channels, as p2pfed.simulate takes them: its one modality."""
    return [(m,) for m in site_modalities(args)]


def make_unseen(args, work: Path) -> dict[str, SimSite]:
    """The unseen site's test cases (no method trains on it) in each modality the sites image
    in: the same cases and labels (the generator draws them before the images; checked)."""
    if not args.unseen:
        return {}
    index = synthetic.hard_profiles() - 1
    unseen = {}
    for modality in sorted(set(site_modalities(args))):
        site = unseen[modality] = SimSite(synthetic.site_name(index), 101 + index, work / "unseen" / modality)
        synthetic.make_site(site.folders["raw"], site.dataset_id, index, n_train=0, n_test=args.test_cases,
                            dim=args.dim, size=args.size, seed=args.seed, task=args.task, channels=(modality,))
    first, *others = unseen.values()
    for other in others:
        _check_same_data(dataset_dir(first), dataset_dir(other), ["labelsTs"])
    return unseen


def dp_args(args) -> list[str]:
    return ["--dp-clip", str(args.dp_clip), "--dp-noise-multiplier", str(args.dp_noise_multiplier),
            "--dp-delta", str(args.dp_delta)]


def scaled_lr_args(args) -> list[str]:
    return ["--learning-rate", f"{NNUNET_LR * args.sites:g}"]


def schedule(args, method: str) -> tuple[int, int, int]:
    """(rounds, epochs per round, iterations per epoch) of a federated method: the same
    optimizer steps for every method."""
    if method == "FFE-few-merges":
        return args.rounds // FEW_MERGES, args.epochs_per_round * FEW_MERGES, args.iterations
    if method == "FFE-many-merges":
        return args.rounds * MANY_MERGES, args.epochs_per_round, args.iterations // MANY_MERGES
    return args.rounds, args.epochs_per_round, args.iterations


def run_federation(args, method: str, sites: list[SimSite], work: Path, say, secure: dict) -> dict:
    rounds, epochs_per_round, iterations = schedule(args, method)
    extra = FEDERATED[method]
    init = ["--configuration", args.configuration, "--rounds", str(rounds),
            "--epochs-per-round", str(epochs_per_round), "--iterations-per-epoch", str(iterations),
            "--val-iterations", str(args.val_iterations), "--no-final-validation",
            *([] if "--optimizer-state" in extra else ["--optimizer-state", args.optimizer_state]), *extra,
            *(dp_args(args) if method == "FFE+DP" else []),
            *(scaled_lr_args(args) if method == "FFE-scaled-lr" else [])]
    sim = simulate.setup(work / method, args.sites, init_args=init, seed=args.seed, n_train=args.train_cases,
                         size=args.size, task=args.task, dim=args.dim,
                         channels=site_channels(args))
    for fed_site, site in zip(sim.sites, sites):
        _check_same_data(dataset_dir(fed_site), dataset_dir(site))
    status = simulate.run_until_done(sim, say=lambda line: say(f"[{method}] {line}"))
    secure[method] = status.get("secure_aggregation")  # with DP: the epsilon spent over all rounds
    trainer = extra[extra.index("--trainer") + 1] if "--trainer" in extra else "nnUNetTrainer"
    return {(method, s.name): model_folder(s, args.configuration, trainer) for s in sim.sites}


def batch_sizes(models: dict, configuration: str) -> dict:
    """{method: {site: batch size}} as each trained model's plans.json has it."""
    out = {}
    for (method, site), folder in sorted(models.items()):
        plans = json.loads((folder / "plans.json").read_text())
        out.setdefault(method, {})[site] = plans["configurations"][configuration]["batch_size"]
    return out


def _check_same_data(a: Path, b: Path, subfolders=("imagesTr", "labelsTr")) -> None:
    """Every method must train (and be tested) on the same bytes: the generator is
    deterministic; check it."""
    for sub in subfolders:
        names = sorted(p.name for p in (a / sub).iterdir())
        _, mismatch, errors = filecmp.cmpfiles(a / sub, b / sub, names, shallow=False)
        if mismatch or errors or names != sorted(p.name for p in (b / sub).iterdir()):
            raise RuntimeError(f"{a.name}/{sub}: the data differs between methods or modalities")


def _check_pooled_split(sites: list[SimSite], work: Path, method: str) -> None:
    """The centralized fold 0 must train on exactly the cases the sites' fold 0 trains on: as
    the site's local training split them, or (no local run) as nnU-Net's trainer would."""
    def fold0(site: SimSite) -> set[str]:
        written = site.folders["preprocessed"] / dataset_dir(site).name / "splits_final.json"
        folds = json.loads(written.read_text()) if written.is_file() else nnunet_split(dataset_dir(site))
        return set(folds[0]["train"])

    if fold0(_pooled(work, method)) != set().union(*map(fold0, sites)):
        raise RuntimeError("the centralized training cases differ from the union of the sites' training cases")


def train_all(args, sites: list[SimSite], work: Path, logs: Path, say) -> tuple[dict, dict, dict]:
    """Every chosen method's model folder per (method, site), each method's wall time, and the
    federated methods' secure_aggregation section of `p2pfed status --json` after all rounds."""
    tasks, secure = {}, {}  # the longest first, so that --jobs keeps every core busy to the end
    tasks.update({m: (run_federation, args, m, sites, work, say, secure) for m in args.methods if m in FEDERATED})
    tasks.update({m: (run_centralized, args, sites, work, logs, m) for m in CENTRALIZED if m in args.methods})
    if "local" in args.methods:
        tasks.update({f"local {s.name}": (run_local, args, s, logs) for s in sites})

    def timed(name):
        fn, *fn_args = tasks[name]
        started = time.monotonic()
        say(f"{name}: started")
        models = fn(*fn_args)
        say(f"{name}: done in {time.monotonic() - started:.0f} s")
        return models, time.monotonic() - started

    with ThreadPoolExecutor(args.jobs) as pool:
        done = dict(zip(tasks, pool.map(timed, tasks)))
    for method in CENTRALIZED:
        if method in args.methods:
            _check_pooled_split(sites, work, method)
    models = {key: folder for m, _ in done.values() for key, folder in m.items()}
    return models, {name: round(seconds, 1) for name, (_, seconds) in done.items()}, secure


def predict_all(args, models: dict, sites: list[SimSite], unseen: dict[str, SimSite], work: Path,
                logs: Path) -> dict:
    """Predict each site's test cases with its model of each method, and the unseen site's
    (`unseen`: by modality; empty without it) with every site's model, in that site's
    modality; returns {(method, tested site, model's site): output folder}."""
    outputs, jobs, by_name = {}, {}, {s.name: s for s in sites}
    modality = dict(zip(by_name, site_modalities(args)))
    for (method, name), model in sorted(models.items()):
        for tested in [by_name[name]] + ([unseen[modality[name]]] if unseen else []):
            out = outputs[method, tested.name, name] = work / "predictions" / method / tested.name / name
            jobs.setdefault(str(model), []).append([str(dataset_dir(tested) / "imagesTs"), str(out)])
    folders = SimSite("predict", 0, work / "predict").folders
    _worker("predict", folders, logs / "predict.log", tta=args.tta,
            jobs=[{"model": m, "inputs": inputs} for m, inputs in jobs.items()])
    return outputs


# --- the table --------------------------------------------------------------------------------

def evaluate(outputs: dict, sites: list[SimSite], seed: int) -> dict:
    """{(method, site): [per-case metrics]} from the predictions and the sites' labelsTs; the
    unseen site's cases are listed once per model that predicted them ("model": its site)."""
    per_case, by_name = {}, {s.name: s for s in sites}
    for (method, name, model_site), folder in sorted(outputs.items()):
        labels = dataset_dir(by_name[name]) / "labelsTs"
        per_case.setdefault((method, name), []).extend(
            {"case": f.name, "model": model_site, "seed": seed, **case_metrics(folder / f.name, f)}
            for f in sorted(labels.glob(f"*{synthetic.FILE_ENDING}")))
    return per_case


def _nanmean(values) -> float:
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def _nanstd(values) -> float:
    """Standard deviation over seeds (n - 1); NaN with fewer than two values."""
    values = [v for v in values if not np.isnan(v)]
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def _methods_of(keys) -> list[str]:
    """The methods among `keys` (method names, or rows' or (method, site) keys), in table order."""
    present = {k if isinstance(k, str) else k["method"] if isinstance(k, dict) else k[0] for k in keys}
    return [m for m in ALL_METHODS if m in present]


def case_dsc(case: dict) -> float:
    """A test case's DSC averaged over the labels present (NaN if none is)."""
    return _nanmean(case[label]["dsc"] for label in LABELS.values())


def table_rows(per_case: dict, site_names: list[str], unseen: str | None = None) -> list[dict]:
    """Rows (method, site, label, dsc, hd95, cases, seeds, dsc_std, hd95_std).

    Per seed: per label the mean over the site's test cases (the unseen site's: over its
    cases and every model), label "mean" the mean over labels, site "mean" the unweighted
    mean over the sites trained on (not the unseen one). Then dsc and hd95 are the mean over
    seeds of those, *_std their standard deviation over seeds (NaN for one seed)."""
    rows = []
    seeds = sorted({c["seed"] for cases in per_case.values() for c in cases})
    for method in _methods_of(per_case):
        per_seed = {}  # (site, label) -> [(dsc, hd95) per seed]
        for seed in seeds:
            site_means = {}
            for name in site_names + ([unseen] if unseen else []):
                cases = [c for c in per_case.get((method, name), []) if c["seed"] == seed]
                if not cases:
                    continue
                by_label = {label: {k: _nanmean(c[label][k] for c in cases) for k in ("dsc", "hd95")}
                            for label in LABELS.values()}
                by_label["mean"] = {k: _nanmean(m[k] for m in by_label.values()) for k in ("dsc", "hd95")}
                site_means[name] = by_label
                for label, m in by_label.items():
                    per_seed.setdefault((name, label), []).append((m["dsc"], m["hd95"], len(cases)))
            trained = [site_means[n] for n in site_names if n in site_means]
            if not trained:  # this method did not run with this seed
                continue
            for label in (*LABELS.values(), "mean"):
                per_seed.setdefault(("mean", label), []).append(
                    (_nanmean(t[label]["dsc"] for t in trained), _nanmean(t[label]["hd95"] for t in trained),
                     sum(len([c for c in per_case.get((method, n), []) if c["seed"] == seed])
                         for n in site_names)))
        for name in site_names + ["mean"] + ([unseen] if unseen else []):
            for label in (*LABELS.values(), "mean"):
                values = per_seed.get((name, label))
                if not values:
                    continue
                dsc, hd, n = zip(*values)
                rows.append(dict(method=method, site=name, label=label, cases=sum(n), seeds=len(values),
                                 dsc=_nanmean(dsc), hd95=_nanmean(hd), dsc_std=_nanstd(dsc), hd95_std=_nanstd(hd)))
    return rows


# --- paired comparisons ----------------------------------------------------------------------

def comparisons(methods: list[str]) -> list[tuple[str, str]]:
    """(method, reference) pairs: every method against centralized and every federated one
    against local; p2pfed's asym rule against the reference rule; FFE's variants against FFE;
    FFE and its many merges against the pooled training that makes as many updates."""
    pairs = [(m, "centralized") for m in methods if m != "centralized"]
    pairs += [(m, "local") for m in methods if m in FEDERATED]
    pairs += [("AsymFedAvg", "AsymFedAvg-ref")] + [(v, "FFE") for v in VARIANTS + SECURE_METHODS]
    pairs += [(m, "centralized-big-batch") for m in ("FFE", "FFE-many-merges")]  # the same number of updates
    return [(a, b) for a, b in dict.fromkeys(pairs) if a in methods and b in methods]


def bootstrap_ci(groups: list[np.ndarray], resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean difference by a two-stage bootstrap: draw the
    groups (seeds, i.e. trainings) with replacement, then each drawn group's cases with
    replacement, and average all drawn cases. Resampling the seeds is what puts the
    training noise into the interval; with one group it is the plain case bootstrap."""
    rng = np.random.default_rng(seed)
    # Each group's resampled case sums first, so one group draws exactly the plain bootstrap.
    sums = np.stack([g[rng.integers(0, len(g), (resamples, len(g)))].sum(axis=1) for g in groups], axis=1)
    sizes = np.array([len(g) for g in groups])
    drawn = rng.integers(0, len(groups), (resamples, len(groups)))
    means = np.take_along_axis(sums, drawn, axis=1).sum(axis=1) / sizes[drawn].sum(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired(per_case: dict, a: str, b: str, site_names: list[str], unseen: str | None = None) -> dict:
    """Per-case DSC of `a` minus `b` on the same test cases (same seed, site, case and, at the
    unseen site, the model of the same site), per site, over all trained sites ("mean"),
    and at the unseen site: {site: {"diff", "low", "high", "cases", "seeds"}}. The interval
    resamples seeds, then cases (bootstrap_ci)."""
    def by_key(method, name):
        return {(c["seed"], c["model"], c["case"]): case_dsc(c) for c in per_case.get((method, name), [])}

    out, pooled = {}, {}
    for name in site_names + ([unseen] if unseen else []):
        x, y = by_key(a, name), by_key(b, name)
        by_seed = {}
        for k in sorted(set(x) & set(y)):
            if not np.isnan(d := x[k] - y[k]):
                by_seed.setdefault(k[0], []).append(d)
        if name != unseen:
            for s, d in by_seed.items():
                pooled.setdefault(s, []).extend(d)
        if by_seed:
            out[name] = _summary(by_seed)
    if pooled:
        out["mean"] = _summary(pooled)
    return out


def _summary(by_seed: dict[int, list[float]]) -> dict:
    groups = [np.array(by_seed[s]) for s in sorted(by_seed)]
    low, high = bootstrap_ci(groups)
    d = np.concatenate(groups)
    return {"diff": float(d.mean()), "low": low, "high": high, "cases": int(len(d)), "seeds": len(groups)}


def paired_markdown(pairs: dict, columns: list[str], unseen: str | None) -> str:
    head = [("trained sites" if c == "mean" else f"{c} (unseen)" if c == unseen else c) for c in columns]
    lines = ["| DSC difference, 95 % CI | " + " | ".join(head) + " |", "|---|" + "---:|" * len(columns)]
    for name, by_site in pairs.items():
        cells = [f"{v['diff']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]" if (v := by_site.get(c)) else ""
                 for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- outputs ---------------------------------------------------------------------------------

def _columns(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["site"] for r in rows))


def markdown(rows: list[dict], label: str = "mean", dp: dict | None = None, unseen: str | None = None) -> str:
    """The paper-style table: a row per method, DSC and HD95 (mm) per site, over the trained
    sites and at the unseen site; mean ± standard deviation over seeds when there are several;
    with `dp` (the FFE+DP row's setting and epsilon) a line on it below."""
    sites = _columns(rows)
    cell = {(r["method"], r["site"]): r for r in rows if r["label"] == label}
    head = [("mean" if s == "mean" else f"{s} (unseen)" if s == unseen else s) for s in sites]
    lines = ["| method | " + " | ".join(f"{s} DSC | {s} HD95" for s in head) + " |",
             "|---|" + "---:|---:|" * len(sites)]

    def fmt(r, key, digits):
        std = r.get(f"{key}_std", float("nan"))
        return f"{r[key]:.{digits}f}" + ("" if std is None or np.isnan(std) else f" ± {std:.{digits}f}")

    for method in _methods_of(rows):
        values = [f"{fmt(cell[method, s], 'dsc', 3)} | {fmt(cell[method, s], 'hd95', 2)}" if (method, s) in cell
                  else " | " for s in sites]
        lines.append(f"| {method} | " + " | ".join(values) + " |")
    if dp:
        lines += ["", f"FFE+DP: clip C = {dp['clip']:g}, noise multiplier z = {dp['noise_multiplier']:g}, "
                      f"delta = {dp['delta']:g}: epsilon = {dp['epsilon']:.4g} after {dp['rounds']} rounds"]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, unseen: str | None = None) -> None:
    """Grouped bars per site (the mean, the unseen site): DSC left, HD95 right, one bar per
    method, with the standard deviation over seeds as error bars when there are several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = _columns(rows)
    cell = {(r["method"], r["site"]): r for r in rows if r["label"] == "mean"}
    methods = _methods_of(rows)  # the methods of this run, in table order
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 1.6 * len(sites) * 2), 3.6))
    width = 0.8 / len(methods)
    for ax, key, title in zip(axes, ("dsc", "hd95"), ("DSC (higher is better)", "HD95 in mm (lower is better)")):
        for i, method in enumerate(methods):
            values = [cell[method, s][key] if (method, s) in cell else np.nan for s in sites]
            errors = [cell[method, s].get(f"{key}_std", np.nan) if (method, s) in cell else np.nan for s in sites]
            ax.bar(np.arange(len(sites)) + (i - (len(methods) - 1) / 2) * width, values, width, label=method,
                   yerr=None if np.all(np.isnan(errors)) else np.nan_to_num(errors), capsize=2)
        ax.set_xticks(range(len(sites)), [f"{s}\n(unseen)" if s == unseen else s for s in sites])
        ax.set_title(title, fontsize=10)
    # near-perfect scores would be indistinguishable bars on a 0..1 axis: start at a tenth below
    low = max(0.0, np.floor(np.nanmin([cell[k]["dsc"] for k in cell]) * 10 - 0.5) / 10)
    axes[0].set_ylim(low, 1)
    if low:
        axes[0].set_title(f"DSC (higher is better; axis starts at {low:.1f})", fontsize=10)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=min(len(methods), 6), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.07 * (1 + (len(methods) - 1) // 6), 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


CSV_FIELDS = ["method", "site", "label", "cases", "seeds", "dsc", "dsc_std", "hd95", "hd95_std"]


def write_outputs(out: Path, per_case: dict, meta: dict) -> str:
    """quality.{csv,json,md,png} from the per-case metrics; returns the Markdown."""
    sites, unseen = meta["site_names"], meta.get("unseen_site")
    rows = table_rows(per_case, sites, unseen)
    methods = _methods_of(rows)
    pairs = {f"{a} − {b}": paired(per_case, a, b, sites, unseen) for a, b in comparisons(methods)}
    with open(out / "quality.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    cases = [{"method": m, "site": s, **c} for (m, s), cs in sorted(per_case.items()) for c in cs]
    (out / "quality.json").write_text(json.dumps({**meta, "rows": rows, "paired": pairs, "cases": cases}, indent=1))
    seeds = sorted({c["seed"] for c in cases})
    text = (markdown(rows, dp=meta.get("dp"), unseen=unseen)
            + f"\nSeeds: {', '.join(map(str, seeds))}" + (" (mean ± standard deviation over seeds)" if len(seeds) > 1
                                                          else "") + ".\n"
            + ("\nPaired per-case DSC differences (mean, 95 % bootstrap interval over "
               + ("seeds, then their test cases" if len(seeds) > 1 else "test cases") + "):\n\n"
               + paired_markdown(pairs, sites + ["mean"] + ([unseen] if unseen else []), unseen) if pairs else ""))
    (out / "quality.md").write_text(text)
    plot(rows, out / "quality.png", unseen)
    return text


# --- command line ---------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for quality.{csv,json,md,png}")
    p.add_argument("--quick", action="store_true", help="tiny settings (a few minutes): the test's")
    p.add_argument("--task", choices=synthetic.TASKS, default="hard",
                   help="synthetic task and its preset [default: hard, the study's]")
    p.add_argument("--configuration", choices=["2d", "3d_fullres"], default="2d",
                   help="nnU-Net configuration; 3d_fullres trains on 3-D volumes")
    p.add_argument("--sites", type=int)
    p.add_argument("--rounds", type=int, help="federated rounds")
    p.add_argument("--epochs-per-round", type=int)
    p.add_argument("--iterations", type=int, help="nnU-Net iterations per epoch (per site)")
    p.add_argument("--val-iterations", type=int)
    p.add_argument("--train-cases", type=int, nargs="+", help="labelled cases per site, one value or one per "
                                                             "site [default: the task's]")
    p.add_argument("--test-cases", type=int, help="held-out test cases per site")
    p.add_argument("--unseen", action=argparse.BooleanOptionalAction,
                   help="test every model on a site that none trains on (hard task)")
    p.add_argument("--size", type=int, nargs="+", help="image size at the nominal spacing (H W, or Z Y X)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, help="mirroring at prediction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modalities", type=str.upper, nargs="+", choices=synthetic.CHANNELS,
                   help="each site's modality, cycled over the sites (CT MRI CT: asym methods only) [default: CT]")
    p.add_argument("--optimizer-state", choices=["local", "reset"], default="local",
                   help="federated methods: each site's SGD momentum after a merge (p2pfed init --optimizer-state)")
    p.add_argument("--jobs", type=int, default=1, help="methods trained at the same time")
    p.add_argument("--workdir", type=Path, help="keep the sites, models and predictions here [default: temporary]")
    p.add_argument("--methods", help=f"comma-separated, of {','.join(ALL_METHODS)} [default: {','.join(METHODS)}; "
                                     f"{','.join(SECURE_METHODS)} only with --sites {MIN_SECURE_SITES} or more]")
    p.add_argument("--dp-clip", type=float, default=DP_CLIP, help="FFE+DP: the L2 bound of each site's update")
    p.add_argument("--dp-noise-multiplier", type=float, default=DP_NOISE_MULTIPLIER,
                   help="FFE+DP: the aggregate's noise std over --dp-clip")
    p.add_argument("--dp-delta", type=float, default=DP_DELTA, help="FFE+DP: the delta epsilon is reported for")
    p.add_argument("--merge", type=merge_source, nargs="+", metavar="RUN[:METHODS]",
                   help="no training: combine the quality.json of these earlier runs (same settings; "
                        "different methods or seeds) into --out; RUN:A,B takes only methods A and B of RUN")
    args = p.parse_args(argv)
    given_cases = args.train_cases
    for key, value in PRESETS["quick" if args.quick else args.task].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dim = 3 if args.configuration == "3d_fullres" else 2
    if args.modalities and set(args.modalities) == {"CT"}:
        args.modalities = None  # the default, recorded as earlier runs recorded it
    mixed = len(set(site_modalities(args))) > 1
    if args.train_cases:  # one value for all sites, or the preset's cycled over --sites
        if given_cases and len(given_cases) not in (1, args.sites):
            p.error(f"--train-cases: give one value or {args.sites}")
        args.train_cases = [args.train_cases[i % len(args.train_cases)] for i in range(args.sites)]
    if args.merge:
        if args.methods:
            p.error("--merge takes the methods of the runs it merges, not --methods")
        return args
    if args.unseen and args.sites >= synthetic.hard_profiles():
        p.error(f"--unseen: the unseen site is site {synthetic.hard_profiles()}; use --sites "
                f"{synthetic.hard_profiles() - 1} or fewer")
    if args.size and len(args.size) != args.dim:
        p.error(f"--size: give {args.dim} values for {args.configuration}")
    default = ANY_MODALITY if mixed else METHODS
    methods = default if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown or not methods:
        p.error(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from {','.join(ALL_METHODS)}")
    one_plan = [m for m in methods if m not in ANY_MODALITY]
    if mixed and one_plan:
        p.error(f"--methods {','.join(one_plan)}: one plan normalizes every site alike, so its sites need one "
                f"modality; with --modalities {' '.join(args.modalities)} run {','.join(ANY_MODALITY)}")
    secure = [m for m in methods if m in SECURE_METHODS]
    if secure and args.sites < MIN_SECURE_SITES:
        p.error(f"--methods {','.join(secure)}: secure aggregation needs --sites {MIN_SECURE_SITES} or more")
    if "FFE-few-merges" in methods and args.rounds % FEW_MERGES:
        p.error(f"--methods FFE-few-merges: --rounds must be a multiple of {FEW_MERGES}")
    if "FFE-many-merges" in methods and args.iterations % MANY_MERGES:
        p.error(f"--methods FFE-many-merges: --iterations must be a multiple of {MANY_MERGES}")
    args.methods = [m for m in ALL_METHODS if m in methods]
    return args


def _dp(secure: dict) -> dict | None:
    """The FFE+DP row's setting and the epsilon spent after all rounds (from its status)."""
    doc = (secure.get("FFE+DP") or {}).get("dp")
    return {"method": "FFE+DP", **doc} if doc else None


def _cases_of(doc: dict) -> dict:
    """{(method, site): [cases]} of a quality.json; runs before seeds and the unseen site were
    recorded get the run's seed and the site's own model."""
    per_case = {}
    for c in doc["cases"]:
        c = {"seed": doc["settings"].get("seed", 0), "model": c["site"], **c}
        per_case.setdefault((c.pop("method"), c.pop("site")), []).append(c)
    return per_case


def merge_source(text: str) -> tuple[Path, list[str] | None]:
    """--merge's RUN or RUN:A,B (only methods A and B of that run)."""
    run, _, methods = text.partition(":")
    chosen = [m.strip() for m in methods.split(",") if m.strip()] or None
    unknown = [m for m in chosen or [] if m not in ALL_METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"{text}: unknown method {', '.join(unknown)}")
    return Path(run), chosen


def _load_run(run: Path, methods: list[str] | None) -> dict:
    doc = json.loads((run / "quality.json").read_text())
    if methods:
        doc["cases"] = [c for c in doc["cases"] if c["method"] in methods]
        if not doc["cases"]:
            raise SystemExit(f"--merge: {run} has none of {', '.join(methods)}")
        if doc.get("merged_from"):  # an earlier merge: the runs those methods came from
            doc["merged_from"] = [{**e, "methods": [m for m in e["methods"] if m in methods]}
                                  for e in doc["merged_from"] if set(e["methods"]) & set(methods)]
    return doc


def merge(args) -> int:
    """Combine earlier runs' quality.json (each method and seed from one run only) into --out."""
    docs = [(run, _load_run(run, methods)) for run, methods in args.merge]
    first_run, first = docs[0]
    for run, doc in docs[1:]:
        differ = [k for k in SAME_SETTINGS if doc["settings"].get(k) != first["settings"].get(k)]
        if differ:
            raise SystemExit(f"--merge: {run} and {first_run} differ in {', '.join(differ)}; not comparable")
    owner, per_case = {}, {}
    for run, doc in docs:
        cases = _cases_of(doc)
        # each case's own seed: an earlier merge (several seeds) merges again with a new seed
        for method, seed in sorted({(m, c["seed"]) for (m, _), cs in cases.items() for c in cs}):
            if (method, seed) in owner:
                raise SystemExit(f"--merge: {method} with seed {seed} is in both {owner[method, seed]} and {run}")
            owner[method, seed] = run
        for key, cs in cases.items():
            per_case.setdefault(key, []).extend(cs)
    dp = next((doc["dp"] for _, doc in docs if doc.get("dp")), None)
    meta = {"settings": {k: first["settings"].get(k) for k in SAME_SETTINGS},
            "site_names": first.get("site_names") or [s for s in _columns(first["rows"]) if s != "mean"],
            "unseen_site": first.get("unseen_site"), "methods": _methods_of(per_case),
            "seeds": sorted({seed for _, seed in owner}), "steps_per_site": first["steps_per_site"],
            # the runs by folder name (no machine paths); a merged table lists the runs it came from
            "merged_from": [entry for run, doc in docs for entry in doc.get("merged_from") or [
                {"run": run.name, "methods": _methods_of(doc["cases"]), "settings": doc["settings"],
                 "machine": doc.get("machine"), "wall_s": doc.get("wall_s"), "batch_size": doc.get("batch_size")}]],
            "secure_aggregation": {k: v for _, doc in docs for k, v in (doc.get("secure_aggregation") or {}).items()},
            "dp": dp, "wall_s": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    print(write_outputs(args.out, per_case, meta))
    print("methods from: " + "; ".join(f"{run}: {', '.join(_methods_of(doc['cases']))}" for run, doc in docs))
    return 0


def _settings(args) -> dict:
    """The run's settings as JSON, without this machine's paths, and the digest of the task's
    scanners (a recalibrated task does not merge with results of the one before)."""
    return {**{k: (v.name if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("workdir",)},
            "scanners": synthetic.scanners_digest(args.task)}


def share_the_cores(jobs: int) -> None:
    """Give each of `jobs` concurrent trainings its share of the cores (torch's threads, in the
    child processes): more threads than cores made every epoch several times slower here."""
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    share_the_cores(args.jobs)
    args.out.mkdir(parents=True, exist_ok=True)
    say = lambda line: print(line, flush=True)  # noqa: E731
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="p2pfed-quality-") as tmp:
        work = (args.workdir or Path(tmp)).absolute()
        logs = args.out / "logs"
        logs.mkdir(exist_ok=True)
        # The local sites' folders hold the test cases every method is evaluated on.
        sites = simulate.make_sites(work / "local", args.sites, seed=args.seed, n_train=args.train_cases,
                                    n_test=args.test_cases, size=args.size, task=args.task, dim=args.dim,
                                    channels=site_channels(args))
        unseen = make_unseen(args, work)
        models, wall, secure = train_all(args, sites, work, logs, say)
        batches = batch_sizes(models, args.configuration)
        # the unseen site's labels are the same in every modality: any of its folders will do
        per_case = evaluate(predict_all(args, models, sites, unseen, work, logs), sites + list(unseen.values())[:1],
                            args.seed)
    wall["total"] = round(time.monotonic() - started, 1)
    meta = {"settings": _settings(args), "site_names": [s.name for s in sites],
            "unseen_site": next(iter(unseen.values())).name if unseen else None,
            "steps_per_site": args.rounds * args.epochs_per_round * args.iterations,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "wall_s": wall, "batch_size": batches, "secure_aggregation": secure, "dp": _dp(secure)}
    say("\n" + write_outputs(args.out, per_case, meta))
    say(f"{meta['steps_per_site']} optimizer steps per site; wall {wall}; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
