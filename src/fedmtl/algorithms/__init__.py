"""Algorithms, one module each, found by name (no dispatch chains)."""

from __future__ import annotations

from fedmtl.algorithms.apfl import APFL
from fedmtl.algorithms.base import AlgoContext, AlgoParams, Algorithm, ClientWork, Message
from fedmtl.algorithms.ditto import Ditto
from fedmtl.algorithms.fdrmfl import FDRMFL
from fedmtl.algorithms.fedavg import FedAvg, FedProx
from fedmtl.algorithms.fedavg_ft import FedAvgFT
from fedmtl.algorithms.fedbabu import FedBABU
from fedmtl.algorithms.fedbone import FedBone
from fedmtl.algorithms.fedper import FedPer
from fedmtl.algorithms.fedrep import FedRep
from fedmtl.algorithms.hierarchical import Hierarchical
from fedmtl.algorithms.lg_fedavg import LGFedAvg
from fedmtl.algorithms.local import Local
from fedmtl.algorithms.mocha import Mocha
from fedmtl.algorithms.reduce import Aggregate, Reduce
from fedmtl.errors import ConfigError

_REGISTRY: dict[str, type[Algorithm]] = {
    cls.name: cls
    for cls in (
        FedAvg,
        FedProx,
        Local,
        FedAvgFT,
        FedPer,
        FedRep,
        Ditto,
        Hierarchical,
        APFL,
        LGFedAvg,
        FedBABU,
        Mocha,
        FedBone,
        FDRMFL,
    )  # fmt: skip
}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator for algorithms defined outside this package."""
    _REGISTRY[cls.name] = cls
    return cls


def algorithm_names() -> list[str]:
    return sorted(_REGISTRY)


def get_algorithm(name: str) -> type[Algorithm]:
    if name not in _REGISTRY:
        allowed = ", ".join(algorithm_names())
        raise ConfigError(f"config: algorithm.name = {name!r}: unknown algorithm; allowed: {allowed}")
    return _REGISTRY[name]


def algorithm_params(name: str) -> type[AlgoParams]:
    return get_algorithm(name).Params


__all__ = [
    "Aggregate",
    "AlgoContext",
    "AlgoParams",
    "Algorithm",
    "ClientWork",
    "Message",
    "Reduce",
    "algorithm_names",
    "algorithm_params",
    "get_algorithm",
    "register",
]
