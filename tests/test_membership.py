"""init -> join -> admit -> status -> verify through the real CLI, on both backends,
and the tampering a storage operator could try on membership objects."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from p2pfed import federation as fedmod
from p2pfed import crypto, epochs, layout, objects
from p2pfed.crypto import Identity, sha256_hex, sign_record
from p2pfed.errors import IntegrityError
from p2pfed.node import open_site
from p2pfed.storage import open_storage
from p2pfed.verify import verify_storage
from p2pfed.cli.app import app

runner = CliRunner()
DATASET = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1},
           "numTraining": 5, "file_ending": ".nii.gz"}


def raw_dataset(root: Path, dataset_id: int, **overrides) -> Path:
    """A dataset folder with what init/join check cheaply (no images needed here)."""
    folder = root / f"Dataset{dataset_id:03d}_S{dataset_id}"
    (folder / "labelsTr").mkdir(parents=True)
    for i in range(5):
        (folder / "labelsTr" / f"c{i}.nii.gz").write_bytes(b"")
    (folder / "dataset.json").write_text(json.dumps({**DATASET, **overrides}))
    return root


def cli(*args, ok=True):
    result = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def site_args(tmp: Path, site: str, dataset_id: int, **overrides) -> list:
    raw = raw_dataset(tmp / site / "raw", dataset_id, **overrides)
    return ["--site", site, "--dataset", dataset_id, "--nnunet-raw", raw, "--nnunet-preprocessed",
            tmp / site / "pre", "--nnunet-results", tmp / site / "res", "--home", tmp / "home"]


def fed_fp(url) -> str:
    """The federation fingerprint a founder reads to a joining site (what `init` printed)."""
    return sha256_hex(open_storage(str(url)).get(layout.FEDERATION))


def join_args(tmp: Path, url, site: str, dataset_id: int, **overrides) -> list:
    """`p2pfed join` arguments of a site that was given the right federation fingerprint."""
    return [url, *site_args(tmp, site, dataset_id, **overrides), "--federation", fed_fp(url)]


def form(tmp: Path, url: str, n: int = 3) -> list[str]:
    """A federation of n sites, all admitted with checked fingerprints (each new site by
    every member before it: the admission quorum is a majority of them)."""
    sites = [f"site{i}" for i in range(n)]
    cli("init", url, *site_args(tmp, sites[0], 1), "--sites", n, "--configuration", "2d")
    for i, s in enumerate(sites[1:], 2):
        fp = json.loads(cli("join", *join_args(tmp, url, s, i), "--json").stdout)["fingerprint"]
        for member in sites[:i - 1]:
            cli("admit", s, "--site", member, "--fingerprint", fp, "--home", tmp / "home")
    return sites


def test_every_command_explains_itself():
    """The top-level help lists every command; each command's help lists all its options."""
    from typer.main import get_command

    commands = get_command(app).commands
    top = cli("--help").stdout
    assert sorted(commands) == sorted(["init", "join", "admit", "remove", "rotate-keys", "round", "run", "status",
                                      "verify", "simulate"])
    for name, command in commands.items():
        assert f" {name} " in top, name
        text = cli(name, "--help").stdout
        for option in (o for p in command.params if not getattr(p, "hidden", False) for o in p.opts if o[:2] == "--"):
            assert option in text, (name, option)


def test_init_join_admit_status_verify(storage_url, tmp_path):
    sites = form(tmp_path, storage_url)
    doc = json.loads(cli("status", "--site", "site1", "--home", tmp_path / "home", "--json").stdout)
    assert [m["site"] for m in doc["members"]] == sites and doc["pending"] == []
    assert doc["federation"]["settings"]["configuration"] == "2d"
    assert doc["federation"]["settings"]["sites"] == 3
    assert doc["federation"]["versions"]["nnunetv2"] != "absent"
    assert doc["phase"]["name"] == "joining"
    public = json.loads(cli("status", "--storage", storage_url, "--json").stdout)
    assert public["members"] == doc["members"]
    result = cli("verify", "--site", "site2", "--home", tmp_path / "home")
    assert "0 bad" in result.stdout
    assert "Members" in cli("status", "--site", "site0", "--home", tmp_path / "home").stdout


