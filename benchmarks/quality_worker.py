"""nnU-Net side of benchmarks/quality.py, run in a fresh process (nnU-Net fixes its folders
at import time):

    python benchmarks/quality_worker.py train|predict < request.json

train: the non-federated baselines. nnU-Net's own fingerprint, planner and preprocessing
    of one dataset (what an asym site does locally), then p2pfed's round driver for all
    epochs in one go (the same trainer code, schedule and budget as a federated site,
    without merges), then the standard results folder with checkpoint_final.pth.
predict: nnU-Net's predictor on standard results folders, in the sequential mode that
    `nnUNetv2_predict -npp 0 -nps 0` uses; one process for every model pays the torch
    and nnU-Net imports once.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from p2pfed.nnunet import activate


def nnunet_split(raw: Path) -> list[dict]:
    """The 5 folds nnU-Net's trainer writes to splits_final.json for the dataset in `raw`
    (its sorted case ids, seed 12345)."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    ids = sorted(p.name[:-len(".nii.gz")] for p in (raw / "labelsTr").glob("*.nii.gz"))
    return generate_crossval_split(ids, seed=12345, n_splits=5)


def _preprocessed(dataset: int | str) -> Path:
    """The dataset's folder in nnUNet_preprocessed (of this worker's environment)."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    return Path(nnUNet_preprocessed) / maybe_convert_to_dataset_name(dataset)


def _write_pooled_splits(dataset: str, site_raw_dirs: list[str]) -> None:
    """splits_final.json of the pooled dataset: fold k = the union of every site's own fold k,
    each split exactly as nnU-Net's trainer splits a dataset (sorted ids, seed 12345), so the
    centralized model trains on the union of the cases the sites train on."""
    folds = [{"train": [], "val": []} for _ in range(5)]
    for raw in site_raw_dirs:
        for pooled, site in zip(folds, nnunet_split(Path(raw))):
            pooled["train"] += site["train"]
            pooled["val"] += site["val"]
    (_preprocessed(dataset) / "splits_final.json").write_text(json.dumps(folds, indent=1))


def _scale_batch(dataset: int, configuration: str, factor: int) -> None:
    """Multiply the planned batch size of `configuration` by `factor` in nnUNetPlans.json
    (the trainer reads it from there)."""
    path = _preprocessed(dataset) / "nnUNetPlans.json"
    plans = json.loads(path.read_text())
    plans["configurations"][configuration]["batch_size"] *= factor
    path.write_text(json.dumps(plans, indent=1))


def train(folders: list[str], dataset: int, configuration: str, epochs: int, iterations: int,
          val_iterations: int, pooled_from: list[str] | None = None, batch_scale: int = 1) -> None:
    from p2pfed.nnunet.fingerprint import local_fingerprint, plan_and_preprocess
    from p2pfed.nnunet.train import TrainSpec, export_final, train_round

    local_fingerprint(dataset)
    plan_and_preprocess(dataset, configuration=configuration)
    if pooled_from:
        _write_pooled_splits(dataset, pooled_from)
    if batch_scale != 1:
        _scale_batch(dataset, configuration, batch_scale)
    spec = TrainSpec(dataset, configuration, *map(Path, folders), iterations_per_epoch=iterations,
                     val_iterations=val_iterations, total_epochs=epochs)
    result = train_round(spec, None, epochs)
    export_final(spec, result.weights, run_validation=False)


def predict(jobs: list[dict], tta: bool) -> None:
    """jobs: [{"model": trainer folder, "inputs": [[images folder, output folder], ...]}]."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    for job in jobs:
        predictor = nnUNetPredictor(use_mirroring=tta, perform_everything_on_device=False,
                                    device=torch.device("cpu"), allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(job["model"], (0,), "checkpoint_final.pth")
        for images, output in job["inputs"]:
            Path(output).mkdir(parents=True, exist_ok=True)
            predictor.predict_from_files_sequential(images, output)


def main() -> int:
    request = json.load(sys.stdin)
    activate(*request["folders"])
    if sys.argv[1] == "train":
        train(request["folders"], **request["kwargs"])
    else:
        predict(**request["kwargs"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
