"""nnU-Net side of Federated Fingerprint Extraction (docs/design.md, section 6).

Reads the site's raw dataset exactly as nnU-Net's DatasetFingerprintExtractor does (reader
chosen from dataset.json, `crop_to_nonzero`, foreground = label > 0 after cropping) and
turns it into the payloads that `p2pfed.ffe` merges; writes the merged fingerprint where
nnU-Net expects it and runs nnU-Net's own planner and preprocessing.

Call `p2pfed.nnunet.activate(raw, preprocessed, results)` first; nnunetv2 is imported
lazily inside the functions. `run_calls` runs a list of these calls in a fresh process
(`python -m p2pfed.nnunet.fingerprint`), as nnU-Net fixes its folders at import time.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from .. import ffe
from ..errors import DatasetError, P2PFedError, SetupError


# --- dataset access ------------------------------------------------------------------------

def _resolve(dataset: int | str) -> tuple[str, Path, dict]:
    """Dataset name, raw folder and dataset.json of an id (101) or name (Dataset101_SiteA)."""
    if not os.environ.get("nnUNet_raw"):
        raise SetupError("nnU-Net folders are not set", "call p2pfed.nnunet.activate() first")
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        name = maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError):
        raise DatasetError(f"dataset {dataset}: no such dataset under nnUNet_raw") from None
    folder = Path(nnUNet_raw) / name
    try:
        dataset_json = json.loads((folder / "dataset.json").read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"{name}: cannot read dataset.json ({e.__class__.__name__})") from None
    return name, folder, dataset_json


def _cases(name: str, folder: Path, dataset_json: dict) -> dict[str, dict]:
    """nnU-Net's training cases {id: {images, label}}, checked file by file."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    try:
        cases = get_filenames_of_train_images_and_targets(str(folder), dataset_json)
    except FileNotFoundError:
        raise DatasetError(f"{name}: imagesTr is missing") from None
    n_channels = len(dataset_json["channel_names"])
    for case, files in cases.items():
        if len(files["images"]) != n_channels:
            raise DatasetError(f"{name}: case {case}: {len(files['images'])} channel files, "
                               f"dataset.json declares {n_channels}")
        if not os.path.isfile(files["label"]):
            raise DatasetError(f"{name}: case {case}: images but no label in labelsTr")
    if len(cases) != int(dataset_json["numTraining"]) or not cases:
        raise DatasetError(f"{name}: dataset.json numTraining is {dataset_json['numTraining']}, "
                           f"imagesTr holds {len(cases)} cases")
    return {str(k): v for k, v in cases.items()}


def _label_values(labels: dict) -> set[int]:
    values = set()
    for v in labels.values():  # region-based datasets map a name to a list of labels
        values.update(v if isinstance(v, (list, tuple)) else [v])
    return {int(v) for v in values}


def _foreground(task: tuple) -> tuple[dict, list[np.ndarray]]:
    """Load, check and crop one case like nnU-Net: its geometry and, per channel, the
    foreground voxel intensities (label > 0 inside the nonzero bounding box)."""
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    name, case, files, reader, allowed = task
    where = f"{name}: case {case}"
    try:
        with contextlib.redirect_stdout(sys.stderr):
            data, properties = reader().read_images(files["images"])
            seg, _ = reader().read_seg(files["label"])
    except Exception as e:  # any reader failure is a dataset problem of this case
        raise DatasetError(f"{where}: cannot read its files ({e.__class__.__name__}: {e})") from None
    if not np.all(np.isfinite(data)):
        raise DatasetError(f"{where}: image has NaN or infinite voxels")
    if seg.shape[1:] != data.shape[1:]:
        raise DatasetError(f"{where}: label shape {seg.shape[1:]} differs from image shape {data.shape[1:]}")
    unknown = set(np.unique(seg).astype(np.int64).tolist()) - allowed if np.all(np.isfinite(seg)) else {"NaN"}
    if unknown:
        raise DatasetError(f"{where}: label values {sorted(unknown, key=str)} not declared in dataset.json")
    shape_before = data.shape[1:]
    data, seg, _ = crop_to_nonzero(data, seg)
    mask = seg[0] > 0
    geometry = {"spacing": [float(s) for s in properties["spacing"]],
                "shape_after_crop": [int(s) for s in data.shape[1:]],
                "relative_size_after_crop": float(np.prod(data.shape[1:]) / np.prod(shape_before))}
    return geometry, [channel[mask] for channel in data]


def _summarize_case(task: tuple) -> tuple[dict, list]:
    geometry, values = _foreground(task)
    return geometry, [ffe.case_moments(v) for v in values]


