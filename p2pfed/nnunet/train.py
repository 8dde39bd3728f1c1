"""Drive nnU-Net's own trainer for one federated round in the current process.

A round (`train_round`): build the trainer from the site's plans, resume nnU-Net's
local state (optimizer, grad scaler, logger) from the site's `checkpoint_latest.pth`,
replace the network weights by the merged model, run `epochs` epochs with the
trainer's own hooks, save the checkpoint atomically, stop the augmentation workers
and return the new weights. `export_final` writes a standard nnU-Net results folder
that `nnUNetv2_predict` uses without p2pfed. See docs/design.md, section 7.4.

nnunetv2 and torch are imported inside the functions: `TrainSpec.activate()` must
set nnU-Net's folders before the first nnunetv2 import of the process.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..errors import SetupError
from . import activate as _activate_folders

if TYPE_CHECKING:  # pragma: no cover
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

Weights = dict[str, np.ndarray]
Progress = Callable[[int, int, int], None]

CHECKPOINT = "checkpoint_latest.pth"
FINAL_CHECKPOINT = "checkpoint_final.pth"
_COMPILED_PREFIX = "_orig_mod."  # torch.compile wraps the network and prefixes its keys
MOMENTUM = "optimizer.momentum_buffer."  # + parameter name: --optimizer-state merged


@dataclass(frozen=True)
class TrainSpec:
    """What one site needs to build its nnU-Net trainer.

    dataset: nnU-Net dataset id (101, "101") or name ("Dataset101_Prostate").
    configuration, fold, trainer, plans: as for `nnUNetv2_train DATASET CONFIG FOLD -tr -p`.
    device: "cpu", "cuda" or "mps".
    iterations_per_epoch, val_iterations: nnU-Net's num_(val_)iterations_per_epoch.
    total_epochs: epochs of the whole federation (rounds x epochs per round); nnU-Net's
        num_epochs, which sets the PolyLR schedule.
    optimizer_state: what each round's SGD momentum starts from (docs/design.md 7.4):
        "local", the one this site's last round left in its checkpoint; "reset", none (a
        fresh optimizer); "merged", the federation's merged momentum, which travels with
        the weights as MOMENTUM-prefixed tensors, one per network parameter.
    initial_lr: the trainer's initial_lr (where PolyLR starts); None: the trainer class's own.
    raw, preprocessed, results: the site's nnUNet_raw, nnUNet_preprocessed, nnUNet_results.
    """

    dataset: str | int
    configuration: str
    raw: Path
    preprocessed: Path
    results: Path
    fold: int | str = 0
    trainer: str = "nnUNetTrainer"
    plans: str = "nnUNetPlans"
    device: str = "cpu"
    iterations_per_epoch: int = 250
    val_iterations: int = 50
    total_epochs: int = 1000
    optimizer_state: str = "local"
    initial_lr: float | None = None

    def activate(self) -> None:
        """Point nnU-Net at this site's folders (before nnunetv2 is first imported)."""
        _activate_folders(self.raw, self.preprocessed, self.results)


@dataclass(frozen=True)
class RoundResult:
    """Outcome of `train_round`. Metrics are those nnU-Net logged for the last epoch.

    weights: the new state dict, float32 numpy, the network's own key names.
    epoch: index of the last epoch trained (0-based); the next round starts at epoch + 1.
    pseudo_dice: mean over foreground classes of nnU-Net's online validation Dice;
    pseudo_dice_per_class: the same per foreground class; ema_pseudo_dice: its
    moving average as nnU-Net logs it (restarted after skipped epochs).
    """

    weights: Weights
    num_train_cases: int
    epoch: int
    train_loss: float
    val_loss: float
    pseudo_dice: float
    pseudo_dice_per_class: tuple[float, ...]
    ema_pseudo_dice: float
    learning_rate: float


