"""A real federation without nnU-Net, for the attack, fault, crash and race tests.

Everything is real (site homes and keys, storage, records, envelopes, seals, merges, the
tick's phases in p2pfed.protocol) except nnU-Net: `NumpyTrainer`, a LocalTrainer, plans a
fixed tiny plan and "trains" by adding seeded noise to a three-tensor numpy model. A tick then costs
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
from p2pfed.protocol import Report, Tick, Trained
from p2pfed.protocol.phases import merge

PLANS = {"configurations": {"2d": {"patch_size": [32, 32], "batch_size": 2}}, "plans_name": "nnUNetPlans"}
SHAPES = {"encoder.weight": (4, 3), "encoder.bias": (4,), "head.weight": (2, 4)}


def model(seed) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


def cases_of(site: str) -> int:
    return 5 + int(site[4:])


class NumpyTrainer:
    """A LocalTrainer without nnU-Net: a fixed tiny plan, and 'training' that adds
    seeded noise to a three-tensor numpy model. Attack tests subclass it."""

    plans = PLANS

    def __init__(self, site: str, home: SiteHome):
        self.site, self.home = site, home

    def check_ready(self) -> None:
        pass

    def cases(self) -> int:
        return cases_of(self.site)

    def _foreground(self) -> list[np.ndarray]:
        """Seeded 'foreground intensities' of this site's cases (one channel)."""
        rng = np.random.default_rng(cases_of(self.site))
        return [rng.normal(100 + cases_of(self.site), 20, 64) for _ in range(cases_of(self.site))]

    def summary(self) -> dict:
        """A real FFE summary of the seeded intensities (geometry: 32x32 crops)."""
        from test_membership import DATASET

        cases = [{"spacing": [1.0, 1.0], "shape_after_crop": [32, 32], "relative_size_after_crop": 1.0}
                 for _ in range(cases_of(self.site))]
        info = {**ffe.dataset_info(DATASET), "numTraining": cases_of(self.site)}
        return ffe.site_summary(info, cases, [[ffe.case_moments(v)] for v in self._foreground()])

    def histograms(self, ranges) -> dict:
        (lo, hi), bins = ranges[0], 256
        dense = sum(ffe.case_histogram(v, lo, hi, bins) for v in self._foreground())
        return ffe.histogram_payload(ranges, bins, [dense])

    def plan(self, fingerprint) -> dict:
        """The fixed tiny plan (the real fingerprint is merged, then stands for nnU-Net's planning)."""
        return self.plans

    def initial_weights(self):
        return model(0)

    def train(self, r, base) -> Trained:
        start = base if base is not None else model(cases_of(self.site))
        return Trained(trained(start, self.site, r), cases_of(self.site), r - 1, {})

    def export_final(self, weights):
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

    def tick(self, site: str, trainer: type = NumpyTrainer, **options) -> Tick:
        """A site's tick with a fresh, verified view of the federation."""
        home, config, fed = node.open_site(self.home, site, cached=True)
        return Tick(home, config, fed, trainer=trainer(site, home), **options)

    def run(self, site: str, trainer: type = NumpyTrainer, **options) -> Report:
        return self.tick(site, trainer, **options).run()

    def run_all(self, trainers: dict | None = None, sweeps: int = 12) -> None:
        """Tick every site round-robin until all have finished."""
        for _ in range(sweeps):
            if all([self.run(s, (trainers or {}).get(s, NumpyTrainer)).finished for s in self.sites]):
                return
        raise AssertionError(f"federation not finished after {sweeps} sweeps")

    def prepare(self, stop_after: str = "plan", sweeps: int = 3) -> None:
        """Tick every site round-robin, each stopping after `stop_after` (the FFE
        exchange takes three sweeps: summaries, histograms, plans)."""
        for _ in range(sweeps):
            for s in self.sites:
                self.run(s, stop_after=stop_after)

    def remerge(self, site: str, r: int):
        """Merge round r again as `site`, as a site that has not seen it yet would: from
        the shared storage only (its merge, its copy of the seal and its checks dropped).
        Returns (weights, model hash)."""
        tick = self.tick(site)
        shutil.rmtree(tick.home.work("merged", f"{r:05d}"))
        (tick.home.work("seals") / f"{r:05d}.json").unlink(missing_ok=True)
        tick.save(unconfirmed={}, merged_upto=min(tick.state.get("merged_upto", r), r - 1))
        merge.merge_round(tick, r)
        return merge.merged_weights(tick, r)

    def merged_record(self, site: str, r: int) -> dict:
        return json.loads((self.home / "sites" / site / "work" / "merged" / f"{r:05d}" / "merged.json").read_text())

    def path(self, key: str) -> Path:
        """The file behind a key (local storage only): what a storage operator edits."""
        return Path(self.url) / key