def test_pending_join_and_wrong_fingerprint(tmp_path):
    url = str(tmp_path / "shared")
    cli("init", url, *site_args(tmp_path, "a", 1))
    cli("join", *join_args(tmp_path, url, "b", 2))
    doc = json.loads(cli("status", "--storage", url, "--json").stdout)
    assert [p["site"] for p in doc["pending"]] == ["b"]
    bad = cli("admit", "b", "--site", "a", "--fingerprint", "ab" * 32, "--home", tmp_path / "home", ok=False)
    assert bad.exit_code == 6 and "fingerprint mismatch for 'b'" in bad.output
    assert not (tmp_path / "shared" / "epochs").exists()


def test_join_with_incompatible_dataset_is_refused_before_sharing(tmp_path):
    url = str(tmp_path / "shared")
    cli("init", url, *site_args(tmp_path, "a", 1))
    result = cli("join", *join_args(tmp_path, url, "b", 2, labels={"background": 0, "tumour": 1}), ok=False)
    assert result.exit_code == 4 and "site b: dataset.json labels" in result.output
    assert not (tmp_path / "shared" / "joins").exists()


@pytest.mark.parametrize("mode, admitted", [("asym", True), ("ffe", False)])
def test_a_site_in_another_modality_joins_only_an_asym_federation(mode, admitted, tmp_path):
    """Asym: each site plans and normalizes its own data, so an MRI site may join a CT
    founder (the channels' number must agree); FFE's one plan cannot normalize both."""
    url = str(tmp_path / "shared")
    cli("init", url, *site_args(tmp_path, "a", 1), "--mode", mode)
    result = cli("join", *join_args(tmp_path, url, "b", 2, channel_names={"0": "MRI"}), ok=admitted)
    assert (tmp_path / "shared" / "joins" / "b.json").exists() == admitted
    if not admitted:
        assert result.exit_code == 4 and "site b: dataset.json channel_names" in result.output
        assert "--mode asym" in result.output
    two = cli("join", *join_args(tmp_path, url, "c", 3, channel_names={"0": "MRI", "1": "CT"}), ok=False)
    assert two.exit_code == 4 and "dataset.json" in two.output and "channel" in two.output


def test_second_init_and_missing_dataset(tmp_path):
    url = str(tmp_path / "shared")
    cli("init", url, *site_args(tmp_path, "a", 1))
    again = cli("init", url, *site_args(tmp_path, "z", 9), ok=False)
    assert again.exit_code == 3 and "already exists" in again.output
    missing = cli("join", url, "--site", "b", "--dataset", 7, "--nnunet-raw", tmp_path / "nowhere",
                  "--nnunet-preprocessed", tmp_path, "--nnunet-results", tmp_path, "--home", tmp_path / "home",
                  ok=False)
    assert missing.exit_code == 4 and "dataset 7 not found" in missing.output


def test_private_key_with_loose_permissions_is_refused(tmp_path):
    url = str(tmp_path / "shared")
    cli("init", url, *site_args(tmp_path, "a", 1))
    key = tmp_path / "home" / "sites" / "a" / "signing.pem"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    os.chmod(key, 0o644)
    result = cli("verify", "--site", "a", "--home", tmp_path / "home", ok=False)
    assert result.exit_code == 3 and "chmod 600" in result.output


def _objects(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and "probe" not in p.parts)


