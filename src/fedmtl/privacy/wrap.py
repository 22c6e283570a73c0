"""Wraps an algorithm with differential privacy when ``privacy.enabled`` is set."""

from __future__ import annotations

from fedmtl.algorithms.base import Algorithm
from fedmtl.config import Config
from fedmtl.data.federated import FederatedData
from fedmtl.errors import ConfigError


def wrap(algo: Algorithm, cfg: Config, data: FederatedData) -> Algorithm:
    p = cfg.privacy
    if not p.enabled:
        return algo
    from fedmtl.algorithms.fedavg import FedAvg
    from fedmtl.algorithms.wrapper import AlgorithmWrapper

    base = algo.unwrapped() if isinstance(algo, AlgorithmWrapper) else algo
    if not isinstance(base, FedAvg):
        raise ConfigError(
            f"config: privacy.enabled = True: needs a FedAvg-family algorithm (fedavg, fedprox, fedavg_ft, "
            f"fedper, fedrep, ditto, hierarchical), not {cfg.algorithm.name!r}"
        )
    if p.level == "sample":
        from fedmtl.privacy.sample_dp import SampleDP

        if isinstance(algo, AlgorithmWrapper) or type(base).client_step is not FedAvg.client_step:
            raise ConfigError(
                f"config: privacy.level = 'sample': DP-SGD replaces FedAvg's client step, so it needs an "
                f"algorithm that trains like FedAvg (fedavg, fedprox, fedavg_ft, hierarchical) and no "
                f"attack/selection wrapper; got {cfg.algorithm.name!r}"
            )
        return SampleDP(algo, p, data)
    if p.eval_noise_multiplier is not None and cfg.data.holdout_clients:
        raise ConfigError(
            "config: privacy.eval_noise_multiplier: DP-aggregated evaluation releases only the trained "
            "clients' metric means; set data.holdout_clients to 0"
        )
    if cfg.aggregation:
        raise ConfigError(
            "config: privacy.level = 'client': sets the aggregation chain itself (clip, uniform mean, "
            "noise); leave aggregation empty"
        )
    from fedmtl.attacks.malicious import clients_per_round
    from fedmtl.privacy.client_dp import ClientDP

    try:
        return ClientDP(
            algo,
            p,
            clients_per_round(cfg, data),
            len(data.train_clients),
            eval_every=cfg.eval.every,
            rounds=cfg.train.rounds,
        )
    except ValueError as exc:
        raise ConfigError(f"config: privacy.count_noise_std: {exc}") from None
