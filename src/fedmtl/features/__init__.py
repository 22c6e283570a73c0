"""Cross-cutting features, one module each: its config section, its compatibility checks and its
client and server behaviour (an algorithm wrapper for the client side and the feature's books;
client-level DP also the round's aggregation chain, secure aggregation the round's reducer).

``FEATURES`` is the one ordered list, innermost first: sample selection decides what a client
trains on; an attacker then tampers with what it would send; differential privacy clips and noises
the (possibly tampered) update; secure aggregation masks whatever leaves the client last. A feature
whose section is off is skipped. Adding a feature is one module and one entry here (plus its
section in ``fedmtl.config.Config``).

``round_reducer`` is how the round carries out every algorithm's reductions: a feature's reducer
(secure aggregation), else the chain of the features' steps (client DP), else the user's
``aggregation:`` list, else the plain weighted mean."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedmtl.aggregation.pipeline import Pipeline, build_pipeline
from fedmtl.features import attack, privacy, secagg, selection
from fedmtl.runtime.reduction import ChainReducer, Reducer

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
    #: ``(algorithm, config, data) -> how the round carries out reductions``, or None
    reducer: Callable[[Algorithm, Config, FederatedData], Reducer] | None = None

    def enabled(self, cfg: Config) -> bool:
        return self.section is None or bool(getattr(cfg, self.section).enabled)


FEATURES: list[Feature] = [
    Feature("selection", selection.wrap),
    Feature("attack", attack.wrap),
    Feature("privacy", privacy.wrap, privacy.chain),
    Feature("secagg", secagg.wrap, reducer=secagg.reducer),
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


def round_reducer(algo: Algorithm, cfg: Config, data: FederatedData) -> Reducer:
    """How the round reduces this run's replies (see module doc)."""
    for feature in FEATURES:
        if feature.reducer is not None and feature.enabled(cfg):
            return feature.reducer(algo, cfg, data)
    steps = aggregation_steps(cfg, data)
    if steps is not None:
        return ChainReducer(Pipeline(steps), cfg.seed, guarantees="client-level differential privacy")
    chain = build_pipeline(cfg.aggregation)
    if chain is None:
        return ChainReducer(None, cfg.seed)
    names = ", ".join(step.name for step in cfg.aggregation)
    return ChainReducer(chain, cfg.seed, guarantees=f"the aggregation list [{names}]")