def _histogram_case(task: tuple) -> list:
    name, case, *_, ranges, bins = task
    _, values = _foreground(task[:-2])
    try:
        return [ffe.case_histogram(v, lo, hi, bins) if v.size else None for v, (lo, hi) in zip(values, ranges)]
    except DatasetError as e:
        raise DatasetError(f"{name}: case {case}: {e.message}", e.hint) from None


def _imap(fn, tasks: list, num_processes: int, desc: str):
    """fn over tasks, results in order as they come, in a spawn pool when num_processes > 1
    (as nnU-Net does); a progress bar on a terminal."""
    from tqdm import tqdm

    bar = {"desc": desc, "total": len(tasks), "disable": not sys.stderr.isatty()}
    if num_processes <= 1 or len(tasks) <= 1:
        yield from tqdm(map(fn, tasks), **bar)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(min(num_processes, len(tasks))) as pool:
        yield from tqdm(pool.imap(fn, tasks), **bar)


def _tasks(dataset: int | str) -> tuple[str, dict, list[tuple]]:
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    name, folder, dataset_json = _resolve(dataset)
    try:
        info = ffe.dataset_info(dataset_json)
    except DatasetError as e:
        raise DatasetError(f"{name}: {e.message}") from None
    cases = _cases(name, folder, dataset_json)
    first = next(iter(cases.values()))["images"][0]
    try:
        with contextlib.redirect_stdout(sys.stderr):
            reader = determine_reader_writer_from_dataset_json(dataset_json, first, verbose=False)
    except RuntimeError:
        raise DatasetError(f"{name}: no nnU-Net reader opens {Path(first).name}") from None
    allowed = _label_values(dataset_json["labels"])
    return name, info, [(name, case, files, reader, allowed) for case, files in cases.items()]


# --- FFE payloads --------------------------------------------------------------------------

def local_summary(dataset: int | str, num_processes: int = 1) -> dict:
    """This site's FFE summary payload (docs/design.md, section 6, "Summary payload")."""
    name, info, tasks = _tasks(dataset)
    results = list(_imap(_summarize_case, tasks, num_processes, f"{name}: summary"))
    summary = ffe.site_summary(info, [g for g, _ in results], [m for _, m in results])
    if summary["foreground"][0]["cases"] == 0:
        raise DatasetError(f"{name}: no training case has foreground (label > 0) voxels")
    return summary


def local_histograms(dataset: int | str, ranges: list, bins: int = ffe.DEFAULT_BINS,
                     num_processes: int = 1) -> dict:
    """This site's FFE histogram payload over the federation's `ranges` (from
    `ffe.global_ranges`): per channel, the sum over cases of each case's foreground
    histogram normalized to mass 1, so the merge can weight cases equally."""
    name, _, tasks = _tasks(dataset)
    totals = [np.zeros(bins, dtype=np.float64) for _ in ranges]
    for case in _imap(_histogram_case, [t + (ranges, bins) for t in tasks], num_processes, f"{name}: histograms"):
        # summed in case order as they arrive: the same bits on every run, one case in memory
        for total, h in zip(totals, case):
            if h is not None:
                total += h
    return ffe.histogram_payload(ranges, bins, totals)


# --- nnU-Net's files and planner -----------------------------------------------------------

def _preprocessed(name: str) -> Path:
    from nnunetv2.paths import nnUNet_preprocessed

    return Path(nnUNet_preprocessed) / name


def write_fingerprint(dataset: int | str, fingerprint: dict) -> Path:
    """Write the (federated) fingerprint as nnUNet_preprocessed/<name>/dataset_fingerprint.json,
    with dataset.json beside it, as nnU-Net's own extraction and planning do."""
    from batchgenerators.utilities.file_and_folder_operations import save_json

    name, folder, dataset_json = _resolve(dataset)
    if len(fingerprint["foreground_intensity_properties_per_channel"]) != len(dataset_json["channel_names"]):
        raise DatasetError(f"{name}: the fingerprint has another number of channels than dataset.json")
    out = _preprocessed(name)
    out.mkdir(parents=True, exist_ok=True)
    save_json(fingerprint, str(out / "dataset_fingerprint.json"))  # nnU-Net's own writer and layout
    (out / "dataset.json").write_bytes((folder / "dataset.json").read_bytes())
    return out / "dataset_fingerprint.json"


