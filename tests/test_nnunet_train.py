"""p2pfed.nnunet.train against real nnU-Net: a tiny 2-D dataset, CPU, each step in a
fresh process as a cron tick would run it (nnU-Net reads its folders at import).

The chain: plan+preprocess (CLI) -> initial_weights -> round at epoch 0 -> round at
epoch 1 from a changed "merged" model -> catch-up round that skips epoch 2 ->
export_final with validation -> the real nnUNetv2_predict on the exported folder.
The first tests check the adapter's own mechanics (atomic save, epoch and logger
bookkeeping, weight conversion and loading) without nnU-Net, in milliseconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

psutil = pytest.importorskip("psutil")
sitk = pytest.importorskip("SimpleITK")
torch = pytest.importorskip("torch")

from p2pfed.errors import SetupError  # noqa: E402
from p2pfed.nnunet.train import _save_checkpoint, _set_epoch, _to_numpy, load_weights  # noqa: E402
from p2pfed.synthetic import make_site  # noqa: E402

slow = pytest.mark.slow  # real nnU-Net: plan, train, validate, predict

DATASET_ID, DATASET = 901, "Dataset901_Tiny"
TOTAL_EPOCHS, INITIAL_LR = 4, 1e-2
BIN = Path(sys.executable).parent


def poly_lr(epoch: int) -> float:
    """nnU-Net's PolyLRScheduler."""
    return INITIAL_LR * (1 - epoch / TOTAL_EPOCHS) ** 0.9


# --- the adapter's own mechanics, without nnU-Net (fast) ---------------------------------

class FakeTrainer:
    """Just what _save_checkpoint touches; save_checkpoint records what nnU-Net's does."""

    def __init__(self, next_epoch: int, fail: bool = False):
        self.current_epoch, self.disable_checkpointing, self.fail = next_epoch, True, fail
        self.recorded = []

    def save_checkpoint(self, filename: str) -> None:
        assert not self.disable_checkpointing
        self.recorded.append(self.current_epoch + 1)
        Path(filename).write_bytes(b"half")
        if self.fail:
            raise OSError("disk full")
        Path(filename).write_bytes(b"new checkpoint")


def test_checkpoint_records_the_next_epoch_and_replaces_atomically(tmp_path):
    path = tmp_path / "checkpoint_latest.pth"
    path.write_bytes(b"old checkpoint")
    (tmp_path / ".checkpoint_latest.pth.99999.tmp").write_bytes(b"from a killed tick")
    trainer = FakeTrainer(next_epoch=5)  # after on_epoch_end of epoch 4
    _save_checkpoint(trainer, path)
    assert trainer.recorded == [5] and trainer.current_epoch == 5 and trainer.disable_checkpointing
    assert path.read_bytes() == b"new checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_failed_save_keeps_the_old_checkpoint(tmp_path):
    path = tmp_path / "checkpoint_latest.pth"
    path.write_bytes(b"old checkpoint")
    trainer = FakeTrainer(next_epoch=5, fail=True)
    with pytest.raises(OSError):
        _save_checkpoint(trainer, path)
    assert path.read_bytes() == b"old checkpoint" and [p.name for p in tmp_path.iterdir()] == [path.name]
    assert trainer.current_epoch == 5 and trainer.disable_checkpointing


def test_set_epoch_indexes_the_logger_by_epoch():
    log = {"train_losses": [0.9, 0.8, 0.7], "ema_fg_dice": [0.1, 0.2, 0.3]}
    trainer = SimpleNamespace(current_epoch=3, logger=SimpleNamespace(local_logger=SimpleNamespace(
        my_fantastic_logging=log)))
    _set_epoch(trainer, 2)  # a retried round: drop what epoch 2 logged
    assert trainer.current_epoch == 2 and log["train_losses"] == [0.9, 0.8]
    _set_epoch(trainer, 4)  # a site catching up: epochs 2 and 3 were skipped
    assert log["ema_fg_dice"][:2] == [0.1, 0.2] and np.isnan(log["ema_fg_dice"][2:]).all()
    assert len(log["train_losses"]) == 4


def aliased_network() -> torch.nn.Module:
    """Like nnU-Net's: decoder.encoder is the encoder, so its tensors appear under two keys."""
    net = torch.nn.Module()
    net.encoder = torch.nn.Linear(3, 2)
    net.decoder = torch.nn.Module()
    net.decoder.encoder = net.encoder
    net.decoder.head = torch.nn.Linear(2, 1)
    return net


