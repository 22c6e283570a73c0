"""Wraps an algorithm with malicious clients when ``attack.enabled`` is set."""

from __future__ import annotations

from fedmtl.algorithms.base import Algorithm
from fedmtl.config import Config
from fedmtl.data.federated import FederatedData


def wrap(algo: Algorithm, cfg: Config, data: FederatedData) -> Algorithm:
    if not cfg.attack.enabled:
        return algo
    from fedmtl.attacks.malicious import MaliciousClients, choose_malicious, clients_per_round

    bad = choose_malicious(cfg.attack, data.train_clients, cfg.seed)
    return MaliciousClients(algo, cfg.attack, bad, data, clients_per_round(cfg, data))
