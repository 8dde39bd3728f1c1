"""The federation's mode as a strategy: every question whose answer depends on FFE
or asym is answered here, and nowhere else.

- FFE: one federated fingerprint, one plan every site must agree on, one initial
  model (round 0) built by the first participant, full FedAvg; a contribution must be
  built on the single merged model of the previous round and is checked against it.
- Asym (AsymFedAvg): each site plans from its own data, starts from its own network,
  and keeps its own merged model (the layers it shares with others are averaged)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    name: str
    shares_statistics: bool  # publish fingerprint summaries and histograms (FFE)
    plans_must_agree: bool
    first_round: int  # 0: a shared initial model is round 0
    # every site's channels in the same modalities (FFE: one plan normalizes them alike);
    # asym: each site's own plan normalizes its own, so CT and MRI sites may federate
    same_modalities: bool

    def expected_base(self, r: int, site: str, previous: dict[str, str] | None) -> str | None:
        """The model hash a round-r contribution of `site` must name; `previous` is the
        per-site result of merging round r-1 (None where there is no such round)."""
        if previous is None:
            return None
        return next(iter(previous.values())) if self.plans_must_agree else previous.get(site)

    def kept_model(self, site: str, contributors) -> str | None:
        """Whose merged model this site keeps: its own if it contributed; in FFE every
        merged model is the same; in asym a site that missed the round keeps its own last
        model with the shared layers adopted (None)."""
        if site in contributors:
            return site
        return min(contributors) if self.plans_must_agree else None

    def checks_against_base(self, r: int) -> bool:
        """Whether round r's contributions are checked tensor by tensor against the
        merge of round r-1 (FFE: every site trained from exactly that model)."""
        return self.plans_must_agree and r > 0


FFE = Mode("ffe", shares_statistics=True, plans_must_agree=True, first_round=0, same_modalities=True)
ASYM = Mode("asym", shares_statistics=False, plans_must_agree=False, first_round=1, same_modalities=False)


def mode_of(settings) -> Mode:
    return {"ffe": FFE, "asym": ASYM}[settings.mode]
