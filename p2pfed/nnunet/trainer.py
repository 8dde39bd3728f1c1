"""The nnU-Net implementation of `p2pfed.protocol.trainer.LocalTrainer`.

nnU-Net reads its folders from the environment at import time, so nothing here
imports it before a method that needs it runs (an idle tick never does)."""
from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Callable

from ..dataset import check_trainable, dataset_json, dataset_name
from ..errors import SetupError
from ..faults import crash_point
from ..federation import Settings
from ..protocol.trainer import Trained, Weights
from ..site import SiteConfig


def _finite(obj):
    """NaN/inf metrics (an empty validation batch) become null: JSON has no NaN."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def fold_cases(raw: str, preprocessed: str, dataset: str, fold: int) -> int:
    """The number of training cases of `fold`, as nnU-Net's `do_split` will pick them,
    without importing nnU-Net (declared before preprocessing has run): the labelled
    cases (counted as `check_trainable` counts them; a dataset whose files do not match
    its file ending is refused later, by the fingerprint, with a better message);
    splits_final.json if there is one; else the 5-fold KFold it will write (the first
    n % 5 folds validate on one case more); a fold beyond the splits: its random 80:20."""
    name = dataset_name(raw, dataset)
    info = dataset_json(raw, dataset)
    if isinstance(info.get("dataset"), dict):  # cases listed in dataset.json, not in imagesTr
        n = len(info["dataset"])
    else:
        n = len([p for p in (Path(raw) / name / "labelsTr").glob("*") if not p.name.startswith(".")])
    splits_file = Path(preprocessed) / name / "splits_final.json"
    splits = json.loads(splits_file.read_text()) if splits_file.exists() else None
    if fold >= (len(splits) if splits is not None else 5):
        return int(n * 0.8)
    if splits is not None:
        return len(splits[fold]["train"])
    return n - (n // 5 + (1 if fold % 5 < n % 5 else 0))


class NnunetTrainer:
    def __init__(self, config: SiteConfig, settings: Settings, say: Callable[[str], None] = lambda s: None,
                 progress=None):
        self.config, self.s, self.say, self.progress = config, settings, say, progress
        self._active = False

    # -- helpers -------------------------------------------------------------------------
    def _activate(self) -> None:
        from . import activate

        if not self._active:
            activate(self.config.nnunet_raw, self.config.nnunet_preprocessed, self.config.nnunet_results)
            self._active = True

    def _spec(self):
        from .train import TrainSpec

        self._activate()
        return TrainSpec(dataset=self.config.dataset, configuration=self.s.configuration,
                         raw=Path(self.config.nnunet_raw), preprocessed=Path(self.config.nnunet_preprocessed),
                         results=Path(self.config.nnunet_results), fold=self.s.fold, trainer=self.s.trainer,
                         plans=self.s.plans_identifier, device=self.config.device,
                         iterations_per_epoch=self.s.iterations_per_epoch, val_iterations=self.s.val_iterations,
                         total_epochs=self.s.total_epochs, optimizer_state=self.s.optimizer_state,
                         initial_lr=self.s.learning_rate)

    def _checkpoint(self) -> Path:
        return (Path(self.config.nnunet_results) / dataset_name(self.config.nnunet_raw, self.config.dataset)
                / f"{self.s.trainer}__{self.s.plans_identifier}__{self.s.configuration}"
                / f"fold_{self.s.fold}" / "checkpoint_latest.pth")

    # -- LocalTrainer ----------------------------------------------------------------------
    def check_ready(self) -> None:
        check_trainable(self.config.nnunet_raw, self.config.nnunet_preprocessed, self.config.dataset, self.s.fold)

    def cases(self) -> int:
        return fold_cases(self.config.nnunet_raw, self.config.nnunet_preprocessed, self.config.dataset, self.s.fold)

    def check_checkpoint(self) -> None:
        """nnU-Net resumes from checkpoint_latest.pth (a torch zip); a truncated one (disk
        full, a copy cut short) would end in a traceback deep inside torch.load."""
        path = self._checkpoint()
        if not path.exists():
            return
        try:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError):
            damaged = path.name
        if damaged is not None:
            raise SetupError(f"the local nnU-Net checkpoint {path} is corrupt (truncated or damaged)",
                             "restore it from a backup, or delete it: training then resumes from the "
                             "federation's last merge with a fresh optimizer state")

    def summary(self) -> dict:
        self._activate()
        from .fingerprint import local_summary

        self.say("computing the local fingerprint summary")
        return local_summary(self.config.dataset)

    def histograms(self, ranges: list) -> dict:
        self._activate()
        from .fingerprint import local_histograms

        self.say("computing local histograms over the federation's intensity range")
        return local_histograms(self.config.dataset, ranges)

    def plan(self, fingerprint: dict | None) -> dict:
        self._activate()
        from .fingerprint import local_fingerprint, plan_and_preprocess, write_fingerprint

        if fingerprint is None:
            self.say("extracting the local nnU-Net fingerprint (asym mode)")
            fingerprint = local_fingerprint(self.config.dataset)
        write_fingerprint(self.config.dataset, fingerprint)
        self.say(f"planning and preprocessing ({self.s.configuration})")
        return plan_and_preprocess(self.config.dataset, self.s.planner, self.s.gpu_memory_target,
                                   self.s.plans_identifier, self.s.configuration)

    def initial_weights(self) -> Weights:
        from .train import initial_weights

        self.say("building the initial model")
        return initial_weights(self._spec())

    def train(self, r: int, base: Weights | None) -> Trained:
        from .train import train_round

        self.check_checkpoint()
        spec = self._spec()
        start = (r - 1) * self.s.epochs_per_round
        self.say(f"round {r}/{self.s.rounds}: training {self.s.epochs_per_round} epoch(s) from epoch {start}")
        res = train_round(spec, base, self.s.epochs_per_round, progress=self._progress, start_epoch=start)
        metrics = {"train_loss": res.train_loss, "val_loss": res.val_loss, "pseudo_dice": res.pseudo_dice,
                   "pseudo_dice_per_class": list(res.pseudo_dice_per_class),
                   "ema_pseudo_dice": res.ema_pseudo_dice, "learning_rate": res.learning_rate}
        return Trained(res.weights, res.num_train_cases, res.epoch, _finite(metrics))

    def _progress(self, epoch: int, iteration: int, total: int) -> None:
        crash_point("train")
        if self.progress:
            self.progress(epoch, iteration, total)

    def export_final(self, weights: Weights) -> tuple[Path, dict | None]:
        """nnU-Net's standard results folder with the final merge, and its validation Dice."""
        from .train import export_final, validation_dice

        spec = self._spec()
        self.say("writing the final nnU-Net results folder")
        folder = export_final(spec, weights, run_validation=self.s.final_validation)
        return folder, (validation_dice(folder, self.s.fold) if self.s.final_validation else None)
