"""Whole federations with real nnU-Net on tiny synthetic 2-D sites, each site ticking in
its own process as cron runs it.

- FFE on a local folder, with SIGKILL injected at every crash point of a tick, quorum 2
  of 3 with a zero deadline, and one site that stops after planning and comes back at
  the end: it must catch up, all final models must be identical, verify must pass,
  and nnUNetv2_predict must run on a final results folder.
- Asym on each real S3 server (moto's, SeaweedFS), with ticks interleaved in a rotating order.
"""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from p2pfed import simulate

from conftest import new_bucket
from test_membership import fed_fp

pytestmark = pytest.mark.slow
CRASH_POINTS = ["train", "upload", "commit", "seal", "merge", "final"]
# the plain protocol: secure rounds (the default from 3 sites) run real nnU-Net in test_walkthrough.py
TINY = ["--configuration", "2d", "--rounds", "2", "--iterations-per-epoch", "2", "--val-iterations", "1",
        "--no-secure-aggregation"]


def tick_raw(sim: simulate.Simulation, site: str, crash: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "P2PFED_CRASH_AT": crash} if crash else None
    return subprocess.run([sys.executable, "-m", "p2pfed.cli.app", "round", "--site", site, "--json",
                           "--home", str(sim.home)], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def ffe_run(tmp_path_factory):
    """The FFE federation, run to the end under crashes; returns (sim, fired crash points)."""
    sim = simulate.setup(tmp_path_factory.mktemp("ffe"), 3,
                         init_args=TINY + ["--quorum", "2", "--deadline", "0s", "--final-validation"])
    a, b, c = (s.name for s in sim.sites)
    # C takes part until its plan is published, then goes away.
    while not (sim.workdir / "shared" / "plans" / f"{c}.json").exists():
        for site in (a, b, c):
            sim.tick(site)
    pending, fired, finished = list(CRASH_POINTS), [], set()
    for _ in range(60):
        for site in (a, b):
            if site in finished:
                continue
            crash = pending[0] if pending else None
            proc = tick_raw(sim, site, crash)
            if proc.returncode == -9:
                fired.append(pending.pop(0))
                continue
            assert proc.returncode == 0, proc.stderr
            if json.loads(proc.stdout)["finished"]:
                finished.add(site)
        if finished == {a, b}:
            break
    # C comes back: it catches up from the sealed rounds it missed.
    for _ in range(5):
        if sim.tick(c)["finished"]:
            break
    return sim, fired


def test_crashes_at_every_point_are_recovered(ffe_run):
    sim, fired = ffe_run
    assert fired == CRASH_POINTS
    assert sim.cli("verify", "--site", sim.sites[1].name).returncode == 0


def test_quorum_seals_without_the_absent_site_and_it_catches_up(ffe_run):
    sim, _ = ffe_run
    doc = sim.status()
    c = sim.sites[2].name
    rounds = {e["round"]: e for e in doc["rounds"]}
    assert sorted(rounds) == [0, 1, 2] and all(e["sealed"] for e in rounds.values())
    for r in (1, 2):
        assert rounds[r]["seal"]["reason"] == "deadline"
        assert sorted(rounds[r]["seal"]["contributions"]) == ["SiteA", "SiteB"]
        assert rounds[r]["sites"][c]["missed"] and rounds[r]["merge_agreed"] is True
        assert rounds[r]["excluded"] == {}  # nnU-Net trained on exactly the declared number of cases
    assert doc["phase"]["name"] == "done"


def test_every_final_model_is_the_same_ffe_merge(ffe_run):
    sim, _ = ffe_run
    doc = sim.status()
    models = {s: f["model"] for s, f in doc["final"].items()}
    assert sorted(models) == ["SiteA", "SiteB", "SiteC"] and len(set(models.values())) == 1
    merged_r2 = {e["sites"][s]["merged_model"] for e in doc["rounds"] if e["round"] == 2 for s in ("SiteA", "SiteB")}
    assert merged_r2 == set(models.values())
    for s in ("SiteA", "SiteB"):  # local validation ran and gave finite Dice
        assert np.isfinite(doc["final"][s]["validation_dice"]["foreground"])


def test_seals_list_only_complete_contributions(ffe_run):
    sim, _ = ffe_run
    shared = sim.workdir / "shared"
    for seal in shared.glob("rounds/*/SEAL.json"):
        body = json.loads(seal.read_text())["body"]
        for site in body["contributions"]:
            commit = json.loads((seal.parent / site / "COMMIT.json").read_text())["body"]
            for ref in commit["shards"] + [commit["meta"]]:
                assert (shared / ref["key"]).is_file()


def test_nnunet_predict_runs_on_the_final_results_folder(ffe_run, tmp_path):
    import SimpleITK as sitk

    sim, _ = ffe_run
    site = sim.sites[0]
    f = site.folders
    env = {**os.environ, "nnUNet_raw": str(f["raw"]), "nnUNet_preprocessed": str(f["preprocessed"]),
           "nnUNet_results": str(f["results"])}
    images = next(f["raw"].glob("Dataset*")) / "imagesTs"
    predict = str(Path(sys.executable).parent / "nnUNetv2_predict")  # the venv's, activated or not
    subprocess.run([predict, "-i", str(images), "-o", str(tmp_path), "-d", str(site.dataset_id),
                    "-c", "2d", "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"],
                   check=True, capture_output=True, env=env, cwd=tmp_path)
    for image in sorted(images.glob("*_0000.nii.gz")):
        seg = tmp_path / image.name.replace("_0000.nii.gz", ".nii.gz")
        assert seg.is_file()
        assert sitk.GetArrayFromImage(sitk.ReadImage(str(seg))).shape == \
            sitk.GetArrayFromImage(sitk.ReadImage(str(image))).shape


def test_a_concurrent_tick_exits_zero_and_changes_nothing(ffe_run):
    sim, _ = ffe_run
    site = sim.sites[0].name
    before = sorted(p for p in (sim.workdir / "shared").rglob("*"))
    state = (sim.home / "sites" / site / "state.json").read_bytes()
    with open(sim.home / "sites" / site / "tick.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = tick_raw(sim, site)
    assert proc.returncode == 0 and "another tick of site 'SiteA' is running" in proc.stdout
    assert sorted(p for p in (sim.workdir / "shared").rglob("*")) == before
    assert (sim.home / "sites" / site / "state.json").read_bytes() == state


def test_status_plot_and_idle_tick(ffe_run, tmp_path):
    sim, _ = ffe_run
    plot = tmp_path / "curves.png"
    sim.cli("status", "--site", "SiteB", "--plot", str(plot))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = sim.tick("SiteB")
    assert report["finished"] and report["actions"] == []


def test_asym_on_s3_with_interleaved_ticks(on_seaweedfs, tmp_path):
    """Real nnU-Net on the real SeaweedFS server (the README walkthrough, tests/test_walkthrough.py,
    runs real nnU-Net on moto's: one full run on each S3 server keeps the suite in its budget).
    SiteB images in MRI, the others in CT: asym federates them, each normalizing its own way."""
    storage = new_bucket(on_seaweedfs)
    sim = simulate.setup(tmp_path, 3, storage=storage, init_args=TINY + ["--mode", "asym", "--no-final-validation"],
                         channels=[("CT",), ("MRI",), ("CT",)])
    for site in ("SiteB", "SiteC"):  # they declare their cases and wait: nobody trains before all have
        assert "waiting for the case-count declarations of SiteA" in sim.cli("round", "--site", site).stdout
    # SiteA's first tick plans and trains round 1 (asym needs nobody else for that), as cron runs it
    quiet = sim.cli("round", "--site", "SiteA", "--quiet")
    assert quiet.stdout.count("\n") == 1 and quiet.stderr == "", quiet
    # the one line says what the tick did, then what it waits for
    assert quiet.stdout.startswith("SiteA: ") and "committed round 1; round 1/2: waiting for" in quiet.stdout, quiet
    log = (sim.home / "sites" / "SiteA" / "tick.log").read_text()
    assert "Epoch 0" in log and "train_loss" in log and "SiteA: committed round 1" in log  # nnU-Net's and ours
    rotate = lambda sweep: sim.sites[sweep % 3:] + sim.sites[:sweep % 3]  # noqa: E731
    doc = simulate.run_until_done(sim, say=lambda line: None, order=rotate)
    assert doc["phase"]["name"] == "done" and sorted(doc["final"]) == ["SiteA", "SiteB", "SiteC"]
    assert [e["round"] for e in doc["rounds"]] == [1, 2]  # asym: no shared initial model
    for e in doc["rounds"]:
        assert e["merge_agreed"] is True and len(e["seal"]["contributions"]) == 3
    assert len(set(doc["plans"].values())) == 3  # heterogeneous sites plan different networks
    norms = {s.name: json.loads(next(s.folders["preprocessed"].glob("Dataset*/nnUNetPlans.json")).read_text())
             ["configurations"]["2d"]["normalization_schemes"] for s in sim.sites}
    assert norms == {"SiteA": ["CTNormalization"], "SiteB": ["ZScoreNormalization"], "SiteC": ["CTNormalization"]}
    assert not any(k.startswith("fingerprints/Site") for k in _keys(storage))  # asym shares no statistics
    assert sim.cli("verify", "--site", "SiteC").returncode == 0


def _keys(url: str) -> list[str]:
    from p2pfed.storage import open_storage

    return open_storage(url).list_prefix("")


def test_a_site_admitted_into_a_running_federation_trains_from_the_current_model(tmp_path):
    """FFE, real nnU-Net: SiteA and SiteB start a 3-round federation; SiteC joins after the
    start and both admit it while round 0 is open, so it takes part from round 2. It gets
    the merge of round 1 handed over (with the federated fingerprint, from which it makes
    the agreed plan), trains round 2 from it, and ends with the same final model."""
    from p2pfed.synthetic import make_site, site_name, trainable_cases

    sim = simulate.setup(tmp_path, 2, init_args=["--configuration", "2d", "--rounds", "3",
                                                 "--iterations-per-epoch", "2", "--val-iterations", "1",
                                                 "--no-final-validation"])
    a, b = (s.name for s in sim.sites)
    for _ in range(4):  # summaries, histograms, plans: both stop before the initial model
        for site in (a, b):
            sim.tick(site, "--until", "plan")
    c = simulate.SimSite(site_name(2), 103, tmp_path / "sites" / site_name(2))
    make_site(c.folders["raw"], c.dataset_id, 2, n_train=trainable_cases(2), n_test=2, dim=2, seed=0)
    f = c.folders
    joined = json.loads(sim.cli("join", sim.storage, "--site", c.name, "--dataset", str(c.dataset_id),
                                "--nnunet-raw", str(f["raw"]), "--nnunet-preprocessed", str(f["preprocessed"]),
                                "--nnunet-results", str(f["results"]), "--federation", fed_fp(sim.storage),
                                "--json").stdout)
    for member in (a, b):
        out = sim.cli("admit", c.name, "--site", member, "--fingerprint", joined["fingerprint"]).stdout
    assert "It applies from round 2." in out
    sim.sites.append(c)
    simulate.run_until_done(sim, say=lambda line: None, max_ticks=60)

    def merged(site: str, r: int) -> dict:
        return json.loads((sim.home / "sites" / site / "work" / "merged" / f"{r:05d}" / "merged.json").read_text())

    assert merged(c.name, 1)["handed_over_by"] == a and merged(c.name, 1)["own"] == merged(a, 1)["own"]
    assert len({merged(s, 3)["own"] for s in (a, b, c.name)}) == 1
    seals = {r: json.loads((sim.workdir / "shared" / "rounds" / f"{r:05d}" / "SEAL.json").read_text())["body"]
             for r in (1, 2, 3)}
    assert sorted(seals[1]["contributions"]) == [a, b]
    assert all(sorted(seals[r]["contributions"]) == [a, b, c.name] for r in (2, 3))
    assert sim.cli("verify", "--site", c.name).returncode == 0
