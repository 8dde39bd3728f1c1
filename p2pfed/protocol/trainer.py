"""The local trainer: everything a tick asks of the site's own data and model.

The round protocol never touches nnU-Net itself: it calls a `LocalTrainer`.
`p2pfed.nnunet.trainer.NnunetTrainer` is the real one; tests/factory.py has a numpy
one that costs milliseconds. A new training backend implements this and nothing else."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Protocol, runtime_checkable

import numpy as np

Weights = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Trained:
    """One round of local training: the new weights, the number of training cases (the
    site's merge weight) and the metrics shown in `status` (JSON values)."""

    weights: Weights
    cases: int
    epoch: int
    metrics: dict = field(default_factory=dict)


@runtime_checkable
class LocalTrainer(Protocol):
    def check_ready(self) -> None:
        """Raise a P2PFedError if the local dataset or checkpoint cannot be trained on."""

    def cases(self) -> int:
        """The number of training cases of the fold: this site's merge weight, declared
        once before training starts; every `Trained.cases` must equal it."""

    def summary(self) -> dict:
        """FFE: this site's fingerprint summary (p2pfed.ffe summary payload)."""

    def histograms(self, ranges: list) -> dict:
        """FFE: per-channel histograms over the federation-wide intensity `ranges`."""

    def plan(self, fingerprint: dict | None) -> dict:
        """Plan and preprocess from `fingerprint` (None: this site's own, asym); the plans."""

    def initial_weights(self) -> Weights:
        """The freshly initialized network of the agreed plan (FFE round 0)."""

    def train(self, r: int, base: Weights | None) -> Trained:
        """Train round r from `base` (None: keep the local model, asym round 1)."""

    def export_final(self, weights: Weights) -> tuple[Path, dict | None]:
        """Write the final model where the user expects it; (folder, validation Dice)."""
