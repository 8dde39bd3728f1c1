"""Bad local input, through the CLI: each case gives one line `p2pfed: error: ... (hint:
...)` and its documented exit code (p2pfed/errors.py; docs/design.md, section 8, "Exit codes
for cron"), never a traceback.

A case is (prepare, expected exit code, expected message): `prepare(tmp, monkeypatch)`
builds what it needs and returns the command's arguments. Dataset contents (images,
labels) are checked by nnU-Net's readers: those cases run in one subprocess, so that
nnU-Net is imported once, with one set of nnU-Net folders."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import factory
from p2pfed import federation, layout, node, objects, storage
from p2pfed.cli.app import app
from conftest import new_bucket
from test_membership import cli, fed_fp, join_args, site_args

LINE = re.compile(r"^p2pfed: error: .+ \(hint: .+\)$")


def init(*extra, site="a", dataset=1):
    def prepare(tmp, mp):
        return ["init", tmp / "shared", *site_args(tmp, site, dataset), *extra]
    return prepare


def join(overrides=None, url=None, extra=()):
    """A federation founded by site a; site b joins with dataset.json `overrides`."""
    def prepare(tmp, mp):
        cli("init", tmp / "shared", *site_args(tmp, "a", 1))
        # an unreachable url fails before the fingerprint is compared: any will do there
        fp = "00" * 32 if url else fed_fp(tmp / "shared")
        return ["join", url or tmp / "shared", *site_args(tmp, "b", 2, **(overrides or {})), "--federation", fp,
                *extra]
    return prepare


def broken_dataset(damage):
    """site a's dataset, damaged by damage(dataset folder), then init."""
    def prepare(tmp, mp):
        args = site_args(tmp, "a", 1)
        damage(tmp / "a" / "raw" / "Dataset001_S1")
        return ["init", tmp / "shared", *args]
    return prepare


def tick(setup=lambda fed, mp: None, site="site0", n=1, until_=None, **settings):
    """`p2pfed round` of a one-site asym federation from tests/factory.py, after
    setup(fed, mp). (Asym: a real FFE tick would compute a fingerprint with nnU-Net.)"""
    def prepare(tmp, mp):
        fed = factory.make(tmp, n=n, **{"mode": "asym", **settings})
        setup(fed, mp)
        return ["round", "--site", site, "--home", fed.home] + (["--until", until_] if until_ else [])
    return prepare


def at_round_1(fed, mp):
    fed.run("site0", stop_after="plan")  # planned: the next real tick trains round 1


def site_file(name, data):
    def setup(fed, mp):
        path = fed.home / "sites" / "site0" / name
        path.unlink(missing_ok=True) if data is None else path.write_bytes(data)
    return setup


def pinned(package, version):
    def setup(fed, mp):
        real = federation.version_of
        mp.setattr(federation, "version_of", lambda p: version if p == package else real(p))
    return setup


def truncated_checkpoint(fed, mp):
    at_round_1(fed, mp)
    folder = fed.root / "site0" / "res" / "Dataset001_S1" / "nnUNetTrainer__nnUNetPlans__2d" / "fold_0"
    folder.mkdir(parents=True)
    (folder / "checkpoint_latest.pth").write_bytes(b"PK\x03\x04" + b"\0" * 100)


def raise_enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def home_disk_full(fed, mp):
    mp.setattr(os, "fsync", raise_enospc)


def genesis_epoch(fed) -> dict:
    """The start seal's pin of epoch 0 (the founder alone)."""
    return {"epoch": 0, "epoch_sha256": fed.log.chain[0].sha256}


def admit_ghost(tmp, mp):
    cli(*init()(tmp, mp))
    return ["admit", "ghost", "--site", "a", "--fingerprint", "00" * 32, "--home", tmp / "home"]


def second_init(tmp, mp):
    cli(*init()(tmp, mp))
    return init(site="z", dataset=9)(tmp, mp)