def test_to_numpy_strips_compile_prefix_and_keeps_aliases():
    net = aliased_network()
    weights = _to_numpy({f"_orig_mod.{k}": v for k, v in net.state_dict().items()})
    assert sorted(weights) == sorted(net.state_dict())
    assert weights["encoder.weight"] is weights["decoder.encoder.weight"]
    assert all(v.dtype == np.float32 for v in weights.values())
    before = weights["encoder.weight"].copy()
    with torch.no_grad():
        net.encoder.weight.add_(1)
    assert np.array_equal(weights["encoder.weight"], before), "weights share memory with the network"


def test_load_weights_replaces_exactly_the_whole_state_dict():
    trainer = SimpleNamespace(network=aliased_network())
    given = {k: np.full(v.shape, i, np.float32) for i, (k, v) in enumerate(aliased_network().state_dict().items())}
    given["decoder.encoder.weight"] = given["encoder.weight"]
    given["decoder.encoder.bias"] = given["encoder.bias"]
    load_weights(trainer, {f"_orig_mod.{k}": v for k, v in given.items()})
    assert all(np.array_equal(v.numpy(), given[k]) for k, v in trainer.network.state_dict().items())
    with pytest.raises(SetupError, match="missing keys"):
        load_weights(trainer, {k: v for k, v in given.items() if k != "decoder.head.bias"})
    with pytest.raises(SetupError, match="did not load as given"):
        load_weights(trainer, {**given, "decoder.encoder.bias": given["encoder.bias"] + 1})


# --- the site: tiny 2-D dataset (p2pfed.synthetic), planned once for the module ----------

