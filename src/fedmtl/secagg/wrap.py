"""Wraps an algorithm with secure aggregation when ``secagg.enabled`` is set.

Only combinations where the server needs nothing but the weighted sum of client updates are
accepted; anything else is a one-line config error naming what clashes."""

from __future__ import annotations

from fedmtl.algorithms.base import Algorithm
from fedmtl.algorithms.fedavg import FedAvg
from fedmtl.algorithms.wrapper import AlgorithmWrapper
from fedmtl.config import Config
from fedmtl.data.federated import FederatedData
from fedmtl.errors import ConfigError

#: Aggregation steps that are linear in the updates, so a masked sum can stand in for them.
LINEAR_STEPS = {"mean", "weighted_mean"}


def unsupported(algo: Algorithm, cfg: Config) -> str | None:
    """Why secure aggregation cannot wrap this algorithm/config (None when it can)."""
    base = algo.unwrapped() if isinstance(algo, AlgorithmWrapper) else algo
    name = base.name
    if not base.has_global_model:
        return f"algorithm {name!r} has no global model to aggregate"
    if not isinstance(base, FedAvg) or type(base).server_step is not FedAvg.server_step:
        return (
            f"algorithm {name!r} needs more than the weighted mean of client updates; "
            "secure aggregation supports fedavg, fedprox, fedavg_ft, fedper, fedrep, ditto"
        )
    if base.ctx.multi_task:
        return (
            "multi-task federations average each head over its own clients; "
            "secure aggregation sums one vector"
        )
    why = _privacy_clash(cfg)
    if why is not None:
        return why
    for step in cfg.aggregation:
        step_name = str(step.get("name") if isinstance(step, dict) else getattr(step, "name", step))
        weighting = step.get("weighting") if isinstance(step, dict) else getattr(step, "weighting", None)
        if step_name in LINEAR_STEPS and weighting not in (None, cfg.secagg.weighting):
            return (
                f"aggregation step {step_name!r} weights by {weighting!r} but secagg.weighting is "
                f"{cfg.secagg.weighting!r}; make them equal"
            )
        if step_name not in LINEAR_STEPS:
            return (
                f"aggregation step {step_name!r} needs individual client updates, which secure aggregation "
                f"hides; allowed with secagg: {', '.join(sorted(LINEAR_STEPS))}"
            )
    return None


def _privacy_clash(cfg: Config) -> str | None:
    """Differential privacy works with secure aggregation only when nothing of it needs one
    client's update on the server: clients clip and noise (DP-FedAvg with ``noise_at: client``)."""
    p = cfg.privacy
    if not p.enabled:
        return None
    if p.level != "client":
        return (
            f"privacy.level = {p.level!r} accounts each client's steps from its own reply, which secure "
            "aggregation replaces by one aggregate; use privacy.level: client with noise_at: client"
        )
    if p.noise_at != "client":
        return (
            "privacy.noise_at = 'server' clips and noises individual updates on the server, which secure "
            "aggregation hides; use privacy.noise_at: client (each client adds its share of the noise)"
        )
    if p.clipping != "fixed":
        return (
            f"privacy.clipping = {p.clipping!r} needs each client's clip bit on the server; "
            "use privacy.clipping: fixed"
        )
    if cfg.secagg.weighting != "uniform":
        return (
            f"secagg.weighting = {cfg.secagg.weighting!r}, but DP-FedAvg averages clients uniformly; "
            "set secagg.weighting: uniform"
        )
    return None


def wrap(algo: Algorithm, cfg: Config, data: FederatedData) -> Algorithm:
    sa = cfg.secagg
    if not sa.enabled:
        return algo
    why = unsupported(algo, cfg)
    if why is not None:
        raise ConfigError(f"config: secagg.enabled = True: {why}")
    from fedmtl.secagg.masking import sampled_per_round, share_holders, threshold_for

    sampled = sampled_per_round(cfg, data)
    t = threshold_for(cfg, sampled)
    holders = share_holders(cfg, sampled)
    if t > holders:
        who = (
            f"the {sampled} clients sampled per round"
            if holders == sampled
            else f"the {holders} share holders of a neighbourhood (secagg.neighbors = {sa.neighbors})"
        )
        raise ConfigError(f"config: secagg.threshold = {t}: more than {who}; allowed: 2..{holders}")
    if sa.mode == "ckks" and sa.neighbors:
        raise ConfigError(
            f"config: secagg.neighbors = {sa.neighbors}: a masking option; mode 'ckks' has no masks"
        )
    if sa.mode == "ckks":
        from fedmtl.secagg.ckks import CKKSWrapper

        return CKKSWrapper(algo, cfg, data)
    from fedmtl.secagg.masking import SecAggWrapper

    return SecAggWrapper(algo, cfg, data)
