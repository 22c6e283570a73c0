"""Privacy accounting with Google's ``dp_accounting`` (RDP or PLD): no hand-written formulas.

A run's privacy loss is a composition of identical subsampled Gaussian mechanisms, one per round
(client level) or per local step (sample level); epsilon at ``delta`` is asked of the library for
the number of releases so far. Results are cached: the same (mechanism, count) is asked every round."""

from __future__ import annotations

import logging
from functools import lru_cache

import dp_accounting
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant


def round_event(noise_multiplier: float, sampled: int, population: int, sampling: str) -> dp_event.DpEvent:
    """One release: ``sampled`` of ``population`` records (clients, or samples of a batch) chosen,
    their clipped contributions summed, Gaussian noise of std ``noise_multiplier * clip`` added.

    'poisson' uses Poisson sampling with q = sampled / population; 'without_replacement' is exact
    for fixed-size sampling under replace-one neighbours, where one replaced record moves the sum by
    up to 2 * clip, so the noise is half as large relative to the sensitivity: with everyone in
    every round (sampled = population) that is Gaussian(z / 2), replace-one."""
    if sampling == "without_replacement" and sampled >= population:
        return dp_event.GaussianDpEvent(noise_multiplier / 2.0)
    if sampled >= population:
        return dp_event.GaussianDpEvent(noise_multiplier)
    if sampling == "without_replacement":
        return dp_event.SampledWithoutReplacementDpEvent(
            population, sampled, dp_event.GaussianDpEvent(noise_multiplier / 2.0)
        )
    return dp_event.PoissonSampledDpEvent(sampled / population, dp_event.GaussianDpEvent(noise_multiplier))


@lru_cache(maxsize=4096)
def epsilon(
    noise_multiplier: float,
    releases: int,
    delta: float,
    sampled: int,
    population: int,
    sampling: str = "poisson",
    accountant: str = "rdp",
    eval_noise: float = 0.0,
    eval_releases: int = 0,
) -> float:
    """Epsilon at ``delta`` after ``releases`` compositions of ``round_event``, composed with
    ``eval_releases`` Gaussian mechanisms of multiplier ``eval_noise`` (DP-aggregated evaluation:
    one per released metric mean, every client counted); 0 before any, inf without noise."""
    if releases <= 0 and eval_releases <= 0:
        return 0.0
    if (releases > 0 and noise_multiplier <= 0) or (eval_releases > 0 and eval_noise <= 0):
        return float("inf")
    parts: list[dp_event.DpEvent] = []
    if releases > 0:
        train = round_event(noise_multiplier, sampled, population, sampling)
        parts.append(dp_event.SelfComposedDpEvent(train, releases))
    if eval_releases > 0:  # values clipped to [0, bound]: one client moves the sum by <= bound
        parts.append(dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(eval_noise), eval_releases))
    event = parts[0] if len(parts) == 1 else dp_event.ComposedDpEvent(parts)
    if accountant == "pld":
        acc: dp_accounting.PrivacyAccountant = pld_privacy_accountant.PLDAccountant()
    else:
        rel = (
            dp_accounting.NeighboringRelation.REPLACE_ONE
            if sampling == "without_replacement"
            else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
        )
        acc = rdp_privacy_accountant.RdpAccountant(neighboring_relation=rel)
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # some fractional RDP orders do not converge: the library drops them
    try:
        acc.compose(event)
        return float(acc.get_epsilon(delta))
    finally:
        absl.setLevel(level)


def adaptive_update_noise(noise_multiplier: float, count_noise_std: float) -> float:
    """Andrew et al. (2021), Thm. 1: updates noised with ``z_u`` and the count of unclipped updates
    (sensitivity 1/2 after centring) with std ``count_noise_std`` together cost as much as one
    Gaussian mechanism with ``noise_multiplier`` when ``z_u = (z^-2 - (2 sigma_b)^-2)^-1/2``."""
    rest = noise_multiplier**-2 - (2.0 * count_noise_std) ** -2
    if rest <= 0:
        raise ValueError(
            f"count_noise_std = {count_noise_std:g} is too small for noise_multiplier = "
            f"{noise_multiplier:g}: needs 2 * count_noise_std > noise_multiplier"
        )
    return float(rest**-0.5)
