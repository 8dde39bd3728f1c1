"""A hospital's first week (issue 14): settings that survive cron, one-line output, readable
fingerprints, a status that orients, and mistakes that leave nothing behind. Each test
failed on the code before that issue."""
from __future__ import annotations

import fcntl
import json
import os
import re
import stat
import subprocess
import sys

from rich.console import Console
from typer.main import get_command

import factory
from conftest import new_bucket
from p2pfed import federation as fedmod
from p2pfed import layout, node, objects, site as sitemod
from p2pfed import status as statusmod
from p2pfed.cli.app import app
from p2pfed.errors import SetupError
from test_bad_input import started
from test_membership import cli, fed_fp, join_args, site_args

HOME = lambda tmp: tmp / "home"  # noqa: E731


# --------------------------------------------------------------------------- cron
def test_endpoint_and_region_from_the_environment_survive_cron(s3_endpoint, tmp_path, monkeypatch):
    url = new_bucket(s3_endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    cli("init", url, *site_args(tmp_path, "a", 1), "--sites", 2)  # endpoint only in the environment
    saved = json.loads((HOME(tmp_path) / "sites" / "a" / "site.json").read_text())
    assert (saved["endpoint_url"], saved["region"]) == (s3_endpoint, "eu-central-1")
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in json.dumps(saved)  # never a secret
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)  # what cron's empty environment looks like
    report = json.loads(cli("round", "--site", "a", "--home", HOME(tmp_path), "--json").stdout)
    assert report["phase"] == "joining" and report["waiting_for"], report  # it read the member list


def test_every_storage_command_takes_endpoint():
    commands = get_command(app).commands
    for name in ("init", "join", "admit", "remove", "rotate-keys", "round", "run", "status", "verify"):
        assert "--endpoint" in [o for p in commands[name].params for o in p.opts], name


# --------------------------------------------------------------------------- failures leave nothing
def test_failed_init_leaves_no_site_home(tmp_path):
    result = cli("init", "memory://fed", *site_args(tmp_path, "a", 1), ok=False)
    assert result.exit_code == 5 and not (HOME(tmp_path) / "sites" / "a").exists()


def test_join_of_a_started_federation_is_a_join_request_and_of_a_finished_one_writes_nothing(tmp_path):
    """A running federation admits new sites (from a later round, docs/design.md 7.1); a
    finished one does not, and the refused join leaves nothing behind."""
    started(tmp_path)
    cli("join", *join_args(tmp_path, tmp_path / "shared", "b", 2))
    assert (tmp_path / "shared" / "joins" / "b.json").exists() and (HOME(tmp_path) / "sites" / "b").exists()
    home, _, view = node.open_site(HOME(tmp_path), "a")
    objects.put_envelope(view, layout.final_metrics("a"), "final", b"{}", home.identity())
    result = cli("join", *join_args(tmp_path, tmp_path / "shared", "c", 3), ok=False)
    assert result.exit_code == 3 and "has finished; it admits no new sites" in result.output
    assert not (tmp_path / "shared" / "joins" / "c.json").exists() and not (HOME(tmp_path) / "sites" / "c").exists()


def refuse_keys(path, data, mode=0o644):
    if path.name.endswith(".pem"):
        raise SetupError(f"cannot write {path}: No space left on device")
    return real_atomic_write(path, data, mode)


real_atomic_write = sitemod.atomic_write


def test_keys_are_saved_before_anything_is_shared(tmp_path, monkeypatch):
    cli("init", tmp_path / "shared", *site_args(tmp_path, "a", 1))
    monkeypatch.setattr(sitemod, "atomic_write", refuse_keys)
    assert cli("init", tmp_path / "other", *site_args(tmp_path, "z", 9), ok=False).exit_code == 3
    assert not (tmp_path / "other" / "federation.json").exists()
    assert cli("join", *join_args(tmp_path, tmp_path / "shared", "b", 2), ok=False).exit_code == 3
    assert not (tmp_path / "shared" / "joins").exists()
    assert not (HOME(tmp_path) / "sites" / "z").exists() and not (HOME(tmp_path) / "sites" / "b").exists()


