"""The fixed order in which cross-cutting wrappers go around an algorithm.

Innermost first: sample selection decides what a client trains on; an attacker then tampers with
what it would send; differential privacy clips and noises the (possibly tampered) update; secure
aggregation masks whatever leaves the client last. Each factory returns the algorithm unchanged
when its config section is off."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedmtl.algorithms.base import Algorithm
    from fedmtl.config import Config
    from fedmtl.data.federated import FederatedData

#: (config section, ``module:function``) of each wrapper factory ``(algo, cfg, data) -> algo``,
#: innermost first (section None: always applied). A factory is imported only when its section
#: is enabled: the packages behind them (dp-accounting and SciPy's statistics, cryptography,
#: scikit-learn) take about a second to import, which a run that uses none of them should not pay.
FACTORIES = [
    ("selection", "fedmtl.selection.wrap:wrap"),
    ("attack", "fedmtl.attacks.wrap:wrap"),
    ("privacy", "fedmtl.privacy.wrap:wrap"),
    ("secagg", "fedmtl.secagg.wrap:wrap"),
]


def wrap_algorithm(algo: Algorithm, cfg: Config, data: FederatedData) -> Algorithm:
    for section, path in FACTORIES:
        if section is not None and not getattr(cfg, section).enabled:
            continue
        module, func = path.split(":")
        algo = getattr(importlib.import_module(module), func)(algo, cfg, data)
    return algo
