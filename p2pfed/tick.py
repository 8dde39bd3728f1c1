"""`p2pfed round --site NAME`: one idempotent tick of a site (docs/design.md, "Round protocol").

A tick reads the shared storage and the site's local state, does every next step it
can, and returns when it must wait for other sites (or when the federation is done).
Every step checks for its own output first, so a tick killed anywhere is simply
re-run. The phases: fingerprint (summaries, sealed membership), plan (FFE histograms,
nnU-Net planning, plan agreement), rounds (initial model, train, upload, seal, merge),
final (apply the final merge, nnU-Net results folder, validation metrics).

Waiting paths touch neither torch nor nnU-Net: an idle tick costs a few storage reads."""
from __future__ import annotations

import json
import math
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import crypto, ffe, layout
from .dataset import check_trainable
from .faults import crash_point
from .errors import FederationHalted, IntegrityError, SetupError
from .federation import Federation, check_versions
from .objects import put_envelope, put_record, read_envelope, read_record
from .round_merge import RoundMerge, hash_json
from .site import SiteConfig, SiteHome, atomic_write

CLOCK_SKEW_S = 600  # a seal's deadline is the sealer's clock; others allow this much skew


@dataclass
class Report:
    """What a tick did and what it waits for (the `--json` document of `p2pfed round`)."""

    site: str
    phase: str = ""
    round: int | None = None
    actions: list[str] = field(default_factory=list)
    waiting_for: list[str] = field(default_factory=list)
    deadline: int | None = None
    message: str = ""
    finished: bool = False

    def to_json(self) -> dict:
        return {"site": self.site, "phase": self.phase, "round": self.round, "actions": self.actions,
                "action": self.actions[-1] if self.actions else "wait" if not self.finished else "none",
                "waiting_for": self.waiting_for, "deadline": self.deadline, "message": self.message,
                "finished": self.finished}


class Wait(Exception):
    """Raised by a step that cannot go on until other sites act."""

    def __init__(self, phase: str, message: str, waiting_for=(), deadline=None, rnd=None):
        super().__init__(message)
        self.phase, self.message, self.waiting_for = phase, message, list(waiting_for)
        self.deadline, self.round = deadline, rnd


