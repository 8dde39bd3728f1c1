"""Finding a site's nnU-Net raw dataset without importing nnU-Net (cheap checks at init/join)."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import DatasetError


def dataset_name(raw: str | Path, dataset: str) -> str:
    """'4', '004' or 'Dataset004_Liver' -> 'Dataset004_Liver', as nnU-Net resolves it."""
    raw = Path(raw)
    if dataset.startswith("Dataset"):
        name = dataset
    elif dataset.isdigit():
        prefix = f"Dataset{int(dataset):03d}_"
        found = sorted(p.name for p in raw.glob(prefix + "*") if p.is_dir()) if raw.is_dir() else []
        if len(found) > 1:
            raise DatasetError(f"several datasets with id {dataset} in {raw}: {', '.join(found)}",
                               "keep one, or pass the full DatasetXXX_Name")
        if not found:
            raise DatasetError(f"dataset {dataset} not found in nnUNet_raw ({raw})",
                               "check --dataset and --nnunet-raw")
        name = found[0]
    else:
        raise DatasetError(f"cannot read dataset id {dataset!r}", "use a number or DatasetXXX_Name")
    if not (raw / name).is_dir():
        raise DatasetError(f"dataset {name} not found in nnUNet_raw ({raw})",
                           "check --dataset and --nnunet-raw")
    return name


def dataset_json(raw: str | Path, dataset: str) -> dict:
    path = Path(raw) / dataset_name(raw, dataset) / "dataset.json"
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path.parent.name} has no dataset.json", "create it as nnU-Net requires") from None
    except ValueError as exc:
        raise DatasetError(f"{path.parent.name}/dataset.json is not valid JSON ({exc})") from None
    for key in ("channel_names", "labels", "file_ending"):
        if key not in obj:
            raise DatasetError(f"{path.parent.name}/dataset.json lacks {key!r}",
                               "nnU-Net v2 needs channel_names, labels, numTraining and file_ending")
    return obj


def check_trainable(raw: str | Path, preprocessed: str | Path, dataset: str, fold: int) -> None:
    """nnU-Net splits the training cases 5-fold unless splits_final.json says otherwise."""
    name = dataset_name(raw, dataset)
    n = len(list((Path(raw) / name / "labelsTr").glob("*")))
    if n < 5 and fold != -1 and not (Path(preprocessed) / name / "splits_final.json").exists():
        raise DatasetError(f"{name} has {n} labelled training cases; nnU-Net's 5-fold split needs at least 5",
                           f"add cases, or write nnUNet_preprocessed/{name}/splits_final.json with your own split")
