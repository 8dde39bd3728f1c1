"""`p2pfed round --site NAME`: one idempotent tick of a site (docs/design.md 7.2).

A tick runs the phases of p2pfed/protocol/phases in order. Each phase looks at the
tick's `View` of the federation and either is done, waits for other sites (the tick
ends, exit 0), or does one piece of work; it is then asked again. Every piece of work
checks for its own output first, so a tick killed anywhere is simply run again.
Waiting paths touch neither torch nor nnU-Net: an idle tick costs a few storage reads."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..errors import AuthorCheated, IntegrityError
from ..federation import Federation, check_versions
from ..site import SiteConfig, SiteHome
from . import complaints
from .phases import PHASES, STEPS, merge
from .trainer import LocalTrainer
from .view import View
from .wait import Wait
from .writer import Writer

MAX_STEPS = 100_000  # rounds x steps of a long federation fit; an endless loop does not


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
    junk: list[str] = field(default_factory=list)  # objects at protocol keys that do not count

    def to_json(self) -> dict:
        return {"site": self.site, "phase": self.phase, "round": self.round, "actions": self.actions,
                "action": self.actions[-1] if self.actions else "wait" if not self.finished else "none",
                "waiting_for": self.waiting_for, "deadline": self.deadline, "message": self.message,
                "finished": self.finished, "junk": self.junk}


class Tick:
    """One tick of one site. `trainer`: the LocalTrainer (default: nnU-Net);
    `stop_after`: a name from STEPS to stop after (e.g. "plan": prepare, do not train)."""

    def __init__(self, home: SiteHome, config: SiteConfig, fed: Federation, trainer: LocalTrainer | None = None,
                 say: Callable[[str], None] = lambda s: None, progress=None, stop_after: str | None = None):
        if stop_after is not None and stop_after not in STEPS:
            raise ValueError(f"stop_after must be one of {STEPS}")
        self.home, self.config, self.fed, self.s = home, config, fed, fed.settings
        self.site, self.me = config.site, home.identity()
        self.say, self.progress, self.stop_after = say, progress, stop_after
        self.state = home.state()
        self.view = View(fed, home, self.state)
        self.mode = self.view.mode
        self.write = Writer(self.view, self.me)
        if trainer is None:
            from ..nnunet.trainer import NnunetTrainer

            trainer = NnunetTrainer(config, fed.settings, say, progress)
        self.trainer = trainer
        self.report = Report(config.site)
        self.complaints_seen: set[str] = set()  # complaint keys already looked at

    def run(self) -> Report:
        try:
            return self._run()
        finally:
            self.report.junk = [f"{key}: {why}" for key, why in sorted(self.view.junk.items())]
            for line in self.report.junk:
                self.say(f"ignored (not an object of this federation): {line}")

    def _run(self) -> Report:
        if not any(self.site in e.members for e in self.fed.log.chain):
            self.report.phase = "joining"
            self.report.message = f"waiting for a member to admit {self.site!r} (p2pfed admit {self.site} ...)"
            self.report.waiting_for = sorted(self.fed.members)
            return self.report
        r = self.state.get("round", 0)
        if self.site in self.fed.members_at(r):  # before this site shares anything; but round r-1's
            # objects are sealed to the old keys: a merge of it that waits (reveals) still needs them
            self.adopt_keys(min(r, self.state.get("merged_upto", r - 1) + 1))
        merge.recheck_head(self)  # the chain this site adopted, also once finished
        if not self.state.get("finished"):
            check_versions(self.fed)  # before this site shares or merges anything
            try:
                self.phases()
            except Wait as w:
                complaints.check(self)
                self.report.phase, self.report.message = w.phase, w.message
                self.report.waiting_for, self.report.deadline = w.waiting_for, w.deadline
                self.report.round = w.round if w.round is not None else self.report.round
                return self.report
        self.report.phase, self.report.finished, self.report.round = "done", True, self.s.rounds
        self.report.message = "federation finished; the final model is in " + \
            str(self.state.get("results_folder", "nnUNet_results"))
        return self.report

    def phases(self) -> None:
        for phase in PHASES:
            self.enter(getattr(phase, "STEPS", (phase.NAME,))[0])
            self.report.phase = phase.NAME
            for _ in range(MAX_STEPS):
                try:
                    action = phase.advance(self)
                except AuthorCheated as exc:  # not tampering: the signed header is the author's
                    raise complaints.file(self, exc) from None
                complaints.check(self)  # another site's complaint halts this one too
                if action is None:
                    break
                if action:
                    self.report.actions.append(action)
                    self.say(action)
            else:  # a phase must finish or wait; looping on means a bug, not a slow tick
                raise RuntimeError(f"phase {phase.NAME!r} made no progress in {MAX_STEPS} steps")

    def adopt_keys(self, r: int) -> None:
        """The keys the epoch in force at round r lists for this site must be its own: its
        current ones, or the ones `rotate-keys` proposed (then they replace the old ones,
        which are deleted: from round r on nothing is read or signed with them)."""
        epoch = self.fed.epoch_at(r)
        want = epoch.members.get(self.site)
        if want is None or want == self.me.public():
            return
        new = self.home.next_identity()
        if new is None or new.public() != want:
            raise IntegrityError(f"epoch {epoch.number} of the membership log holds keys for {self.site!r} "
                                 "that are not this site's",
                                 "a member admitted other keys under this site's name; nothing was shared; "
                                 "alert the members")
        self.me = self.write.me = self.home.promote_next_keys()
        self.say(f"rotated keys: epoch {epoch.number} is in force from round {r}; the old keys are deleted")

    def enter(self, step: str) -> None:
        """Called before each phase and each step of a round: honours `stop_after`."""
        if self.stop_after is not None and STEPS.index(step) > STEPS.index(self.stop_after):
            raise Wait(self.stop_after, f"stopped after {self.stop_after}, as asked (--until {self.stop_after})")

    def save(self, **changes) -> None:
        self.state.update(changes)
        self.home.save_state(self.state)