def make(root: Path, url: str | None = None, n: int = 3, endpoint: str | None = None, **settings) -> Fed:
    """A federation of n admitted sites with cheap nnU-Net raw datasets (no images)."""
    from test_membership import DATASET

    url = url or str(root / "shared")
    storage = open_storage(url, endpoint)
    settings = Settings(**{"configuration": "2d", "rounds": 2, "sites": n, "final_validation": False, **settings})
    ids = [Identity.generate(f"site{i}") for i in range(n)]
    schema = {k: v for k, v in ffe.dataset_info(DATASET).items() if k != "numTraining"}
    fedmod.create(storage, ids[0], settings, schema)
    fed = Fed(root, url, [ident.site for ident in ids], endpoint)
    for ident in ids[1:]:
        fedmod.request_join(storage, fedmod.load(storage), ident)
    for i, ident in enumerate(ids[1:], 1):
        admit(storage, ident, ids[:i])
    for ident in ids:
        site_home(fed, ident)
    return fed


def site_home(fed: Fed, ident: Identity) -> None:
    """The site home and raw dataset of `ident` (dataset id: 1 + the number in its name)."""
    from test_membership import raw_dataset

    shared = fedmod.load(fed.storage)
    i, folder = int(ident.site[4:]) + 1, fed.root / ident.site
    config = SiteConfig(site=ident.site, storage=fed.storage.url, federation=shared.id,
                        genesis_sha256=shared.genesis_sha256, dataset=str(i),
                        nnunet_raw=str(raw_dataset(folder / "raw", i)), nnunet_preprocessed=str(folder / "pre"),
                        nnunet_results=str(folder / "res"), endpoint_url=fed.endpoint)
    SiteHome(fed.home, ident.site).create(ident, config)


def raw_dataset_for(fed: Fed, site: str) -> Path:
    """The nnU-Net raw folder of `site` (created: dataset id 1 + the number in its name)."""
    from test_membership import raw_dataset

    return raw_dataset(fed.root / site / "raw", int(site[4:]) + 1)


def join(fed: Fed, site: str) -> Identity:
    """A new site (siteN) asks to join: keys, home and join request, as `p2pfed join` makes them."""
    ident = Identity.generate(site)
    fedmod.request_join(fed.storage, fedmod.load(fed.storage), ident)
    site_home(fed, ident)
    fed.sites.append(site)
    return ident


def admit(storage, ident: Identity, members: list[Identity]) -> None:
    """Members approve `ident`'s admission in name order until it is in force (a majority)."""
    for member in members:
        outcome = fedmod.admit(fedmod.load(storage), ident.site, member, ident.public().fingerprint())
        if outcome.in_force:
            return
    raise AssertionError(f"{ident.site} not admitted by {[m.site for m in members]}")


def keys(fed: Fed) -> list[str]:
    return [k for k in fed.storage.list_prefix("") if not k.startswith("probe/")]


def main(home: str, site: str) -> None:
    with SiteHome(home, site).lock():
        home_, config, fed = node.open_site(home, site, cached=True)
        report = Tick(home_, config, fed, trainer=NumpyTrainer(site, home_)).run()
    print(json.dumps(report.to_json()))


if __name__ == "__main__":
    main(*sys.argv[1:3])