class Site:
    def __init__(self, root: Path):
        self.root = root
        self.raw, self.pre, self.res = root / "raw", root / "preprocessed", root / "results"
        self.env = {**os.environ, "nnUNet_raw": str(self.raw), "nnUNet_preprocessed": str(self.pre),
                    "nnUNet_results": str(self.res), "nnUNet_compile": "false",
                    # two augmentation workers keep the orphan check meaningful on small machines
                    "nnUNet_n_proc_DA": "2", "nnUNet_def_n_proc": "1",
                    "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
        self.spec = dict(dataset=str(DATASET_ID), configuration="2d", fold=0, raw=str(self.raw),
                         preprocessed=str(self.pre), results=str(self.res), device="cpu",
                         iterations_per_epoch=2, val_iterations=1, total_epochs=TOTAL_EPOCHS)
        self.fold = self.res / DATASET / "nnUNetTrainer__nnUNetPlans__2d" / "fold_0"

    def run(self, *cmd: str, timeout: int = 180) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done

    def step(self, body: str, **args) -> dict:
        """Run PRELUDE + body in a fresh interpreter; it reports a dict through `report`."""
        script = PRELUDE + textwrap.dedent(body)
        out = self.run(sys.executable, "-c", script, json.dumps({"spec": self.spec, **args}))
        return json.loads(out.stdout.strip().splitlines()[-1])

    def checkpoint(self, name: str = "checkpoint_latest.pth") -> dict:
        return torch.load(self.fold / name, map_location="cpu", weights_only=False)


PRELUDE = """
import json, sys
import numpy as np
from p2pfed.nnunet.train import TrainSpec
args = json.loads(sys.argv[1])
spec = TrainSpec(**args["spec"])
def report(**values):
    print(json.dumps(values))
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Site:
    s = Site(tmp_path_factory.mktemp("site"))
    make_site(s.raw, DATASET_ID, 0, n_train=8, n_test=2, dim=2, channels=("MRI",), name="Tiny")
    s.run(str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "2d", "-np", "1")
    return s


def save(path: Path, weights: dict) -> str:
    np.savez(path, **weights)
    return str(path)


def load(path: Path) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


# --- rounds -----------------------------------------------------------------------------------

ROUND = """
import copy, os, psutil, torch
from p2pfed.nnunet.train import train_round
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

base = dict(np.load(args["base"])) if args["base"] else None
me = psutil.Process()
seen = {"workers": None, "optimizer_loaded": [], "first_step_weights": None, "first_step_momentum": None,
        "progress": []}

# Spies: what optimizer state was loaded, and the network weights at the first train_step.
load_optimizer = torch.optim.Optimizer.load_state_dict
def spy_load(self, state):
    seen["optimizer_loaded"].append(copy.deepcopy(state))  # SGD updates its buffers in place
    return load_optimizer(self, state)
torch.optim.Optimizer.load_state_dict = spy_load
train_step = nnUNetTrainer.train_step
def spy_step(self, batch):
    if seen["first_step_weights"] is None:
        seen["first_step_weights"] = {k: v.detach().clone() for k, v in self.network.state_dict().items()}
        seen["first_step_momentum"] = sum("momentum_buffer" in st for st in self.optimizer.state.values())
        seen["first_step_buffers"] = {name: self.optimizer.state[p]["momentum_buffer"].clone()
                                      for name, p in self.network.named_parameters() if p in self.optimizer.state}
    return train_step(self, batch)
nnUNetTrainer.train_step = spy_step

def progress(epoch, iteration, total):
    seen["progress"].append([epoch, iteration, total])
    if seen["workers"] is None:
        seen["workers"] = [p.pid for p in me.children(recursive=True)]

before = torch.load(args["checkpoint"], weights_only=False) if os.path.isfile(args["checkpoint"]) else None
if args.get("bad_base"):
    try:
        train_round(spec, {k: v for k, v in list(base.items())[1:]}, epochs=1)
        report(error=None); sys.exit()
    except Exception as e:
        rejected = type(e).__name__
    seen["optimizer_loaded"].clear()
aborted = None
if args.get("abort_first"):
    # A round that fails mid-epoch; the caller keeps the exception (and its traceback,
    # which references the trainer) while it reports, as a tick would.
    def interrupt(*_):
        raise RuntimeError("tick interrupted")
    try:
        train_round(spec, base, epochs=1, progress=interrupt, start_epoch=args["start_epoch"])
    except RuntimeError as e:
        kept = e
    aborted = {"children": [p.pid for p in me.children(recursive=True)],
               "checkpoint_written": os.path.isfile(args["checkpoint"])}
    seen["first_step_weights"] = None
r = train_round(spec, base, epochs=1, progress=progress, start_epoch=args["start_epoch"])

def same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], torch.as_tensor(np.asarray(b[k]))) for k in a)
from p2pfed.nnunet.train import MOMENTUM, split_momentum
base_net, base_momentum = split_momentum(base) if base is not None else (None, {})
np.savez(args["out"], **r.weights)
report(
    epoch=r.epoch, num_train_cases=r.num_train_cases, train_loss=r.train_loss, val_loss=r.val_loss,
    pseudo_dice=r.pseudo_dice, per_class=list(r.pseudo_dice_per_class), ema=r.ema_pseudo_dice,
    lr=r.learning_rate, keys=sorted(r.weights), progress=seen["progress"],
    workers=seen["workers"], children_after=[p.pid for p in me.children(recursive=True)],
    optimizer_restored=bool(before) and len(seen["optimizer_loaded"]) == 1 and all(
        torch.equal(seen["optimizer_loaded"][0]["state"][i]["momentum_buffer"], s["momentum_buffer"])
        for i, s in before["optimizer_state"]["state"].items()),
    first_step_is_base=base is not None and same(
        seen["first_step_weights"], {k.removeprefix("_orig_mod."): v for k, v in base_net.items()}),
    first_step_momentum_is_base=bool(base_momentum) and same(seen.get("first_step_buffers", {}), base_momentum),
    momentum_keys=sum(k.startswith(MOMENTUM) for k in r.weights),
    first_step_is_checkpoint=bool(before) and same(seen["first_step_weights"], before["network_weights"]),
    rejected=locals().get("rejected"), aborted=aborted, first_step_momentum=seen["first_step_momentum"],
)
"""


def train(site: Site, name: str, base: str | None, start_epoch: int | None, **extra) -> dict:
    out = site.root / f"{name}.npz"
    result = site.step(ROUND, base=base, start_epoch=start_epoch, out=str(out),
                       checkpoint=str(site.fold / "checkpoint_latest.pth"), **extra)
    result["weights"] = out
    return result


def assert_no_orphans(result: dict) -> None:
    """The augmentation workers existed during the round and are gone after it."""
    assert result["workers"], "expected background augmentation workers during training"
    assert result["children_after"] == [], "train_round left child processes running"
    alive = [p for p in result["workers"] if psutil.pid_exists(p)
             and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"worker processes outlived the tick: {alive}"


@pytest.fixture(scope="module")
def initial(site) -> Path:
    out = site.root / "initial.npz"
    r = site.step("""
        from p2pfed.nnunet.train import initial_weights
        w = initial_weights(spec)
        again = initial_weights(spec)
        np.savez(args["out"], **w)
        report(n=len(w), dtypes=sorted({str(v.dtype) for v in w.values()}),
               seeded=all(np.array_equal(w[k], again[k]) for k in w))
    """, out=str(out))
    assert r["n"] > 0 and r["dtypes"] == ["float32"]
    assert r["seeded"], "initial_weights with the same seed differ"
    return out


@pytest.fixture(scope="module")
def round1(site, initial) -> dict:
    return train(site, "round1", str(initial), start_epoch=None, abort_first=True)


@pytest.fixture(scope="module")
def round2(site, round1) -> dict:
    # The merged model differs from what this site trained: it must replace the local weights.
    merged = {k: v + 0.01 for k, v in load(round1["weights"]).items()}
    return train(site, "round2", save(site.root / "merged1.npz", merged), start_epoch=None)


@pytest.fixture(scope="module")
def catch_up(site, round2) -> dict:
    # The site missed round 3 (epoch 2); the merged model comes from torch.compile keys.
    merged = {f"_orig_mod.{k}": v for k, v in load(round2["weights"]).items()}
    return train(site, "catch_up", save(site.root / "merged3.npz", merged), start_epoch=3, bad_base=True)


@slow
def test_initial_weights_fit_the_network(site, initial, round1):
    assert sorted(load(initial)) == round1["keys"]


@slow
def test_first_round_trains_from_the_given_weights(site, round1):
    assert round1["epoch"] == 0 and round1["num_train_cases"] == 6  # 8 cases, 5-fold split
    assert round1["first_step_is_base"] and not round1["optimizer_restored"]
    assert round1["lr"] == pytest.approx(poly_lr(0))
    assert np.isfinite([round1["train_loss"], round1["val_loss"]]).all()
    assert len(round1["per_class"]) == 2 and 0 <= round1["pseudo_dice"] <= 1  # organ, lesion
    assert round1["progress"] == [[0, 1, 2], [0, 2, 2]]
    assert_no_orphans(round1)


@slow
def test_failed_round_stops_workers_and_writes_no_checkpoint(round1):
    assert round1["aborted"] == {"children": [], "checkpoint_written": False}


@slow
def test_checkpoint_is_exact_for_resume(site, round1, round2):
    # round2 already overwrote the checkpoint; it holds the state after epoch 1.
    ckpt = site.checkpoint()
    assert ckpt["current_epoch"] == 2  # the next epoch to train
    assert ckpt["logging"]["train_losses"] == pytest.approx([round1["train_loss"], round2["train_loss"]])
    assert not list(site.fold.glob(".*tmp")), "temp checkpoint left behind"
    assert not (site.fold / "checkpoint_best.pth").exists()


@slow
def test_second_round_resumes_optimizer_and_replaces_weights(round2):
    assert round2["epoch"] == 1
    assert round2["optimizer_restored"], "SGD momentum was not restored from the checkpoint"
    assert round2["first_step_momentum"] > 0  # --optimizer-state local: the first step uses it
    assert round2["first_step_is_base"] and not round2["first_step_is_checkpoint"]
    assert round2["lr"] == pytest.approx(poly_lr(1))
    assert_no_orphans(round2)


@slow
def test_catch_up_round_jumps_the_epoch_counter(site, catch_up):
    assert catch_up["rejected"] == "SetupError"  # a model with a missing key
    assert catch_up["epoch"] == 3 and catch_up["lr"] == pytest.approx(poly_lr(3))
    assert catch_up["first_step_is_base"] and catch_up["optimizer_restored"]
    assert not any(k.startswith("_orig_mod.") for k in catch_up["keys"])
    log = site.checkpoint()["logging"]
    assert site.checkpoint()["current_epoch"] == 4
    assert all(len(v) == 4 for v in log.values())
    assert np.isnan(log["train_losses"][2]) and np.isfinite(log["ema_fg_dice"][3])


@slow
def test_export_is_a_standard_nnunet_model(site, catch_up):
    weights = site.root / "final.npz"
    weights.write_bytes(catch_up["weights"].read_bytes())
    r = site.step("""
        from p2pfed.nnunet.train import export_final, validation_dice
        folder = export_final(spec, dict(np.load(args["weights"])), run_validation=True)
        report(folder=str(folder), dice=validation_dice(folder, 0))
    """, weights=str(weights))
    folder = Path(r["folder"])
    assert folder == site.fold.parent
    for name in ("dataset.json", "plans.json", "dataset_fingerprint.json"):
        assert (folder / name).is_file()
    final = site.checkpoint("checkpoint_final.pth")
    assert final["trainer_name"] == "nnUNetTrainer" and final["current_epoch"] == TOTAL_EPOCHS
    assert final["init_args"]["configuration"] == "2d" and final["inference_allowed_mirroring_axes"] == (0, 1)
    given = load(weights)
    assert all(torch.equal(v, torch.from_numpy(given[k])) for k, v in final["network_weights"].items())
    assert set(r["dice"]) == {"1", "2", "foreground"} and 0 <= r["dice"]["foreground"] <= 1

    # nnU-Net alone, no p2pfed code: predict the two test images.
    out = site.root / "predictions"
    site.run(str(BIN / "nnUNetv2_predict"), "-i", str(site.raw / DATASET / "imagesTs"), "-o", str(out),
             "-d", str(DATASET_ID), "-c", "2d", "-f", "0", "-tr", "nnUNetTrainer", "-p", "nnUNetPlans",
             "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar")
    predictions = sorted(out.glob("*.nii.gz"))
    assert [p.name for p in predictions] == ["tiny_000.nii.gz", "tiny_001.nii.gz"]
    for p in predictions:
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
        assert seg.shape == (1, 48, 48) and set(np.unique(seg)) <= {0, 1, 2}


@slow
def test_optimizer_state_reset_starts_the_round_without_momentum(site, catch_up):
    """--optimizer-state reset: the round loads the merged weights and nnU-Net's fresh
    optimizer (no momentum buffers at the first step), on the schedule of its epoch."""
    spec = {**site.spec, "optimizer_state": "reset"}
    r = train(site, "reset", save(site.root / "merged4.npz", load(catch_up["weights"])), start_epoch=3, spec=spec)
    assert r["first_step_momentum"] == 0 and r["first_step_is_base"]
    assert r["epoch"] == 3 and r["lr"] == pytest.approx(poly_lr(3))


@slow
def test_learning_rate_setting_starts_polylr_there(site, catch_up):
    """--learning-rate: the round's PolyLR runs from the federation's initial rate, not the
    trainer's 0.01, also when the optimizer state resumes from a checkpoint trained at 0.01."""
    spec = {**site.spec, "initial_lr": 3 * INITIAL_LR}
    r = train(site, "lr", save(site.root / "merged4lr.npz", load(catch_up["weights"])), start_epoch=3, spec=spec)
    assert r["optimizer_restored"] and r["first_step_is_base"]
    assert r["epoch"] == 3 and r["lr"] == pytest.approx(3 * poly_lr(3))