def wrong_dataset_id(tmp, mp):
    args = init()(tmp, mp)
    args[args.index("--dataset") + 1] = 7
    return args


def no_credentials(tmp, mp):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        mp.delenv(var, raising=False)
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp / "none"))
    mp.setenv("AWS_CONFIG_FILE", str(tmp / "none"))
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return join(url="s3://bucket/fed", extra=["--endpoint", "http://127.0.0.1:9"])(tmp, mp)


def unreachable(tmp, mp):
    mp.setattr(storage, "RETRIES", 1)
    mp.setattr(storage, "BACKOFF_S", 0.01)
    mp.setenv("AWS_ACCESS_KEY_ID", "x")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "x")
    return join(url="s3://bucket/fed", extra=["--endpoint", "http://127.0.0.1:9"])(tmp, mp)


def no_raw_flag(tmp, mp):
    mp.delenv("nnUNet_raw", raising=False)
    args = init()(tmp, mp)
    i = args.index("--nnunet-raw")
    return args[:i] + args[i + 2:]


def unwritable_home(tmp, mp):
    args = init()(tmp, mp)
    (tmp / "file").write_text("")
    return args[:-1] + [tmp / "file" / "home"]


def admit_by_non_member(tmp, mp):
    """b and c are still pending: b cannot admit c."""
    cli(*init()(tmp, mp))
    for site, dataset in (("b", 2), ("c", 3)):
        cli("join", *join_args(tmp, tmp / "shared", site, dataset))
    return ["admit", "c", "--site", "b", "--fingerprint", "00" * 32, "--home", tmp / "home"]


def started(tmp: Path) -> None:
    """Site a's federation of one site, started (the start seal exists)."""
    cli("init", tmp / "shared", *site_args(tmp, "a", 1), "--sites", 1)
    home, _, view = node.open_site(tmp / "home", "a")
    objects.put_record(view, layout.FINGERPRINT_SEAL, "fingerprint-seal",
                       {"participants": ["a"], "sealed_at": 0, **genesis_epoch(view)}, home.identity())


def finished(tmp: Path) -> None:
    """Site a's federation of one site, started and finished (its final metrics exist)."""
    started(tmp)
    home, _, view = node.open_site(tmp / "home", "a")
    objects.put_envelope(view, layout.final_metrics("a"), "final", b"{}", home.identity())


def join_finished(tmp, mp):
    finished(tmp)
    return ["join", *join_args(tmp, tmp / "shared", "b", 2)]


def rm(pattern):
    return lambda folder: [p.unlink() for p in sorted(folder.glob(pattern))]