def local_fingerprint(dataset: int | str, num_processes: int = 1) -> dict:
    """nnU-Net's own fingerprint of the local data (asym mode, and the pooled baseline)."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import \
        DatasetFingerprintExtractor

    name, _, _ = _resolve(dataset)
    with contextlib.redirect_stdout(sys.stderr):
        extractor = DatasetFingerprintExtractor(name, num_processes, verbose=False)
        extractor.show_progress_bar = sys.stderr.isatty()
        extractor.run(overwrite_existing=True)
    return json.loads((_preprocessed(name) / "dataset_fingerprint.json").read_text())


def plan_and_preprocess(dataset: int | str, planner_class_name: str = "ExperimentPlanner",
                        gpu_memory_target_gb: float | None = None, plans_identifier: str | None = None,
                        configuration: str | None = "2d", num_processes: int = 1) -> dict:
    """Run nnU-Net's planner class on the fingerprint in nnUNet_preprocessed, then nnU-Net's
    preprocessing for `configuration` only (None: plan only). Returns the plans as written.

    The one input we change: the planner caps the batch size at 5 % of the dataset, using
    dataset.json's numTraining; we give it the number of cases in the fingerprint (the
    federation's), as the pooled dataset.json would."""
    import nnunetv2
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    name, _, _ = _resolve(dataset)
    if not (_preprocessed(name) / "dataset_fingerprint.json").is_file():
        raise SetupError(f"{name}: no dataset_fingerprint.json yet", "finish the fingerprint exchange first")
    planner_class = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "experiment_planning"),
                                                planner_class_name, current_module="nnunetv2.experiment_planning")
    if planner_class is None:
        raise SetupError(f"nnU-Net has no planner class {planner_class_name}")
    kwargs = {}
    if gpu_memory_target_gb is not None:
        kwargs["gpu_memory_target_in_gb"] = float(gpu_memory_target_gb)
    if plans_identifier:
        kwargs["plans_name"] = plans_identifier
    with contextlib.redirect_stdout(sys.stderr):
        planner = planner_class(name, **kwargs)
        plans_file = _preprocessed(name) / f"{planner.plans_identifier}.json"
        # save_plans keeps configurations of an existing plans file; members must not.
        plans_file.unlink(missing_ok=True)
        planner.dataset_json["numTraining"] = len(planner.dataset_fingerprint["spacings"])
        planner.plan_experiment()
        plans = json.loads(plans_file.read_text())
        if configuration is not None:
            if configuration not in plans["configurations"]:
                raise SetupError(f"{name}: the plans have no configuration {configuration!r} "
                                 f"(only {', '.join(plans['configurations'])})")
            preprocess_dataset(int(name[len("Dataset"):len("Dataset") + 3]), planner.plans_identifier,
                               [configuration], [num_processes], show_progress_bar=sys.stderr.isatty())
    return plans


# --- one process per site ------------------------------------------------------------------

_CALLS = {f.__name__: f for f in (local_summary, local_histograms, write_fingerprint, local_fingerprint,
                                  plan_and_preprocess)}


def run_calls(folders: list[str | Path], calls: list[dict], timeout: float | None = None) -> list:
    """Run adapter calls [{"fn": NAME, "kwargs": {...}}] in a fresh Python process with nnU-Net
    pointed at folders (raw, preprocessed, results); return their JSON results in order.
    A P2PFedError in the child is raised here as the same class; nnU-Net's stdout is dropped,
    its stderr (warnings, progress) passes through."""
    import subprocess
    import tempfile

    from .. import errors

    request = json.dumps({"folders": [str(f) for f in folders], "calls": calls})
    with tempfile.TemporaryDirectory(prefix="p2pfed-nnunet-") as tmp:
        out = Path(tmp) / "out.json"
        proc = subprocess.run([sys.executable, "-m", __name__, "--out", str(out)], input=request, text=True,
                              stdout=subprocess.DEVNULL, timeout=timeout)
        reply = json.loads(out.read_text()) if out.is_file() else None
    if reply is None:
        raise RuntimeError(f"nnU-Net subprocess died with exit code {proc.returncode} (see its stderr above)")
    if "error" in reply:
        raise getattr(errors, reply["error"], errors.P2PFedError)(reply["message"], reply["hint"])
    return reply["results"]


def main(argv: list[str] | None = None) -> int:
    """Child side of run_calls: request on stdin, {"results": [...]} or {"error", "message",
    "hint"} to --out (stdout belongs to nnU-Net's chatter); exit code of the error."""
    from . import activate

    parser = argparse.ArgumentParser(prog="python -m p2pfed.nnunet.fingerprint")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    request = json.load(sys.stdin)
    try:
        activate(*request["folders"])
        reply, code = {"results": [_CALLS[c["fn"]](**c.get("kwargs", {})) for c in request["calls"]]}, 0
    except P2PFedError as e:
        reply, code = {"error": type(e).__name__, "message": e.message, "hint": e.hint}, e.exit_code
    args.out.write_text(json.dumps(reply, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