@slow
def test_optimizer_state_merged_starts_from_the_merged_momentum(site, catch_up):
    """--optimizer-state merged: the initial model carries a zero momentum tensor per network
    parameter; a round starts from the merged weights *and* the merged SGD momentum (not
    its checkpoint's, not none), and returns its momentum after training with the weights."""
    spec = {**site.spec, "optimizer_state": "merged"}
    out = site.root / "initial-merged.npz"
    init = site.step("""
        import torch
        from p2pfed.nnunet.train import MOMENTUM, initial_weights, _make_trainer, _bare_network
        w = initial_weights(spec)
        trainer = _make_trainer(spec)
        trainer.initialize()
        params = dict(_bare_network(trainer).named_parameters())
        np.savez(args["out"], **w)
        report(names=sorted(k[len(MOMENTUM):] for k in w if k.startswith(MOMENTUM)), params=sorted(params),
               zero=all(not w[k].any() for k in w if k.startswith(MOMENTUM)),
               shapes=all(w[MOMENTUM + n].shape == tuple(p.shape) for n, p in params.items()))
    """, spec=spec, out=str(out))
    assert init["names"] == init["params"] and init["zero"] and init["shapes"]

    rng = np.random.default_rng(0)
    momentum = {k: (rng.normal(0, 0.01, v.shape)).astype(np.float32) for k, v in load(out).items()
                if k.startswith("optimizer.momentum_buffer.")}
    base = {**load(catch_up["weights"]), **momentum}
    r = train(site, "merged", save(site.root / "merged5.npz", base), start_epoch=3, spec=spec)
    assert r["first_step_is_base"] and r["first_step_momentum_is_base"]
    assert r["first_step_momentum"] == len(momentum) and r["momentum_keys"] == len(momentum)
    trained = load(r["weights"])
    assert all(np.isfinite(trained[k]).all() and trained[k].any() for k in momentum)
    # what comes back is what training left (a parameter without a gradient keeps its buffer)
    unchanged = [k for k, v in momentum.items() if np.array_equal(trained[k], v)]
    assert len(unchanged) <= len(momentum) // 10, unchanged
    assert r["epoch"] == 3 and r["lr"] == pytest.approx(poly_lr(3))
