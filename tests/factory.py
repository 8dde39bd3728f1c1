"""A real federation without nnU-Net, for the attack, fault, crash and race tests.

Everything is real (site homes and keys, storage, records, envelopes, seals, merges, the
tick's phases in p2pfed.tick.Tick) except nnU-Net: `NumpyTick` plans a fixed tiny plan
and "trains" by adding seeded noise to a three-tensor numpy model. A tick then costs
milliseconds, so tests can tamper with every object and run the protocol again.

Run as a script, it is one tick in a fresh process, as cron runs it (the crash tests
kill it): `python tests/factory.py HOME SITE` prints the tick's JSON report."""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from p2pfed import federation as fedmod
from p2pfed import ffe, node
from p2pfed.crypto import Identity
from p2pfed.federation import Settings
from p2pfed.site import SiteConfig, SiteHome
from p2pfed.storage import open_storage
from p2pfed.tick import Report, Tick

PLANS = {"configurations": {"2d": {"patch_size": [32, 32], "batch_size": 2}}, "plans_name": "nnUNetPlans"}
SHAPES = {"encoder.weight": (4, 3), "encoder.bias": (4,), "head.weight": (2, 4)}


def model(seed) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


def cases_of(site: str) -> int:
    return 5 + int(site[4:])


class NumpyTick(Tick):
    """The real tick with nnU-Net's parts (fingerprint, planning, training, export) replaced."""

    plans = PLANS

    def _publish_summary(self) -> None:
        pass  # intensity statistics need nnU-Net; the plan below stands for their outcome

    def _ffe_plan(self) -> dict:
        return self.plans

    _asym_plan = _ffe_plan

    def _initial_weights(self):
        return model(0)

    def _train(self, r, base_weights, base):
        start = base_weights if base_weights is not None else model(cases_of(self.site))
        return trained(start, self.site, r), {"round": r, "base": base, "cases": cases_of(self.site),
                                              "epoch": r - 1, "metrics": {}}

    def _export_final(self, weights):
        return self.home.work("final"), None


def trained(start: dict, site: str, r: int) -> dict[str, np.ndarray]:
    """Deterministic 'training': the same site and round give the same bits in every run."""
    rng = np.random.default_rng([r, cases_of(site)])
    return {k: (v + 0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in start.items()}


@dataclass
class Fed:
    """A federation of sites site0..siteN-1 sharing one home root (as the simulation does)."""

    root: Path
    url: str
    sites: list[str]
    endpoint: str | None = None

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def storage(self):
        return open_storage(self.url, self.endpoint)

    def tick(self, site: str, cls: type[Tick] = NumpyTick) -> Tick:
        """A site's tick with a fresh, verified view of the federation (participants known)."""
        home, config, fed = node.open_site(self.home, site)
        tick = cls(home, config, fed)
        seal = tick.fingerprint_seal()
        if seal is not None:
            tick.participants = seal["participants"]
        return tick

    def run(self, site: str, cls: type[Tick] = NumpyTick) -> Report:
        return self.tick(site, cls).run()

    def run_all(self, classes: dict | None = None, sweeps: int = 12) -> None:
        """Tick every site round-robin until all have finished."""
        for _ in range(sweeps):
            if all([self.run(s, (classes or {}).get(s, NumpyTick)).finished for s in self.sites]):
                return
        raise AssertionError(f"federation not finished after {sweeps} sweeps")

    def remerge(self, site: str, r: int):
        """Merge round r again as `site`, from the shared storage only (cache dropped)."""
        tick = self.tick(site)
        shutil.rmtree(tick.home.work("merged", f"{r:05d}"))
        return tick.merged(r)

    def merged_record(self, site: str, r: int) -> dict:
        return json.loads((self.home / "sites" / site / "work" / "merged" / f"{r:05d}" / "merged.json").read_text())

    def path(self, key: str) -> Path:
        """The file behind a key (local storage only): what a storage operator edits."""
        return Path(self.url) / key


def make(root: Path, url: str | None = None, n: int = 3, endpoint: str | None = None, **settings) -> Fed:
    """A federation of n admitted sites with cheap nnU-Net raw datasets (no images)."""
    from test_membership import DATASET, raw_dataset

    url = url or str(root / "shared")
    storage = open_storage(url, endpoint)
    settings = Settings(**{"configuration": "2d", "rounds": 2, "sites": n, "final_validation": False, **settings})
    ids = [Identity.generate(f"site{i}") for i in range(n)]
    schema = {k: v for k, v in ffe.dataset_info(DATASET).items() if k != "numTraining"}
    fed_id, genesis = fedmod.create(storage, ids[0], settings, schema)
    fed = fedmod.load(storage)
    for ident in ids[1:]:
        fedmod.request_join(storage, fed, ident)
    fed = fedmod.load(storage)
    for ident in ids[1:]:
        fedmod.admit(fed, ident.site, ids[0], ident.public().fingerprint(), started=False)
    for i, ident in enumerate(ids, 1):
        folder = root / ident.site
        config = SiteConfig(site=ident.site, storage=storage.url, federation=fed_id, genesis_sha256=genesis,
                            dataset=str(i), nnunet_raw=str(raw_dataset(folder / "raw", i)),
                            nnunet_preprocessed=str(folder / "pre"), nnunet_results=str(folder / "res"),
                            endpoint_url=endpoint)
        SiteHome(root / "home", ident.site).create(ident, config)
    return Fed(root, url, [ident.site for ident in ids], endpoint)


def keys(fed: Fed) -> list[str]:
    return [k for k in fed.storage.list_prefix("") if not k.startswith("probe/")]


def main(home: str, site: str) -> None:
    with SiteHome(home, site).lock():
        report = NumpyTick(*node.open_site(home, site)).run()
    print(json.dumps(report.to_json()))


if __name__ == "__main__":
    main(*sys.argv[1:3])