def _finite(obj):
    """NaN/inf metrics (an empty validation batch) become null: JSON has no NaN."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


class Tick(RoundMerge):
    def __init__(self, home: SiteHome, config: SiteConfig, fed: Federation,
                 say: Callable[[str], None] = lambda s: None, progress=None, until: str | None = None):
        self.home, self.config, self.fed, self.st = home, config, fed, fed.storage
        self.site, self.s = config.site, fed.settings
        self.me = home.identity()
        self.say, self.progress = say, progress
        self.state = home.state()
        self.report = Report(config.site)
        self._nnunet_ready = False
        self.until = until  # "plan": stop once planned and agreed (prepare before training)

    # ------------------------------------------------------------------- driver
    def run(self) -> Report:
        if self.site not in self.fed.members:
            self.report.phase = "joining"
            self.report.message = f"waiting for a member to admit {self.site!r} (p2pfed admit {self.site} ...)"
            self.report.waiting_for = sorted(self.fed.members)
            return self.report
        if self.state.get("finished"):
            return self._finished()
        check_versions(self.fed)  # before this site shares or merges anything
        try:
            self.participants = self.fingerprint_phase()
            self.plan_phase()
            if self.until == "plan":
                raise Wait("plan", "planned and preprocessed; stopping before training as asked (--until plan)")
            self.rounds_phase()
            self.final_phase()
            return self._finished()
        except Wait as w:
            self.report.phase, self.report.message = w.phase, w.message
            self.report.waiting_for, self.report.deadline, self.report.round = w.waiting_for, w.deadline, w.round
            return self.report

    def _finished(self) -> Report:
        self.report.phase, self.report.finished = "done", True
        self.report.round = self.s.rounds
        self.report.message = "federation finished; the final model is in " + str(self.state.get("results_folder", "nnUNet_results"))
        return self.report

    def _did(self, action: str) -> None:
        self.report.actions.append(action)
        self.say(action)

    def _save(self, **changes) -> None:
        self.state.update(changes)
        self.home.save_state(self.state)

    # ------------------------------------------------------------------- helpers
    def _put_once(self, key: str, kind: str, payload: bytes, **binding) -> str:
        """Create-only envelope write that tolerates our own earlier write of the same payload
        (a tick killed after the write): the stored plaintext must be what we meant to write.
        Returns the sha256 of the stored envelope, which commits list."""
        if self.st.exists(key):
            blob = self.st.get(key)
            header, plain = read_envelope(self.fed, key, kind, self.me, author=self.site, blob=blob)
            if plain != payload:
                raise SetupError(f"{key} already holds different content from this site",
                                 "this site's local data changed after it was shared; restore it")
        else:
            blob = put_envelope(self.fed, key, kind, payload, self.me, recipients=self._recipients(), **binding)
        return crypto.sha256_hex(blob)

    def _recipients(self):
        parts = getattr(self, "participants", None)
        return {s: self.fed.members[s] for s in parts} if parts else self.fed.members

    def _record_once(self, key: str, kind: str, body: dict) -> dict:
        """Write a record unless an earlier (killed) tick did; then read what is stored."""
        if not self.st.exists(key):
            try:
                put_record(self.fed, key, kind, body, self.me)
            except FileExistsError:
                pass
        return read_record(self.fed, key, kind, self.site)

    def _open_json(self, key: str, kind: str, author: str, **binding) -> dict:
        return json.loads(read_envelope(self.fed, key, kind, self.me, author=author, **binding)[1])

    def _nnunet(self):
        """Point nnU-Net at this site's folders; imported only on paths that do work."""
        from .nnunet import activate

        if not self._nnunet_ready:
            activate(self.config.nnunet_raw, self.config.nnunet_preprocessed, self.config.nnunet_results)
            self._nnunet_ready = True

    def _spec(self):
        from .nnunet.train import TrainSpec

        self._nnunet()
        return TrainSpec(dataset=self.config.dataset, configuration=self.s.configuration,
                         raw=Path(self.config.nnunet_raw), preprocessed=Path(self.config.nnunet_preprocessed),
                         results=Path(self.config.nnunet_results), fold=self.s.fold, trainer=self.s.trainer,
                         plans=self.s.plans_identifier, device=self.config.device,
                         iterations_per_epoch=self.s.iterations_per_epoch, val_iterations=self.s.val_iterations,
                         total_epochs=self.s.total_epochs)

    # ------------------------------------------------------------------- fingerprint phase
    def fingerprint_seal(self) -> dict | None:
        if not self.st.exists(layout.FINGERPRINT_SEAL):
            return None
        body = read_record(self.fed, layout.FINGERPRINT_SEAL, "fingerprint-seal")
        parts = body.get("participants")
        if not isinstance(parts, list) or not set(parts) <= set(self.fed.members) or len(parts) < self.s.sites:
            raise IntegrityError(f"{layout.FINGERPRINT_SEAL}: participants {parts} are not {self.s.sites}+ members")
        return body

    def fingerprint_phase(self) -> list[str]:
        """Fix the participants once `sites` members are in (the start seal), then publish
        this site's summary, encrypted for exactly those participants (FFE only: asym
        mode shares no intensity statistics)."""
        seal = self.fingerprint_seal()
        if seal is None:
            members = sorted(self.fed.members)
            if len(members) < self.s.sites:
                more = self.s.sites - len(members)
                raise Wait("joining", f"waiting for sites to join: {len(members)}/{self.s.sites} members",
                           [f"{more} more site(s) to join"] + [f"{p} (pending admission)" for p in sorted(self.fed.pending)])
            self._try_create(layout.FINGERPRINT_SEAL, "fingerprint-seal",
                             {"participants": members, "sealed_at": int(time.time())})
            seal = self.fingerprint_seal()
        parts = seal["participants"]
        if self.site not in parts:
            raise SetupError(f"site {self.site!r} joined after the federation started (participants: {', '.join(parts)})",
                             "it cannot take part in this federation; start a new one to include it")
        self.participants = parts
        if self.state.get("plan_sha256") is None:  # before sharing or planning: the data must be usable
            check_trainable(self.config.nnunet_raw, self.config.nnunet_preprocessed, self.config.dataset, self.s.fold)
        if self.s.mode == "ffe" and not self.st.exists(layout.summary(self.site)):
            self._publish_summary()
        return parts

    def _try_create(self, key: str, kind: str, body: dict) -> bool:
        """Create-only write of a seal; False if another site sealed first (we adopt theirs)."""
        try:
            put_record(self.fed, key, kind, body, self.me)
        except FileExistsError:
            return False
        self._did(f"sealed {key}")
        return True

    def _publish_summary(self) -> None:
        from .dataset import dataset_json
        from .node import check_schema

        check_schema(self.fed, self.site, ffe.dataset_info(dataset_json(self.config.nnunet_raw, self.config.dataset)))
        self._nnunet()
        from .nnunet.fingerprint import local_summary

        self.say("computing the local fingerprint summary")
        summary = local_summary(self.config.dataset)
        self._put_once(layout.summary(self.site), "summary", crypto.canonical_json(summary))
        self._did("published fingerprint summary")

    def summaries(self) -> dict[str, dict]:
        return {s: self._open_json(layout.summary(s), "summary", s) for s in self.participants}

    # ------------------------------------------------------------------- plan phase
    def plan_phase(self) -> None:
        if self.state.get("plan_sha256") is None:
            plans = self._ffe_plan() if self.s.mode == "ffe" else self._asym_plan()
            summary = ffe.plan_summary(plans)
            self._put_once(layout.plan(self.site), "plan", crypto.canonical_json(summary))
            self._save(plan_sha256=hash_json(summary))
        if not self.st.exists(layout.plan_hash(self.site)):
            self._record_once(layout.plan_hash(self.site), "plan-hash", {"plan_sha256": self.state["plan_sha256"]})
            self._did("published plan hash")
        if self.s.mode == "ffe":
            self._check_plans_agree()

    def _ffe_plan(self) -> dict:
        missing = [s for s in self.participants if not self.st.exists(layout.summary(s))]
        if missing:
            raise Wait("fingerprint", "waiting for fingerprint summaries", missing)
        summaries = self.summaries()
        ffe.merge_dataset_info({s: summaries[s]["dataset"] for s in summaries})  # names site and field
        if not self.st.exists(layout.histogram(self.site)):
            self._nnunet()
            from .nnunet.fingerprint import local_histograms

            self.say("computing local histograms over the federation's intensity range")
            hist = local_histograms(self.config.dataset, ffe.global_ranges(summaries))
            self._put_once(layout.histogram(self.site), "histogram", crypto.canonical_json(hist))
            self._did("published histograms")
        missing = [s for s in self.participants if not self.st.exists(layout.histogram(s))]
        if missing:
            raise Wait("fingerprint", "waiting for histograms", missing)
        histograms = {s: self._open_json(layout.histogram(s), "histogram", s) for s in self.participants}
        fingerprint = ffe.merge_fingerprint(summaries, histograms)
        return self._plan(fingerprint)

    def _asym_plan(self) -> dict:
        self._nnunet()
        from .nnunet.fingerprint import local_fingerprint

        self.say("extracting the local nnU-Net fingerprint (asym mode)")
        return self._plan(local_fingerprint(self.config.dataset))

    def _plan(self, fingerprint: dict) -> dict:
        self._nnunet()
        from .nnunet.fingerprint import plan_and_preprocess, write_fingerprint

        write_fingerprint(self.config.dataset, fingerprint)
        self.say(f"planning and preprocessing ({self.s.configuration})")
        plans = plan_and_preprocess(self.config.dataset, self.s.planner, self.s.gpu_memory_target,
                                    self.s.plans_identifier, self.s.configuration)
        self._did("planned and preprocessed")
        return plans

    def _check_plans_agree(self) -> None:
        missing = [s for s in self.participants if not self.st.exists(layout.plan_hash(s))]
        if missing:
            raise Wait("plan", "waiting for the other sites' plans", missing)
        hashes = {s: read_record(self.fed, layout.plan_hash(s), "plan-hash", s)["plan_sha256"]
                  for s in self.participants}
        if len(set(hashes.values())) > 1:
            ref = self.site
            plans = {s: self._open_json(layout.plan(s), "plan", s) for s in self.participants}
            for s in self.participants:
                if hashes[s] != hashes[ref]:
                    fields = ffe.plan_diff(plans[ref], plans[s])
                    raise FederationHalted(f"plans of {ref} and {s} differ in: {', '.join(fields[:6]) or 'hash only'}",
                                           "all sites must run the same p2pfed and nnunetv2 versions on the same fingerprint")

    # ------------------------------------------------------------------- rounds
    def sealed(self, r: int) -> dict | None:
        key = layout.seal(r)
        if not self.st.exists(key):
            return None
        body = read_record(self.fed, key, "seal")
        self._check_seal(r, body)
        return body

    def _check_seal(self, r: int, body: dict) -> None:
        contrib = body.get("contributions")
        key = layout.seal(r)
        if body.get("round") != r or not isinstance(contrib, dict) or not contrib:
            raise IntegrityError(f"{key}: malformed seal")
        if not set(contrib) <= set(self.participants):
            raise IntegrityError(f"{key}: lists non-participants {sorted(set(contrib) - set(self.participants))}")
        if r == 0:
            if list(contrib) != [min(self.participants)]:
                raise IntegrityError(f"{key}: the initial model must come from {min(self.participants)}")
        elif len(contrib) < len(self.participants):
            opened = int(body.get("opened_at", 0))
            if len(contrib) < self.s.effective_quorum or \
                    int(body.get("sealed_at", 0)) + CLOCK_SKEW_S < opened + self.s.deadline_s:
                raise IntegrityError(f"{key}: sealed with {len(contrib)} contributions before the deadline")
        for site, sha in contrib.items():
            data = self.st.get(layout.commit(r, site)) if self.st.exists(layout.commit(r, site)) else None
            if data is None or crypto.sha256_hex(data) != sha:
                raise IntegrityError(f"{layout.commit(r, site)}: missing or not the commit the seal lists")

    def current_round(self) -> int:
        """The first round without a seal (scanning up from what this site last saw)."""
        r = max(self.state.get("round", 1), 1)
        while r <= self.s.rounds and self.st.exists(layout.seal(r)):
            r += 1
        return r

    def rounds_phase(self) -> None:
        if self.s.mode == "ffe":
            self._initial_model()
        while True:
            r = self.current_round()
            if r != self.state.get("round"):
                self._save(round=r)
            if r > self.s.rounds:
                return
            self.report.round = r
            if not self.st.exists(layout.commit(r, self.site)):
                self._contribute(r)
            if self.sealed(r) is None and not self._try_seal(r):
                return self._wait_round(r)

    def _initial_model(self) -> None:
        init_site = min(self.participants)
        if self.st.exists(layout.seal(0)):
            return
        if self.site != init_site:
            raise Wait("round", f"waiting for the initial model from {init_site}", [init_site], rnd=0)
        self.say("building the initial model")
        self._upload(0, self._initial_weights(), {"cases": 1, "metrics": {}}, base=None)
        body = {"round": 0, "contributions": {self.site: crypto.sha256_hex(self.st.get(layout.commit(0, self.site)))},
                "reason": "initial", "opened_at": int(time.time()), "sealed_at": int(time.time())}
        self._try_create(layout.seal(0), "seal", body)

    def _initial_weights(self):
        from .nnunet.train import initial_weights

        return initial_weights(self._spec())

    def _contribute(self, r: int) -> None:
        base_weights, base = self.base_model(r)
        cached = self.home.work("rounds", f"{r:05d}")
        meta_file = cached / "meta.json"
        if meta_file.exists() and json.loads(meta_file.read_text()).get("base") == base:
            from .shards import from_shards

            blobs = [p.read_bytes() for p in sorted(cached.glob("*.safetensors"))]
            weights, meta = from_shards(blobs, site=self.site), json.loads(meta_file.read_text())
        else:
            weights, meta = self._train(r, base_weights, base)
        if self.st.exists(layout.seal(r)):
            self._did(f"round {r} was sealed without this site; catching up")
            return
        self._upload(r, weights, meta, base)

    def _train(self, r: int, base_weights, base: str | None):
        from .nnunet.train import train_round
        from .shards import to_shards

        self._check_checkpoint()
        spec = self._spec()
        start = (r - 1) * self.s.epochs_per_round
        self.say(f"round {r}/{self.s.rounds}: training {self.s.epochs_per_round} epoch(s) from epoch {start}")
        result = train_round(spec, base_weights, self.s.epochs_per_round, progress=self._train_progress, start_epoch=start)
        meta = {"round": r, "base": base, "cases": result.num_train_cases, "epoch": result.epoch,
                "metrics": {"train_loss": result.train_loss, "val_loss": result.val_loss,
                            "pseudo_dice": result.pseudo_dice, "pseudo_dice_per_class": list(result.pseudo_dice_per_class),
                            "ema_pseudo_dice": result.ema_pseudo_dice, "learning_rate": result.learning_rate}}
        meta["metrics"] = _finite(meta["metrics"])
        cached = self.home.work("rounds", f"{r:05d}")
        for old in cached.glob("*"):
            old.unlink()
        for i, blob in enumerate(to_shards(result.weights, site=self.site)):
            atomic_write(cached / f"{i:05d}.safetensors", blob)
        atomic_write(cached / "meta.json", json.dumps(meta).encode())  # last: marks the cache complete
        self._did(f"trained round {r}")
        return result.weights, meta

    def _check_checkpoint(self) -> None:
        """nnU-Net resumes from checkpoint_latest.pth (a torch zip); a truncated one (disk
        full, a copy cut short) would end in a traceback deep inside torch.load."""
        from .dataset import dataset_name

        path = (Path(self.config.nnunet_results) / dataset_name(self.config.nnunet_raw, self.config.dataset)
                / f"{self.s.trainer}__{self.s.plans_identifier}__{self.s.configuration}"
                / f"fold_{self.s.fold}" / "checkpoint_latest.pth")
        if not path.exists():
            return
        try:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError):
            damaged = path.name
        if damaged is not None:
            raise SetupError(f"the local nnU-Net checkpoint {path} is corrupt (truncated or damaged)",
                             "restore it from a backup, or delete it: training then resumes from the "
                             "federation's last merge with a fresh optimizer state")

    def _train_progress(self, epoch: int, iteration: int, total: int) -> None:
        crash_point("train")
        if self.progress:
            self.progress(epoch, iteration, total)

    def _upload(self, r: int, weights, meta: dict, base: str | None) -> None:
        """Shards, then meta, then the commit: a commit is only ever written last."""
        from .shards import to_shards

        shards = []
        blobs = to_shards(weights, site=self.site)
        for i, blob in enumerate(blobs):
            plain_sha = crypto.sha256_hex(blob)
            key = layout.shard(r, self.site, plain_sha)
            shards.append({"key": key, "sha256": self._put_once(key, "shard", blob, round=r)})
            crash_point("upload")
            if self.progress:
                self.progress("upload", i + 1, len(blobs))
        meta = {**meta, "round": r, "base": base}
        meta_ref = {"key": layout.meta(r, self.site),
                    "sha256": self._put_once(layout.meta(r, self.site), "meta", crypto.canonical_json(meta), round=r)}
        crash_point("commit")
        self._record_once(layout.commit(r, self.site), "commit",
                          {"round": r, "base": base, "shards": shards, "meta": meta_ref})
        self._did(f"committed round {r}" if r else "published the initial model")

    def _opened_at(self, r: int) -> int:
        prev = self.sealed(r - 1) if r > 1 or self.s.mode == "ffe" else None
        if prev is not None:
            return int(prev["sealed_at"])
        return int(self.fingerprint_seal()["sealed_at"])

    def _valid_commits(self, r: int) -> dict[str, str]:
        """Participants' commits for round r that are well signed and built on the right base."""
        found = {}
        for s in self.participants:
            key = layout.commit(r, s)
            if not self.st.exists(key):
                continue
            data = self.st.get(key)
            body = read_record(self.fed, key, "commit", s, data=data)
            if body.get("round") != r:
                raise IntegrityError(f"{key}: commit claims round {body.get('round')}")
            found[s] = crypto.sha256_hex(data)
        return found

    def _try_seal(self, r: int) -> bool:
        commits = self._valid_commits(r)
        opened = self._opened_at(r)
        now = int(time.time())
        if set(commits) == set(self.participants):
            reason = "all"
        elif len(commits) >= self.s.effective_quorum and now >= opened + self.s.deadline_s:
            reason = "deadline"
        else:
            return False
        body = {"round": r, "contributions": commits, "reason": reason, "opened_at": opened, "sealed_at": now}
        crash_point("seal")
        self._try_create(layout.seal(r), "seal", body)
        return True

    def _wait_round(self, r: int) -> None:
        commits = self._valid_commits(r)
        missing = [s for s in self.participants if s not in commits]
        deadline = self._opened_at(r) + self.s.deadline_s
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(deadline))
        raise Wait("round", f"round {r}/{self.s.rounds}: waiting for {', '.join(missing)} "
                            f"(quorum {self.s.effective_quorum} may seal after {when})",
                   missing, deadline, rnd=r)

    # ------------------------------------------------------------------- final
    def final_phase(self) -> None:
        r = self.s.rounds
        if self.state.get("results_folder") is None:
            weights, model = self.merged(r)
            folder, dice = self._export_final(weights)
            crash_point("final")
            self._save(results_folder=str(folder), final_model=model, final_dice=dice)
            self._did("applied the final merge")
        if not self.st.exists(layout.final_metrics(self.site)):
            payload = {"model": self.state["final_model"], "validation_dice": self.state.get("final_dice")}
            self._put_once(layout.final_metrics(self.site), "final", crypto.canonical_json(payload))
            self._did("published final metrics")
        self._save(finished=True)

    def _export_final(self, weights) -> tuple[Path, dict | None]:
        """nnU-Net's standard results folder with the final merge, and its validation Dice."""
        from .nnunet.train import export_final, validation_dice

        spec = self._spec()
        self.say("writing the final nnU-Net results folder")
        folder = export_final(spec, weights, run_validation=self.s.final_validation)
        return folder, (validation_dice(folder, self.s.fold) if self.s.final_validation else None)
