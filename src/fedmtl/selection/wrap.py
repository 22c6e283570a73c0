"""Wraps an algorithm with sample selection when ``selection.enabled`` is set."""

from __future__ import annotations

from fedmtl.algorithms.base import Algorithm
from fedmtl.config import Config
from fedmtl.data.federated import FederatedData
from fedmtl.errors import ConfigError


def wrap(algo: Algorithm, cfg: Config, data: FederatedData) -> Algorithm:
    sc = cfg.selection
    if not sc.enabled:
        return algo
    from fedmtl.selection.scores import has_decoder
    from fedmtl.selection.wrapper import SampleSelection

    if not all(t.is_classification for t in data.tasks.values()):
        raise ConfigError("config: selection.enabled = True: sample selection needs classification tasks")
    model = algo.ctx.model
    if "recon" in sc.features and not has_decoder(model):
        raise ConfigError(
            f"config: selection.features = {list(sc.features)}: 'recon' needs model.name = 'autoencoder' "
            f"(model {cfg.model.name!r} has no decoder); use features [ce] or [ce, centre]"
        )
    if sc.mode == "global" and sc.method in ("ocsvm", "iforest") and cfg.secagg.enabled:
        raise ConfigError(
            "config: selection.mode = 'global': per-client score vectors cannot pass secure aggregation; "
            "use selection.mode = 'local'"
        )
    w_ce = sc.w_ce if sc.w_ce is not None else float(getattr(model, "w_ce", 1.0))
    return SampleSelection(algo, sc, cfg.seed, w_ce)