def test_keys_are_removed_again_when_the_shared_write_fails(tmp_path, monkeypatch):
    from p2pfed import federation

    cli("init", tmp_path / "shared", *site_args(tmp_path, "a", 1))

    def taken(*args):
        raise SetupError("another join request for site 'b' is already waiting")

    monkeypatch.setattr(federation, "request_join", taken)
    assert cli("join", *join_args(tmp_path, tmp_path / "shared", "b", 2), ok=False).exit_code == 3
    assert not (HOME(tmp_path) / "sites" / "b").exists()


# --------------------------------------------------------------------------- fingerprints
def test_fingerprints_in_groups_accepted_with_or_without_spaces(tmp_path):
    url = tmp_path / "shared"
    cli("init", url, *site_args(tmp_path, "a", 1), "--sites", 3)
    fp = json.loads(cli("join", *join_args(tmp_path, url, "b", 2), "--json").stdout)["fingerprint"]
    text = cli("join", *join_args(tmp_path, url, "c", 3)).stdout
    grouped = re.search(r"Key fingerprint: ((?:[0-9a-f]{4} ){15}[0-9a-f]{4})", text).group(1)
    spaced = " ".join(fp[i:i + 4] for i in range(0, 64, 4)).upper()
    admitted = cli("admit", "b", "--site", "a", "--fingerprint", spaced, "--home", HOME(tmp_path)).stdout
    assert spaced.lower() in admitted
    cli("admit", "c", "--site", "a", "--fingerprint", grouped.replace(" ", ""), "--home", HOME(tmp_path))
    shown = cli("status", "--site", "a", "--home", HOME(tmp_path)).stdout
    assert spaced.lower() in shown.replace("\n", " ") or spaced.lower()[:39] in shown


def test_mismatch_never_shows_the_expected_fingerprint(tmp_path):
    url = tmp_path / "shared"
    cli("init", url, *site_args(tmp_path, "a", 1))
    fp = json.loads(cli("join", *join_args(tmp_path, url, "b", 2), "--json").stdout)["fingerprint"]
    bad = cli("admit", "b", "--site", "a", "--fingerprint", "ab" * 32, "--home", HOME(tmp_path), ok=False)
    assert bad.exit_code == 6 and "fingerprint mismatch for 'b'" in bad.output
    assert fp[:8] not in bad.output and fp[:4] + " " + fp[4:8] not in bad.output


def test_admitting_a_member_again_is_a_no_op(tmp_path):
    url = tmp_path / "shared"
    cli("init", url, *site_args(tmp_path, "a", 1))
    fp = json.loads(cli("join", *join_args(tmp_path, url, "b", 2), "--json").stdout)["fingerprint"]
    cli("admit", "b", "--site", "a", "--fingerprint", fp, "--home", HOME(tmp_path))
    again = cli("admit", "b", "--site", "a", "--fingerprint", fp, "--home", HOME(tmp_path))
    assert "'b' is already a member; nothing to do" in again.stdout


# --------------------------------------------------------------------------- status
def document(fed, site="site0"):
    return statusmod.document(home=fed.home, site=site, storage=None, endpoint=None)


def test_merge_agreed_only_when_every_participant_published(tmp_path):
    fed = factory.make(tmp_path, n=3, mode="asym", rounds=1, deadline_s=21600)
    fed.prepare("declare", sweeps=1)  # every site declared its cases
    for s in fed.sites:  # the last one seals round 1 and merges it; the others have not yet
        fed.run(s)
    r1 = next(e for e in document(fed)["rounds"] if e["round"] == 1)
    assert r1["sealed"] and r1["merge_agreed"] is None and r1["merge_published"] == [1, 3]
    fed.run_all()
    r1 = next(e for e in document(fed)["rounds"] if e["round"] == 1)
    assert r1["merge_agreed"] is True and r1["merge_published"] == [3, 3]


def rendered(doc) -> str:
    console = Console(record=True, width=200)
    statusmod.render(doc, console)
    return console.export_text()


