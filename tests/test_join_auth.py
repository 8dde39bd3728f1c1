"""Joining is authenticated both ways: the joining site checks the federation's
fingerprint (the sha256 of the signed federation.json, given out of band by the
founder) before it writes anything, as members check a joiner's key fingerprint.

The attack (issue 11, 1): the storage operator shows a joining site a forged
federation.json that copies the real one's id, settings and founder name but is
signed with the operator's own key; a joiner that pinned it would encrypt everything
it shares to the operator."""
from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

from p2pfed import layout
from p2pfed.crypto import Identity, grouped, sha256_hex, sign_record
from p2pfed.storage import open_storage

from test_membership import cli, fed_fp, join_args, site_args

P2PFED = str(Path(sys.executable).with_name("p2pfed"))


def forge_federation(real: Path, forged: Path) -> None:
    """What the operator serves instead of `real`: the same body, signed by its own key."""
    body = json.loads((real / layout.FEDERATION).read_bytes())["body"]
    impostor = Identity.generate(body["founder"]["site"])  # the founder's name, other keys
    forged.mkdir(parents=True)
    (forged / layout.FEDERATION).write_bytes(sign_record({**body, "founder": impostor.public().to_json()},
                                                         impostor))


def nothing_written(tmp: Path, shared: Path, site: str) -> bool:
    return not (shared / "joins").exists() and not (tmp / "home" / "sites" / site).exists()


def test_init_prints_the_federation_fingerprint_and_status_shows_it(tmp_path):
    url = tmp_path / "shared"
    out = cli("init", url, *site_args(tmp_path, "a", 1)).stdout
    expected = grouped(sha256_hex((url / layout.FEDERATION).read_bytes()))
    assert f"Federation fingerprint: {expected}" in out
    assert f"--federation '{expected}'" in out  # the join command to hand to the other sites
    created = json.loads(cli("init", tmp_path / "other", *site_args(tmp_path, "z", 9), "--json").stdout)
    assert created["federation_fingerprint"] == fed_fp(tmp_path / "other")
    shown = cli("status", "--storage", url).stdout
    assert expected in shown.replace("\n", " ")


def test_a_forged_federation_is_refused_by_a_site_that_has_the_fingerprint(tmp_path):
    real, forged = tmp_path / "shared", tmp_path / "forged"
    cli("init", real, *site_args(tmp_path, "a", 1))
    forge_federation(real, forged)
    b = site_args(tmp_path, "b", 2)
    result = cli("join", forged, *b, "--federation", fed_fp(real), ok=False)
    assert result.exit_code == 6
    assert f"the federation at {forged} has another fingerprint than the one given" in result.output
    assert fed_fp(forged)[:8] not in result.output  # the impostor's value is never shown to paste back
    assert nothing_written(tmp_path, forged, "b")
    # the real one, with separators and upper case as read over the phone, is accepted
    given = grouped(fed_fp(real)).upper()
    assert "Join request for 'b' published" in cli("join", real, *b, "--federation", given).stdout


def test_join_without_the_fingerprint_off_a_terminal_is_refused_and_writes_nothing(tmp_path):
    url = tmp_path / "shared"
    cli("init", url, *site_args(tmp_path, "a", 1))
    result = cli("join", url, *site_args(tmp_path, "b", 2), ok=False)
    assert result.exit_code == 2
    assert "join needs --federation FINGERPRINT when it cannot ask at a terminal" in result.output
    assert "(hint: ask the founder for the federation fingerprint `p2pfed init` printed)" in result.output
    assert nothing_written(tmp_path, url, "b")


def _join_at_a_terminal(tmp: Path, url: Path, site: str, dataset: int, answer: str) -> tuple[int, str]:
    """`p2pfed join` without --federation on a real pseudo-terminal; `answer` is typed."""
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen([P2PFED, "join", *map(str, join_args(tmp, url, site, dataset)[:-2])],
                            stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    seen, answered, deadline = b"", False, time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                break
            seen += chunk
        if not answered and b"[y/N]" in seen:
            os.write(master, answer.encode() + b"\n")
            answered = True
        if proc.poll() is not None and not ready:
            break
    os.close(master)
    return proc.wait(timeout=30), seen.decode(errors="replace")


def test_join_at_a_terminal_shows_the_fingerprint_and_asks(tmp_path):
    assert shutil.which(P2PFED), "the p2pfed console script is installed next to this Python"
    url = tmp_path / "shared"
    cli("init", url, *site_args(tmp_path, "a", 1), "--sites", 3)
    code, screen = _join_at_a_terminal(tmp_path, url, "b", 2, "n")
    assert f"Federation fingerprint: {grouped(fed_fp(url))}" in screen
    assert code == 2 and "not joined: the federation fingerprint was not confirmed" in screen
    assert nothing_written(tmp_path, url, "b")
    code, screen = _join_at_a_terminal(tmp_path, url, "c", 3, "y")
    assert code == 0 and "Join request for 'c' published" in screen, screen
    assert (url / "joins" / "c.json").exists()
    assert open_storage(str(url)).exists(layout.join_request("c"))
