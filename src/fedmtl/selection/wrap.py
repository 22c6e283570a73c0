"""Wraps an algorithm with this feature when its config section enables it."""

from __future__ import annotations

from fedmtl.algorithms.base import Algorithm
from fedmtl.config import Config
from fedmtl.data.federated import FederatedData


def wrap(algo: Algorithm, cfg: Config, data: FederatedData) -> Algorithm:
    return algo
