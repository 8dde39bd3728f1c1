"""A whole federation on this machine: synthetic sites, a local folder as the shared
storage, each site in its own process with its own home and nnU-Net folders, ticking
round-robin as cron would. Used by `p2pfed simulate`, the tests and the benchmarks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import P2PFedError

TICK_TIMEOUT_S = 1800  # a hung tick must fail the simulation, not block it


@dataclass
class SimSite:
    name: str
    dataset_id: int
    root: Path

    @property
    def folders(self) -> dict[str, Path]:
        return {"raw": self.root / "nnUNet_raw", "preprocessed": self.root / "nnUNet_preprocessed",
                "results": self.root / "nnUNet_results"}


@dataclass
class Simulation:
    workdir: Path
    storage: str
    sites: list[SimSite]
    home: Path
    ticks: int = 0
    log: list[dict] = field(default_factory=list)

    def cli(self, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run `p2pfed ARGS` in a fresh process, as a site's cron job would."""
        cmd = [sys.executable, "-m", "p2pfed.cli.app", *args, "--home", str(self.home)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})},
                              timeout=TICK_TIMEOUT_S)
        if check and proc.returncode != 0:
            raise P2PFedError(f"`p2pfed {' '.join(args)}` exited {proc.returncode}: "
                              f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
        return proc

    def tick(self, site: str, *extra: str) -> dict:
        proc = self.cli("round", "--site", site, "--json", *extra)
        report = json.loads(proc.stdout)
        self.ticks += 1
        self.log.append(report)
        return report

    def status(self, site: str | None = None) -> dict:
        site = site or self.sites[0].name
        return json.loads(self.cli("status", "--site", site, "--json").stdout)


def make_sites(workdir: Path, n_sites: int, *, dim: int = 2, seed: int = 0, n_train=None,
               n_test: int = 2, channels=("CT",), size=None, task: str = "easy") -> list[SimSite]:
    from .synthetic import make_site, site_name, trainable_cases

    sites = []
    for i in range(n_sites):
        site = SimSite(site_name(i), 101 + i, workdir / "sites" / site_name(i))
        n = n_train[i] if isinstance(n_train, (list, tuple)) else n_train if n_train is not None \
            else trainable_cases(i)
        # channels: one tuple for every site, or one per site (asym: CT and MRI sites)
        mine = channels if isinstance(channels[0], str) else channels[i]
        make_site(site.folders["raw"], site.dataset_id, i, n_train=n, n_test=n_test, dim=dim, size=size,
                  seed=seed, channels=mine, task=task)
        sites.append(site)
    return sites


def setup(workdir: str | Path, n_sites: int = 3, *, storage: str | None = None, init_args: list[str] = (),
          dim: int = 2, seed: int = 0, n_train=None, n_test: int = 2, channels=("CT",), size=None,
          task: str = "easy") -> Simulation:
    """Generate the sites and form the federation (init, join, admit with fingerprints)."""
    workdir = Path(workdir).absolute()
    sites = make_sites(workdir, n_sites, dim=dim, seed=seed, n_train=n_train, n_test=n_test, channels=channels,
                       size=size, task=task)
    sim = Simulation(workdir, storage or str(workdir / "shared"), sites, workdir / "home")

    def local(site: SimSite) -> list[str]:
        f = site.folders
        return ["--site", site.name, "--dataset", str(site.dataset_id), "--nnunet-raw", str(f["raw"]),
                "--nnunet-preprocessed", str(f["preprocessed"]), "--nnunet-results", str(f["results"])]

    founder, *others = sites
    created = json.loads(sim.cli("init", sim.storage, *local(founder), "--sites", str(n_sites), *init_args,
                                 "--json").stdout)
    members = [founder]
    for site in others:  # the founder "reads" the federation fingerprint to each site
        joined = json.loads(sim.cli("join", sim.storage, *local(site), "--federation",
                                    created["federation_fingerprint"], "--json").stdout)
        for member in members:  # a majority of the members must approve; here all do
            sim.cli("admit", site.name, "--site", member.name, "--fingerprint", joined["fingerprint"])
        members.append(site)
    return sim


def run_until_done(sim: Simulation, say: Callable[[str], None] = print, max_ticks: int = 500,
                   order: Callable[[int], list[SimSite]] | None = None) -> dict:
    """Tick every site round-robin until all have finished; returns the final status."""
    finished: set[str] = set()
    sweep = 0
    while len(finished) < len(sim.sites):
        sweep += 1
        for site in (order(sweep) if order else sim.sites):
            if site.name in finished:
                continue
            started = time.monotonic()
            report = sim.tick(site.name)
            did = "; ".join(report["actions"]) or report["message"]
            say(f"[{site.name}] {did} ({time.monotonic() - started:.0f} s)")
            if report["finished"]:
                finished.add(site.name)
            if sim.ticks >= max_ticks:
                raise P2PFedError(f"federation did not finish in {max_ticks} ticks")
    return sim.status()
