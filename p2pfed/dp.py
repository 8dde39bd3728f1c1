"""Differential privacy accounting (docs/design.md 7.8, "Differential privacy"): the
epsilon spent so far, for the delta fixed at init, from Google's dp-accounting (its
RDP accountant). Each secure round is one Gaussian mechanism on the sum of clipped
updates, with no subsampling (every participant is in every round). A site that drops
out takes its share of the noise with it: a round with k of the n key-sealed sites has
noise multiplier z * sqrt(k / n)."""
from __future__ import annotations


def round_multiplier(z: float, key_sealed: int, contributors: int) -> float:
    return z * (contributors / key_sealed) ** 0.5


def epsilon(multipliers: list[float], delta: float) -> float:
    """The epsilon of composing one Gaussian mechanism per round (0.0 before any)."""
    if not multipliers:
        return 0.0
    import dp_accounting

    accountant = dp_accounting.rdp.RdpAccountant()
    for z in multipliers:
        accountant.compose(dp_accounting.GaussianDpEvent(z))
    return float(accountant.get_epsilon(delta))