CASES = {
    # usage: exit 2
    "invalid site name": (init(site="bad name"), 2, "invalid site name 'bad name'"),
    "unknown device": (init("--device", "tpu"), 2, "--device must be one of cpu, cuda, mps"),
    "quorum above sites": (init("--sites", "2", "--quorum", "3"), 2, "--quorum must be between 1 and --sites"),
    "unreadable deadline": (init("--deadline", "soon"), 2, "cannot read duration 'soon'"),
    "update norm bound in asym mode": (init("--mode", "asym", "--max-update-norm", "1"), 2,
                                       "--max-update-norm needs --mode ffe"),
    "unknown mode": (init("--mode", "fedprox"), 2, "--mode must be one of ffe, asym"),
    "unknown optimizer state": (init("--optimizer-state", "fedavgm"), 2,
                                "--optimizer-state must be one of local, reset, merged"),
    "learning rate out of range": (init("--learning-rate", "0"), 2, "--learning-rate must be in (0, 1]"),
    "merged momentum in asym mode": (init("--mode", "asym", "--optimizer-state", "merged"), 2,
                                     "--optimizer-state merged needs --mode ffe"),
    "merged momentum with DP": (init("--sites", "3", "--secure-aggregation", "--weighting", "uniform", "--dp-clip", "1",
                                     "--dp-noise-multiplier", "1", "--optimizer-state", "merged"), 2,
                                "--optimizer-state merged cannot be combined with differential privacy"),
    "admit without a join request": (admit_ghost, 2, "no pending join request from 'ghost'"),
    "simulate CT and MRI sites with FFE": (lambda t, mp: ["simulate", t / "demo", "--modalities", "CT,MRI"], 2,
                                           "ffe needs every site in the same modality (hint: add --mode asym"),
    "simulate an unknown modality": (lambda t, mp: ["simulate", t / "demo", "--modalities", "PET"], 2,
                                     "--modalities 'PET': give CT or MRI"),
    "status without --site or --storage": (lambda t, mp: ["status", "--home", t / "home"], 2,
                                           "(hint: e.g. `p2pfed status --site uka`; see `p2pfed status --help`)"),
    "round with an unknown --until": (tick(lambda fed, mp: None, until_="final"), 2,
                                      "(hint: leave --until out, or give --until plan)"),
    # setup: exit 3
    "second init on the same storage": (second_init, 3, "a federation already exists at"),
    "join a storage without federation": (lambda t, mp: ["join", t / "empty", *site_args(t, "b", 2),
                                                         "--federation", "00" * 32], 3,
                                          "no federation at"),
    "nnUNet_raw neither given nor set": (no_raw_flag, 3, "nnUNet_raw is not set"),
    "unwritable home": (unwritable_home, 3, "cannot write the site home"),
    "admit by a site that is not a member": (admit_by_non_member, 3, "ask a member (a) to run `p2pfed admit c`"),
    "join a federation that has finished": (join_finished, 3, "has finished; it admits no new sites"),
    "tick as a site not set up here": (tick(site="site7"), 3, "site 'site7' is not set up in"),
    "private key missing": (tick(site_file("signing.pem", None)), 3, "signing.pem is missing"),
    "corrupt local state": (tick(site_file("state.json", b"{\"round\": ")), 3, "state.json is corrupt"),
    "corrupt site settings": (tick(site_file("site.json", b"[1, 2")), 3, "site.json is corrupt"),
    "other nnunetv2 than pinned": (tick(pinned("nnunetv2", "2.0.1")), 3,
                                   "this site runs nnunetv2 2.0.1, the federation pins"),
    "other p2pfed minor than pinned": (tick(pinned("p2pfed", "0.99.0")), 3,
                                       "this site runs p2pfed 0.99.0, the federation pins"),
    "truncated nnU-Net checkpoint": (tick(truncated_checkpoint), 3,
                                     "checkpoint_latest.pth is corrupt (truncated or damaged)"),
    # the tick's first write in its home: the member records it verified
    "disk full in the site home": (tick(home_disk_full), 3, "sites/site0/state.json: No space left on device"),
    # dataset: exit 4
    "dataset id not found": (wrong_dataset_id, 4, "dataset 7 not found in nnUNet_raw"),
    "no dataset.json": (broken_dataset(rm("dataset.json")), 4, "Dataset001_S1 has no dataset.json"),
    "dataset.json not JSON": (broken_dataset(lambda f: (f / "dataset.json").write_text("{")), 4,
                              "Dataset001_S1/dataset.json is not valid JSON"),
    "dataset.json without labels": (broken_dataset(lambda f: (f / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "numTraining": 5}))), 4,
        "Dataset001_S1/dataset.json lacks 'labels'"),
    "partial dataset (4 labelled cases)": (broken_dataset(rm("labelsTr/c0.nii.gz")), 4,
                                           "Dataset001_S1 has 4 labelled training cases"),
    "labels differ from the federation's": (join({"labels": {"background": 0, "tumour": 1}}), 4,
                                            "site b: dataset.json labels is"),
    "channels differ from the federation's": (join({"channel_names": {"0": "MRI"}}), 4,
                                              "site b: dataset.json channel_names is"),
    "file ending differs from the federation's": (join({"file_ending": ".mha"}), 4,
                                                  "site b: dataset.json file_ending is"),
    "unsupported storage URL": (lambda t, mp: ["init", "nosuch://x", *site_args(t, "a", 1)], 2,
                                "unsupported storage URL 'nosuch://x'"),
    # storage: exit 5
    "storage without create-only writes": (lambda t, mp: ["init", "memory://fed", *site_args(t, "a", 1)], 5,
                                           "cannot do atomic create-only writes"),
    "missing credentials": (no_credentials, 5, "no credentials for s3://bucket/fed"),
    "unreachable endpoint": (unreachable, 5, "storage s3://bucket/fed unreachable at http://127.0.0.1:9 after 1 retry"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_with_its_exit_code(case, tmp_path, monkeypatch):
    prepare, code, message = CASES[case]
    result = CliRunner().invoke(app, [str(a) for a in prepare(tmp_path, monkeypatch)])
    last = result.output.strip().splitlines()[-1]
    assert (result.exit_code, message in last) == (code, True), result.output
    assert LINE.match(last) and "Traceback" not in result.output, result.output


def fill_with_a_full_tmpfs(folder: Path) -> None:
    """Put `folder` on a tiny tmpfs mounted over it, its contents copied over, then fill
    it to the last byte: a real full disk (needs root with the right to mount)."""
    saved = folder.with_name(folder.name + ".saved")
    folder.rename(saved)
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "p2pfed-test", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        folder.rmdir()
        saved.rename(folder)
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): a full disk needs root with CAP_SYS_ADMIN")
    shutil.copytree(saved, folder, dirs_exist_ok=True)
    fd = os.open(folder / ".tmp-filler", os.O_WRONLY | os.O_CREAT)  # ".tmp-": storage listings skip it
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)


