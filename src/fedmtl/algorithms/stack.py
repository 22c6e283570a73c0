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

#: ``module:function`` of each wrapper factory ``(algo, cfg, data) -> algo``, innermost first.
FACTORIES = [
    "fedmtl.selection.wrap:wrap",
    "fedmtl.attacks.wrap:wrap",
    "fedmtl.privacy.wrap:wrap",
    "fedmtl.secagg.wrap:wrap",
]


def wrap_algorithm(algo: Algorithm, cfg: Config, data: FederatedData) -> Algorithm:
    for path in FACTORIES:
        module, func = path.split(":")
        algo = getattr(importlib.import_module(module), func)(algo, cfg, data)
    return algo
