"""Run README's "Using it at a hospital" walkthrough as written, on this machine, against a
loopback S3-protocol server (tests/s3_server.py); fail on the first command that fails.

    python examples/walkthrough.py [--workdir DIR]

The commands are the fenced blocks after a `<!-- walkthrough ... -->` comment in README.md,
in order. Each command runs with bash at the site its `--site` names (a command without
`--site` at the site of the command before it; before any, at every site), in that site's
own HOME (so its own ~/.p2pfed and ~/.aws) and working folder, with PATH = this Python's
bin folder, /usr/bin, /bin and nothing else from this environment (PYTHONPATH excepted, so
that a checkout under test is used). `export` lines are kept for the site's later commands.
The crontab block's lines are run as cron runs them: `sh -c LINE` with only HOME, LOGNAME,
SHELL and PATH=/usr/bin:/bin, every site in turn (uka and ukb the first line, ukc the
env-file line, each with its own `--site`) until each site's cron.log says "federation
finished".

What it substitutes, and nothing else:
  /data/                    each site's folder
  https://s3.example.org    the loopback server's URL
  s3://bucket/              a fresh bucket on it
  /opt/p2pfed/.venv/bin/    this Python's bin folder
  --fingerprint '...'       what the admitted site's `join` printed
  --federation '...'        the federation fingerprint the founder's `init` printed
  --rounds 1000             --rounds 1 --iterations-per-epoch 2 --val-iterations 1
                            --no-final-validation (documented flags: a CPU-sized run)
What it provides, as a hospital would: each site's dataset (synthetic 3-D, p2pfed.synthetic)
under nnUNet_raw with the id its command names, a credentials profile `hospital` in
~/.aws, ~/.p2pfed/aws.env for the env-file line, and test images in ./imagesTs.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHRINK = "--rounds 1 --iterations-per-epoch 2 --val-iterations 1 --no-final-validation"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
MAX_SWEEPS = 40


class Failed(Exception):
    pass


def blocks(readme: str) -> list[tuple[str, list[str]]]:
    """(kind, lines) of every fenced block after a walkthrough comment; kind is 'crontab' or
    'commands'. Comments and blank lines dropped, continuation lines joined."""
    found = []
    for match in re.finditer(r"<!-- walkthrough(.*?)-->\s*```\w*\n(.*?)```", readme, re.S):
        text = match.group(2).replace("\\\n", " ")
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        found.append(("crontab" if match.group(1).strip(" :") == "crontab" else "commands", lines))
    if not found:
        raise Failed("README.md has no <!-- walkthrough --> blocks")
    return found


def site_of(command: str) -> str | None:
    match = re.search(r"--site (\S+)", command)
    return match.group(1) if match else None


class Walkthrough:
    def __init__(self, workdir: Path, endpoint: str, bucket: str):
        self.workdir, self.endpoint, self.bucket = workdir, endpoint, bucket
        self.exports: dict[str, list[str]] = {}
        self.fingerprints: dict[str, str] = {}
        self.federation = ""  # the federation fingerprint, "read by phone" to the joiners

    def dir(self, site: str) -> Path:
        return self.workdir / site

    def substitute(self, command: str, site: str) -> str:
        command = (command.replace("/data/", f"{self.dir(site)}/data/")
                   .replace("https://s3.example.org", self.endpoint)
                   .replace("s3://bucket/", f"s3://{self.bucket}/")
                   .replace("/opt/p2pfed/.venv/bin/", f"{BIN}/")
                   .replace("--rounds 1000", SHRINK))
        if command.startswith("p2pfed admit "):
            admitted = command.split()[2]
            command = re.sub(r"--fingerprint '[^']*'", f"--fingerprint '{self.fingerprints[admitted]}'", command)
        command = re.sub(r"--federation '[^']*'", f"--federation '{self.federation}'", command)
        return command

    def env(self, site: str, path: str) -> dict[str, str]:
        env = {"HOME": str(self.dir(site) / "home"), "LOGNAME": site, "PATH": path}
        if os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        return env

    def provide(self, site: str, index: int, dataset: int) -> None:
        """What the hospital has before the walkthrough: data, credentials, test images."""
        from p2pfed.synthetic import make_site

        home = self.dir(site) / "home"
        folder = make_site(self.dir(site) / "data" / "nnUNet_raw", dataset, index, n_train=5, n_test=1, dim=3,
                           name=site.upper())
        shutil.copytree(folder / "imagesTs", self.dir(site) / "work" / "imagesTs")
        aws = home / ".aws"
        aws.mkdir(parents=True)
        keys = "".join(f"{k} = {v}\n" for k, v in CREDENTIALS.items())
        (aws / "credentials").write_text(f"[hospital]\n{keys}")
        (aws / "config").write_text("[profile hospital]\nregion = us-east-1\n")
        (home / ".p2pfed").mkdir(mode=0o700)
        env_file = home / ".p2pfed" / "aws.env"
        env_file.write_text("".join(f"{k.upper()}={v}\n" for k, v in CREDENTIALS.items()))
        for f in (aws / "credentials", env_file):
            f.chmod(0o600)

    def shell(self, site: str, command: str) -> str:
        """Run one command at `site` with bash; return its output; raise Failed if it fails."""
        command = self.substitute(command, site)
        if command.startswith("export "):
            self.exports.setdefault(site, []).append(command)
        script = "\n".join(["set -euo pipefail", *self.exports.get(site, []), command])
        started = time.monotonic()
        proc = subprocess.run(["bash", "-c", script], cwd=self.dir(site) / "work", capture_output=True, text=True,
                              env=self.env(site, f"{BIN}:/usr/bin:/bin"))
        output = proc.stdout + proc.stderr
        print(f"[{site}] $ {command}  ({time.monotonic() - started:.0f} s, exit {proc.returncode})", flush=True)
        print("".join(f"    {line}\n" for line in output.splitlines()[-8:]), end="", flush=True)
        if proc.returncode != 0:
            raise Failed(f"[{site}] `{command}` exited {proc.returncode}")
        return output

    def cron(self, crontab: list[str], sites: list[str]) -> None:
        """Every site's crontab line, as cron runs it, in turn until every site has finished."""
        lines = {site: re.sub(r"--site \S+", f"--site {site}", crontab[min(i // 2, len(crontab) - 1)])
                 for i, site in enumerate(sites)}
        lines = {site: self.substitute(line.split(None, 5)[5], site) for site, line in lines.items()}
        for site, line in lines.items():
            print(f"[{site}] crontab: {line}")
        finished: set[str] = set()
        for _ in range(MAX_SWEEPS):
            for site in sites:
                if site not in finished and "federation finished" in self.cron_tick(site, lines[site]):
                    finished.add(site)
            if len(finished) == len(sites):
                return
        raise Failed(f"not finished after {MAX_SWEEPS} cron sweeps: {sorted(set(sites) - finished)}")

    def cron_tick(self, site: str, line: str) -> str:
        """Run a crontab command as cron does; return the last line of the site's cron.log."""
        started = time.monotonic()
        cron_env = [f"{k}={v}" for k, v in self.env(site, "/usr/bin:/bin").items()] + ["SHELL=/bin/sh"]
        proc = subprocess.run(["env", "-i", *cron_env, "/bin/sh", "-c", line], capture_output=True, text=True)
        log = self.dir(site) / "home" / ".p2pfed" / "cron.log"
        last = (log.read_text().strip().splitlines() or [""])[-1] if log.exists() else ""
        print(f"[{site}] cron tick ({time.monotonic() - started:.0f} s, exit {proc.returncode}): {last}", flush=True)
        if proc.returncode != 0:
            raise Failed(f"[{site}] cron tick exited {proc.returncode}: {proc.stdout}{proc.stderr}{last}")
        return last

    def run(self, readme: str) -> None:
        found = blocks(readme)
        commands = [c for kind, lines in found if kind == "commands" for c in lines]
        setup = [(site_of(c), int(re.search(r"--dataset (\d+)", c).group(1))) for c in commands
                 if c.startswith(("p2pfed init ", "p2pfed join "))]
        sites = [site for site, _ in setup]
        for index, (site, dataset) in enumerate(setup):
            self.provide(site, index, dataset)
        current: str | None = None
        for kind, lines in found:
            if kind == "crontab":
                self.cron(lines, sites)
                continue
            for command in lines:
                current = site_of(command) or current
                for site in [current] if current else sites:
                    output = self.shell(site, command)
                    if command.startswith("p2pfed init "):
                        printed = re.search(r"Federation fingerprint:([0-9a-f\s]+)", output).group(1)
                        self.federation = "".join(printed.split())
                    if command.startswith("p2pfed status ") and "Secure aggregation: on" not in output:
                        raise Failed("the README's 3-site federation did not run with secure aggregation (the default)")
                    if command.startswith("p2pfed join "):  # a narrow console may wrap the groups
                        printed = re.search(r"Key fingerprint:([0-9a-f\s]+)", output).group(1)
                        self.fingerprints[site] = "".join(printed.split())
        predicted = list((self.dir(current) / "work").glob("predictions/*.nii.gz"))
        if not predicted:
            raise Failed(f"no predictions in {self.dir(current) / 'work' / 'predictions'}")


def s3_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "s3_server.py")], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    return proc, f"http://127.0.0.1:{int(proc.stdout.readline())}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="New folder for the sites (default: a temporary one, removed).")
    args = parser.parse_args(argv)
    import boto3

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="p2pfed-walkthrough-"))
    workdir.mkdir(parents=True, exist_ok=True)
    server, endpoint = s3_server()
    started = time.monotonic()
    try:
        bucket = f"hospital-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     **CREDENTIALS).create_bucket(Bucket=bucket)
        Walkthrough(workdir.absolute(), endpoint, bucket).run((ROOT / "README.md").read_text())
    except Failed as exc:
        print(f"walkthrough FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        server.kill()
        server.wait()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"walkthrough OK in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