def test_flipping_any_byte_of_any_object_is_detected_and_named(tmp_path):
    """The storage operator flips one byte anywhere: verify fails and names the object."""
    url = str(tmp_path / "shared")
    form(tmp_path, url, 2)
    cli("join", *join_args(tmp_path, url, "late", 7))  # a pending join request too
    home, _, fed = open_site(tmp_path / "home", "site0")
    me = home.identity()
    final = crypto.canonical_json({"model": "0" * 64, "validation_dice": {"1": 0.9, "foreground": 0.9}})
    objects.put_envelope(fed, layout.final_metrics("site0"), "final", final, me)
    objects.put_record(fed, layout.plan_hash("site0"), "plan-hash", {"plan_sha256": "0" * 64}, me)
    files = _objects(tmp_path / "shared")
    assert len(files) == 7
    for path in files:
        key = path.relative_to(tmp_path / "shared").as_posix()
        original = path.read_bytes()
        step = max(1, len(original) // 60)  # ~60 positions per object, spread over all of it
        for i in list(range(0, len(original), step)) + [len(original) - 1]:
            damaged = bytearray(original)
            damaged[i] ^= 0x20
            path.write_bytes(bytes(damaged))
            try:
                fresh = fedmod.load(open_storage(url), pinned_genesis=fed.genesis_sha256)
                bad = [f.key for f in verify_storage(fresh, me) if not f.ok]
                # a damaged epoch record also leaves the approvals of its epoch dangling
                assert key in bad and all(k == key or k.startswith("epochs/") for k in bad), (key, i, bad)
            except IntegrityError as exc:
                assert key in exc.message or key.startswith("federation"), (key, i, exc.message)
        path.write_bytes(original)
    assert all(f.ok for f in verify_storage(fedmod.load(open_storage(url)), me))


def test_objects_from_another_federation_or_a_non_member_are_refused(tmp_path):
    url, other = str(tmp_path / "shared"), str(tmp_path / "other")
    form(tmp_path, url, 2)
    cli("init", other, *site_args(tmp_path, "x", 5))
    home, _, fed = open_site(tmp_path / "home", "site0")
    xhome, _, xfed = open_site(tmp_path / "home", "x")
    # a well-formed envelope of the other federation, dropped at a valid key of ours
    key = layout.final_metrics("site0")
    blob = objects.put_envelope(xfed, key, "final", b"{}", xhome.identity(),
                                recipients={**xfed.members, "site0": fed.members["site0"]})
    fed.storage.put_new(key, blob)
    bad = {f.key: f.detail for f in verify_storage(fed, home.identity()) if not f.ok}
    assert "not a member" in bad[key]
    # an epoch proposal and approval signed by an outsider: ignored and reported, not a halt
    outsider = Identity.generate("mallory")
    head, change = fed.log.head, {"op": epochs.ADMIT, "site": "mallory"}
    key, data = epochs.proposal(fed.id, head, change, epochs.changed(head, change, outsider.public()), outsider)
    fed.storage.put_new(key, data)
    akey, adata = epochs.approval(fed.id, head.number + 1, 0, sha256_hex(data), outsider)
    fed.storage.put_new(akey, adata)
    again = fedmod.load(fed.storage)
    assert "mallory" not in again.members and again.members == fed.members
    assert again.log.ignored == {key: f"{key}: not signed by 'mallory' as a member of epoch 1",
                                 akey: f"{akey}: not signed by 'mallory' as a member of epoch 1"}
    bad = {f.key: f.detail for f in verify_storage(again, home.identity()) if not f.ok}
    assert bad[key] == again.log.ignored[key] and bad[akey] == again.log.ignored[akey]


def test_rolled_back_or_replaced_membership_is_refused(tmp_path):
    url = str(tmp_path / "shared")
    form(tmp_path, url, 2)
    open_site(tmp_path / "home", "site0")  # keeps the verified epoch chain
    approval = tmp_path / "shared" / layout.epoch_approval(1, 0, "site0")
    saved = approval.read_bytes()
    approval.unlink()
    with pytest.raises(IntegrityError, match="epoch 1 disappeared from the shared storage"):
        open_site(tmp_path / "home", "site0")
    approval.write_bytes(saved)
    genesis = tmp_path / "shared" / "federation.json"
    genesis.write_bytes(genesis.read_bytes().replace(b'"rounds":1000', b'"rounds":1001'))
    with pytest.raises(IntegrityError, match="differs from the one this site joined"):
        open_site(tmp_path / "home", "site0")
