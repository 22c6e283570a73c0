"""Cross-cutting features, one module each: its config section, its compatibility checks and its
client and server behaviour (an algorithm wrapper; client-level DP also its aggregation chain).

``FEATURES`` is the one ordered list, innermost first: sample selection decides what a client
trains on; an attacker then tampers with what it would send; differential privacy clips and noises
the (possibly tampered) update; secure aggregation masks whatever leaves the client last. A feature
whose section is off is skipped. Adding a feature is one module and one entry here (plus its
section in ``fedmtl.config.Config``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedmtl.features import attack, privacy, secagg, selection

if TYPE_CHECKING:
    from fedmtl.aggregation.pipeline import Step
    from fedmtl.algorithms.base import Algorithm
    from fedmtl.config import Config
    from fedmtl.data.federated import FederatedData


@dataclass(frozen=True)
class Feature:
    #: the config section whose ``enabled`` turns the feature on (None: always on)
    section: str | None
    #: ``(algorithm, config, data) -> the algorithm with the feature``, or a config error
    wrap: Callable[[Algorithm, Config, FederatedData], Algorithm]
    #: ``(config, data) -> the aggregation chain the feature needs``, or None
    chain: Callable[[Config, FederatedData], list[Step] | None] | None = None

    def enabled(self, cfg: Config) -> bool:
        return self.section is None or bool(getattr(cfg, self.section).enabled)


FEATURES: list[Feature] = [
    Feature("selection", selection.wrap),
    Feature("attack", attack.wrap),
    Feature("privacy", privacy.wrap, privacy.chain),
    Feature("secagg", secagg.wrap),
]


def aggregation_steps(cfg: Config, data: FederatedData) -> list[Step] | None:
    """The chain an enabled feature sets (client-level DP), or None to use ``aggregation:``."""
    for feature in FEATURES:
        if feature.chain is not None and feature.enabled(cfg):
            steps = feature.chain(cfg, data)
            if steps is not None:
                return steps
    return None


def apply_features(algo: Algorithm, cfg: Config, data: FederatedData) -> Algorithm:
    """``algo`` inside every enabled feature, innermost first."""
    for feature in FEATURES:
        if feature.enabled(cfg):
            algo = feature.wrap(algo, cfg, data)
    return algo