def initial_weights(spec: TrainSpec, seed: int = 0) -> Weights:
    """The freshly initialized network of this site's plans (the model of round 1).

    Seeded, without touching the process's global RNG; bits may still differ between
    machines, which does not matter: one site publishes it and everyone loads it.
    """
    import torch

    trainer = _make_trainer(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trainer.initialize()
    weights = _to_numpy(_bare_network(trainer).state_dict())
    if spec.optimizer_state == "merged":  # no momentum yet (zeros): SGD's first step makes it the gradient
        weights.update(_momentum_of(trainer))
    return weights


def split_momentum(weights: Weights) -> tuple[Weights, Weights]:
    """(network tensors, momentum tensors keyed by parameter name) of a merged model."""
    network = {k: v for k, v in weights.items() if not k.startswith(MOMENTUM)}
    return network, {k[len(MOMENTUM):]: v for k, v in weights.items() if k.startswith(MOMENTUM)}


def train_round(spec: TrainSpec, base_weights: Weights | None, epochs: int,
                progress: Progress | None = None, start_epoch: int | None = None) -> RoundResult:
    """Train `epochs` epochs from `base_weights` (the merged model) with nnU-Net's trainer.

    start_epoch: federation-wide index of this round's first epoch; it sets the LR
    schedule, so a site that missed rounds catches up on the right learning rate.
    None continues from the local checkpoint (0 without one). base_weights None keeps
    the checkpoint's (or freshly initialized) weights.
    """
    trainer = _make_trainer(spec)
    trainer.initialize()
    _resume(trainer)
    base_weights, momentum = split_momentum(base_weights) if base_weights is not None else (None, {})
    if spec.optimizer_state in ("reset", "merged"):
        reset_optimizer(trainer)
    first = trainer.current_epoch if start_epoch is None else start_epoch
    if epochs < 1 or first < 0 or first + epochs > spec.total_epochs:
        raise ValueError(f"epochs {first}..{first + epochs - 1} are outside 0..{spec.total_epochs - 1}")
    _set_epoch(trainer, first)
    if base_weights is not None:
        load_weights(trainer, base_weights)
    if spec.optimizer_state == "merged":
        load_momentum(trainer, momentum)
    try:
        trainer.on_train_start()
        for _ in range(epochs):
            _run_epoch(trainer, progress)
        _save_checkpoint(trainer, Path(trainer.output_folder) / CHECKPOINT)
    finally:
        _stop_workers(trainer)
    return _result(trainer, with_momentum=spec.optimizer_state == "merged")


def export_final(spec: TrainSpec, weights: Weights, run_validation: bool) -> Path:
    """Write `weights` as this site's nnU-Net model; return the trainer folder.

    Writes fold_<f>/checkpoint_final.pth plus dataset.json, plans.json and
    dataset_fingerprint.json beside the fold folders, as nnUNetv2_train does, so
    `nnUNetv2_predict -d ID -c CONFIG -f FOLD -tr TRAINER -p PLANS` works without p2pfed.
    run_validation: also run nnU-Net's final validation on the local validation cases
    (writes fold_<f>/validation/summary.json; read it with `validation_dice`).
    """
    trainer = _make_trainer(spec)
    trainer.initialize()
    _resume(trainer)  # keeps the local training history in the final checkpoint
    load_weights(trainer, split_momentum(weights)[0])
    # Set by nnU-Net while building the dataloaders; the predictor needs it.
    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    _write_model_folder_files(trainer)
    _set_epoch(trainer, spec.total_epochs)
    _save_checkpoint(trainer, Path(trainer.output_folder) / FINAL_CHECKPOINT)
    if run_validation:
        trainer.perform_actual_validation(save_probabilities=False)
    return Path(trainer.output_folder_base)


def validation_dice(model_folder: Path, fold: int | str = 0) -> dict[str, float] | None:
    """Mean Dice per label (and "foreground") from nnU-Net's final validation, if it ran."""
    summary = Path(model_folder) / f"fold_{fold}" / "validation" / "summary.json"
    if not summary.is_file():
        return None
    metrics = json.loads(summary.read_text())
    dice = {label: m["Dice"] for label, m in metrics["mean"].items()}
    dice["foreground"] = metrics["foreground_mean"]["Dice"]
    return dice


def load_weights(trainer: nnUNetTrainer, weights: Weights) -> None:
    """Replace the network's whole state dict by `weights` (keys may carry `_orig_mod.`).

    The key set must match exactly; afterwards every tensor must equal what was given,
    which also catches aliased keys (`decoder.encoder.*` is `encoder.*`) given different values.
    """
    import torch

    network = _bare_network(trainer)
    wanted = {_strip(k): np.asarray(v) for k, v in weights.items()}
    own = network.state_dict()
    missing, unexpected = sorted(own.keys() - wanted.keys()), sorted(wanted.keys() - own.keys())
    if missing or unexpected:
        raise SetupError(f"the model does not fit this site's network: missing keys {missing[:3]}, "
                         f"unexpected keys {unexpected[:3]} ({len(missing)}/{len(unexpected)} in all)",
                         "this site's nnU-Net plans differ from the federation's; plan again")
    network.load_state_dict({k: _as_tensor(v) for k, v in wanted.items()})
    loaded = network.state_dict()
    differ = [k for k, v in wanted.items() if not torch.equal(loaded[k].cpu(), _as_tensor(v).to(loaded[k].dtype))]
    if differ:
        raise SetupError(f"the model did not load as given (non-finite values, or aliased keys with "
                         f"different values?): {differ[:3]} ({len(differ)} keys)",
                         "the model is broken: check the round's merge")


# --- building and resuming the trainer -------------------------------------------------

def _make_trainer(spec: TrainSpec) -> nnUNetTrainer:
    spec.activate()
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    device = torch.device(spec.device)
    if device.type == "cuda":  # as nnUNetv2_train does
        torch.backends.cudnn.benchmark = True
    fold = spec.fold if spec.fold == "all" else int(spec.fold)
    trainer = get_trainer_from_args(str(spec.dataset), spec.configuration, fold, spec.trainer,
                                    spec.plans, continue_training=True, device=device)
    trainer.num_iterations_per_epoch = spec.iterations_per_epoch
    trainer.num_val_iterations_per_epoch = spec.val_iterations
    trainer.num_epochs = spec.total_epochs  # before initialize(): it sizes PolyLR
    if spec.initial_lr is not None:
        trainer.initial_lr = spec.initial_lr  # before initialize(): PolyLR starts from it
    # nnU-Net's in-epoch saves (checkpoint_latest every save_every epochs, checkpoint_best
    # on a better local EMA) are not atomic and a local "best" means nothing here; the
    # round saves its own checkpoint (_save_checkpoint).
    trainer.disable_checkpointing = True
    _use_one_log_file(trainer)
    return trainer


def _use_one_log_file(trainer: nnUNetTrainer) -> None:
    """nnU-Net opens a log file named by the second it starts: one per tick. Keep one per site."""
    per_process = Path(trainer.log_file)
    trainer.log_file = str(per_process.with_name("training_log_p2pfed.txt"))
    with open(trainer.log_file, "a") as log:
        log.write(per_process.read_text())
    per_process.unlink()


def _resume(trainer: nnUNetTrainer) -> None:
    """Restore optimizer, grad scaler, logger and epoch from the site's own checkpoint."""
    checkpoint = Path(trainer.output_folder) / CHECKPOINT
    if checkpoint.is_file():
        trainer.load_checkpoint(str(checkpoint))  # our own file: unpickling is fine


def load_momentum(trainer: nnUNetTrainer, momentum: Weights) -> None:
    """Make `momentum` (parameter name -> array, every parameter) the SGD momentum buffers.

    A model without any (a site's own network, in asym) keeps the fresh optimizer's none."""
    import torch

    if not momentum:
        return
    params = dict(_bare_network(trainer).named_parameters())
    if momentum.keys() != params.keys() or any(momentum[k].shape != tuple(p.shape) for k, p in params.items()):
        raise SetupError("the merged momentum does not fit this site's network",
                         "this site's nnU-Net plans differ from the federation's; plan again")
    for name, p in params.items():
        trainer.optimizer.state[p]["momentum_buffer"] = torch.as_tensor(np.asarray(momentum[name]),
                                                                        dtype=p.dtype).to(p.device).clone()


def _momentum_of(trainer: nnUNetTrainer) -> Weights:
    """The SGD momentum buffer of every parameter (zero where no step made one yet)."""
    out = {}
    for name, p in _bare_network(trainer).named_parameters():
        buf = trainer.optimizer.state.get(p, {}).get("momentum_buffer")
        out[MOMENTUM + name] = (np.zeros(tuple(p.shape), np.float32) if buf is None
                                else buf.detach().to("cpu", dtype=p.dtype).float().numpy().copy())
    return out


def reset_optimizer(trainer: nnUNetTrainer) -> None:
    """A fresh optimizer and LR scheduler, as nnU-Net configures them (SGD with Nesterov
    momentum 0.99: no momentum yet); the schedule follows the epoch set next."""
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()


def _set_epoch(trainer: nnUNetTrainer, epoch: int) -> None:
    """Make `epoch` the next epoch to train, with the logger indexed to match.

    nnU-Net's logger keeps one entry per epoch, list index = epoch, and its EMA reads
    entry epoch - 1: drop entries from `epoch` on (a retried round) and fill skipped
    epochs with NaN (a site catching up), or the logger asserts or raises IndexError.
    """
    trainer.current_epoch = epoch
    for values in trainer.logger.local_logger.my_fantastic_logging.values():
        del values[epoch:]
        values.extend([math.nan] * (epoch - len(values)))


def _bare_network(trainer: nnUNetTrainer):
    from torch._dynamo import OptimizedModule

    network = trainer.network
    return network._orig_mod if isinstance(network, OptimizedModule) else network


# --- one epoch, saving, stopping ---------------------------------------------------------

def _run_epoch(trainer: nnUNetTrainer, progress: Progress | None) -> None:
    """One epoch exactly as nnUNetTrainer.run_training does it, plus a progress callback."""
    import torch

    epoch = trainer.current_epoch
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    outputs = []
    for i in range(trainer.num_iterations_per_epoch):
        outputs.append(trainer.train_step(next(trainer.dataloader_train)))
        if progress is not None:
            progress(epoch, i + 1, trainer.num_iterations_per_epoch)
    trainer.on_train_epoch_end(outputs)
    with torch.no_grad():
        trainer.on_validation_epoch_start()
        outputs = [trainer.validation_step(next(trainer.dataloader_val))
                   for _ in range(trainer.num_val_iterations_per_epoch)]
        trainer.on_validation_epoch_end(outputs)
    _restart_ema_after_gap(trainer)
    trainer.on_epoch_end()  # increments current_epoch


def _restart_ema_after_gap(trainer: nnUNetTrainer) -> None:
    """After NaN-filled skipped epochs the EMA would stay NaN: restart it from this epoch."""
    log = trainer.logger.local_logger.my_fantastic_logging
    if math.isnan(log["ema_fg_dice"][-1]):
        log["ema_fg_dice"][-1] = log["mean_fg_dice"][-1]


def _save_checkpoint(trainer: nnUNetTrainer, path: Path) -> None:
    """nnU-Net's own checkpoint, written to a temp file, fsynced, then renamed over `path`.

    save_checkpoint records current_epoch + 1 because nnU-Net calls it inside
    on_epoch_end, before the increment; we call it after, like on_train_end does.
    """
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed tick
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    trainer.current_epoch -= 1
    trainer.disable_checkpointing = False
    try:
        trainer.save_checkpoint(str(tmp))
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        trainer.current_epoch += 1
        trainer.disable_checkpointing = True
        tmp.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stop_workers(trainer: nnUNetTrainer) -> None:
    """Stop the augmentation worker processes, or they outlive the tick (see on_train_end)."""
    for loader in (trainer.dataloader_train, trainer.dataloader_val):
        if hasattr(loader, "_finish"):  # the multi-process augmenters
            loader._finish()
    trainer.dataloader_train = trainer.dataloader_val = None


def _write_model_folder_files(trainer: nnUNetTrainer) -> None:
    """plans.json, dataset.json and dataset_fingerprint.json, as on_train_start writes them."""
    from batchgenerators.utilities.file_and_folder_operations import save_json

    base = Path(trainer.output_folder_base)
    save_json(trainer.plans_manager.plans, str(base / "plans.json"), sort_keys=False)
    save_json(trainer.dataset_json, str(base / "dataset.json"), sort_keys=False)
    shutil.copyfile(Path(trainer.preprocessed_dataset_folder_base) / "dataset_fingerprint.json",
                    base / "dataset_fingerprint.json")


# --- results -------------------------------------------------------------------------------

def _result(trainer: nnUNetTrainer, with_momentum: bool = False) -> RoundResult:
    def last(key: str):
        return trainer.logger.get_value(key, step=-1)

    weights = _to_numpy(_bare_network(trainer).state_dict())
    if with_momentum:
        weights.update(_momentum_of(trainer))
    return RoundResult(
        weights=weights,
        num_train_cases=len(trainer.do_split()[0]),
        epoch=trainer.current_epoch - 1,
        train_loss=float(last("train_losses")),
        val_loss=float(last("val_losses")),
        pseudo_dice=float(last("mean_fg_dice")),
        pseudo_dice_per_class=tuple(float(d) for d in last("dice_per_class_or_region")),
        ema_pseudo_dice=float(last("ema_fg_dice")),
        learning_rate=float(last("lrs")),
    )


def _to_numpy(state_dict) -> Weights:
    """Floating tensors as float32 numpy (other dtypes kept), `_orig_mod.` stripped.

    nnU-Net's state dicts alias tensors (`decoder.encoder.*` is `encoder.*`): aliased
    keys get the same numpy array, so callers can store each storage once.
    """
    import torch

    arrays: dict[tuple, np.ndarray] = {}

    def convert(t):
        ident = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if ident not in arrays:
            t = t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype)
            arrays[ident] = t.numpy().copy()  # a copy: never share memory with the live network
        return arrays[ident]

    return {_strip(k): convert(v) for k, v in state_dict.items()}


def _as_tensor(array: np.ndarray):
    import torch

    return torch.from_numpy(np.require(array, requirements=("C", "W")))  # copies read-only input


def _strip(key: str) -> str:
    return key[len(_COMPILED_PREFIX):] if key.startswith(_COMPILED_PREFIX) else key