def test_status_orients(tmp_path):
    fed = factory.make(tmp_path, n=2, mode="asym", rounds=1, deadline_s=21600)
    fed.prepare("declare", sweeps=1)  # both declared their cases
    fed.run("site0")
    text = rendered(document(fed))
    assert "1 round x 1 epoch x 250 iterations" in text and "deadline 6h;" in text
    assert "site0: round 1 committed; waiting for the seal" in text and "site1: planning and preprocessing" in text
    assert "Rounds: 0/1 round done" in text
    assert re.search(r"Deadline of round 1 \(6h after it opened\): \d{4}-\d\d-\d\d \d\d:\d\d", text)
    assert f"the final model will be written under {tmp_path / 'site0' / 'res'}" in text
    assert "2/" not in text.split("Rounds (")[1] or "published" in text
    fed.run_all()
    doc = document(fed)
    text = rendered(doc)
    assert doc["progress"]["rounds_done"] == 1 and doc["progress"]["round_seconds"] is not None
    assert "Results folder:" in text and "agreed" in text
    public = rendered(statusmod.document(home=None, site=None, storage=fed.url, endpoint=None))
    assert "Rounds (who committed; metrics need" in public and "pseudo-Dice" not in public


def test_status_into_a_closed_pipe_exits_quietly(tmp_path):
    fed = factory.make(tmp_path, n=2, mode="asym")
    proc = subprocess.Popen([sys.executable, "-m", "p2pfed.cli.app", "status", "--storage", fed.url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # like `| head` that has read all it wanted
    assert proc.wait(timeout=120) == 0 and proc.stderr.read() == b""


def test_public_plot_without_metrics_writes_nothing(tmp_path):
    fed = factory.make(tmp_path, n=2, mode="asym")
    plot = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, "-m", "p2pfed.cli.app", "status", "--storage", fed.url,
                           "--plot", str(plot)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert f"No metrics to plot (metrics are encrypted; use --site); {plot} not written" in proc.stdout
    assert not plot.exists()


# --------------------------------------------------------------------------- the site home
def test_pins_are_written_only_under_the_sites_lock(tmp_path):
    fed = factory.make(tmp_path, n=2)
    state = fed.home / "sites" / "site0" / "state.json"
    with open(fed.home / "sites" / "site0" / "tick.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a tick of site0 is running
        node.open_site(fed.home, "site0")  # what `status`/`verify`/`admit` do
        assert not state.exists()
    node.open_site(fed.home, "site0")
    assert json.loads(state.read_text())["epochs"] == fed_hashes(fed)


def fed_hashes(fed) -> list[str]:
    """The verified epoch chain (epoch 1: site1 admitted), as a site keeps it."""
    return fedmod.load(fed.storage).log.hashes()


def test_atomic_write_uses_a_unique_temp_name_and_syncs_the_folder(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    (tmp_path / ".state.json.tmp").mkdir()  # another writer's temporary file, under the old fixed name
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real_fsync(fd)))
    sitemod.atomic_write(target, b"{}")
    assert target.read_bytes() == b"{}" and synced == [False, True]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".state.json.tmp", "state.json"]


# --------------------------------------------------------------------------- the command line
def test_version_and_help_look_like_other_typer_tools():
    assert re.fullmatch(r"p2pfed \S+ \(nnunetv2 \S+\)\n", cli("--version").stdout)
    for name, command in get_command(app).commands.items():
        text = cli(name, "--help").stdout
        assert not re.search(r"<(str|bool|int|float|path)>|\{\w+\}", text), (name, text)
        assert re.search(rf"Usage: \S+ {name} \[OPTIONS\]", text), name


def test_ctrl_c_in_a_tick_says_the_next_tick_resumes(tmp_path, monkeypatch):
    fed = factory.make(tmp_path, n=1, mode="asym")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(node, "open_site", interrupted)
    result = cli("round", "--site", "site0", "--home", fed.home, ok=False)
    assert result.exit_code == 130
    assert result.output.strip().splitlines() == [
        "p2pfed: interrupted; the next tick resumes where this one stopped"]