def test_disk_full_on_the_shared_folder_is_one_line_exit_5(tmp_path):
    """The tick's first write (the start seal) meets a really full shared folder: one line,
    exit 5, and nothing half-written (no temporary file left behind)."""
    fed = factory.make(tmp_path, n=1, mode="asym")
    shared = Path(fed.url)
    fill_with_a_full_tmpfs(shared)
    try:
        code, last = run_cli(["round", "--site", "site0", "--home", fed.home])
        assert code == 5 and f"no space left on the storage {shared} while writing fingerprints/SEAL.json" in last, last
        assert [p.name for p in shared.rglob(".tmp-*")] == [".tmp-filler"]
    finally:
        subprocess.run(["umount", str(shared)], check=True)


def run_cli(args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    last = result.output.strip().splitlines()[-1]
    assert LINE.match(last) and "Traceback" not in result.output, result.output
    return result.exit_code, last


def test_init_into_a_missing_bucket_is_a_storage_error_naming_it(s3_server, tmp_path):
    """s3fs reports moto's NoSuchBucket as FileNotFoundError ("no such key"), which used to
    escape as an internal error (exit 1). SeaweedFS refuses an anonymous write into a
    missing bucket with AccessDenied instead; both are one line, exit 5, naming the bucket."""
    url = "s3://no-such-bucket-p2pfed/x"
    code, last = run_cli(["init", url, *site_args(tmp_path, "a", 1), "--endpoint", s3_server])
    assert code == 5 and url in last, last
    if "bucket 'no-such-bucket-p2pfed' of" not in last:  # SeaweedFS
        assert f"access denied to {url}" in last, last


def test_failed_init_leaves_nothing_in_the_storage(s3_server, tmp_path):
    """Objects cannot be deleted through the storage interface, so init writes nothing
    (not even its create-only probe) before every local check has passed."""
    url = new_bucket(s3_server)
    args = site_args(tmp_path, "a", 1)
    rm("labelsTr/c0.nii.gz")(tmp_path / "a" / "raw" / "Dataset001_S1")  # 4 labelled cases
    code, last = run_cli(["init", url, *args])
    assert code == 4 and "has 4 labelled training cases" in last, last
    assert storage.open_storage(url).list_prefix("") == []


def drop_label(folder):
    sorted((folder / "labelsTr").iterdir())[0].unlink()


def edit_image(pattern, change):
    def damage(folder):
        import SimpleITK as sitk

        for path in sorted(folder.glob(pattern))[:1 if "images" in pattern else None]:
            image = sitk.ReadImage(str(path))
            array = change(sitk.GetArrayFromImage(image))
            out = sitk.GetImageFromArray(array)
            out.CopyInformation(image)
            sitk.WriteImage(out, str(path))
    return damage


def set_first(value):
    def change(array):
        array = array.astype(np.float32 if np.isnan(value) else array.dtype)
        array.flat[0] = value
        return array
    return change


def nan_in_mha(folder):
    """NaN survives in .mha, not in NIfTI: ITK's NIfTI reader (nnU-Net's too) reads it as 0."""
    import SimpleITK as sitk

    for path in sorted(folder.glob("*Tr/*.nii.gz")):
        sitk.WriteImage(sitk.ReadImage(str(path)), str(path.with_name(path.name[:-7] + ".mha")))
        path.unlink()
    meta = json.loads((folder / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps({**meta, "file_ending": ".mha"}))
    edit_image("imagesTr/*", set_first(np.nan))(folder)


def rename_to_nii(folder):
    for path in sorted(folder.glob("*Tr/*.nii.gz")):
        path.rename(path.with_name(path.name[:-3]))


CONTENT = {  # found by nnU-Net's readers while the tick computes the fingerprint summary
    "images without labels": (drop_label, "images but no label in labelsTr"),
    "NaN image": (nan_in_mha, "image has NaN or infinite voxels"),
    "empty foreground": (edit_image("labelsTr/*", lambda a: np.zeros_like(a)),
                         "no training case has foreground (label > 0) voxels"),
    "wrong file endings": (rename_to_nii, "dataset.json numTraining is 6, imagesTr holds 0 cases"),
    "undeclared label value": (edit_image("labelsTr/*", set_first(7)), "label values [7] not declared"),
}
ONE_PROCESS = """
import json, sys
from typer.testing import CliRunner
from p2pfed.cli.app import app
out = {}
for name, (init, tick) in json.loads(sys.argv[1]).items():
    assert CliRunner().invoke(app, init).exit_code == 0
    result = CliRunner().invoke(app, tick)
    out[name] = [result.exit_code, result.output]
print(json.dumps(out))
"""


def test_bad_dataset_contents_stop_the_first_tick_with_one_line(tmp_path):
    from p2pfed.synthetic import make_site

    folders = ["--nnunet-raw", tmp_path / "raw", "--nnunet-preprocessed", tmp_path / "pre",
               "--nnunet-results", tmp_path / "res", "--home", tmp_path / "home"]
    commands = {}
    for i, (name, (damage, _)) in enumerate(CONTENT.items()):
        site, dataset = f"s{i}", 201 + i
        damage(make_site(tmp_path / "raw", dataset, i % 3, n_train=6, n_test=0, size=(16, 16)))
        commands[name] = [[str(a) for a in ["init", tmp_path / f"shared{i}", "--site", site, "--dataset", dataset,
                                            "--sites", 1, "--configuration", "2d", "--rounds", 1,
                                            "--iterations-per-epoch", 1, "--val-iterations", 1, *folders]],
                          [str(a) for a in ["round", "--site", site, *folders[-2:]]]]
    proc = subprocess.run([sys.executable, "-c", ONE_PROCESS, json.dumps(commands)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name, (code, output) in json.loads(proc.stdout).items():
        last = output.strip().splitlines()[-1]
        assert code == 4 and CONTENT[name][1] in last and LINE.match(last), (name, output[-500:])
