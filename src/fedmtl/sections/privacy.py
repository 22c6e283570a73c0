"""``privacy:``: differential privacy and its accountant (see docs/privacy.md).

``level: client`` is DP-FedAvg (McMahan et al. 2018): every client clips its update to
``clip_norm`` (fixed, or adapted toward a quantile of update norms, Andrew et al. 2021), and
Gaussian noise of std ``noise_multiplier * clip_norm`` is added to the sum of updates, by the server
(``noise_at: server``) or in shares by the clients before anything leaves them (``noise_at:
client``, for secure aggregation). ``level: sample`` is DP-SGD inside local training (per-sample
gradient clipping and noise). The accountant (``dp_accounting``, RDP or PLD) reports epsilon at
``delta`` every round; ``max_epsilon`` stops the run before a round that would exceed it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedmtl.config_base import Strict


class PrivacyConfig(Strict):
    enabled: bool = False
    level: Literal["client", "sample"] = "client"
    #: std of the noise on the sum of clipped updates (client) or gradients (sample), over clip_norm
    noise_multiplier: float = Field(1.0, ge=0)
    #: L2 bound of one client's update (client) or one sample's gradient (sample); initial bound
    #: when ``clipping: adaptive``
    clip_norm: float = Field(1.0, gt=0)
    clipping: Literal["fixed", "adaptive"] = "fixed"
    #: adaptive clipping: quantile of update norms the bound tracks, and its geometric step size
    target_quantile: float = Field(0.5, gt=0, lt=1)
    clip_lr: float = Field(0.2, gt=0)
    #: adaptive clipping: std of the noise on the count of unclipped updates (default: the larger of
    #: clients per round / 20, as Andrew et al., and noise_multiplier, which raises the update noise
    #: by 15%); part of the privacy budget
    count_noise_std: float | None = Field(None, gt=0)
    #: where the Gaussian noise of client-level DP is added
    noise_at: Literal["server", "client"] = "server"
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: Literal["rdp", "pld"] = "rdp"
    #: how the accountant models client (or batch) sampling: 'poisson' (the usual approximation for
    #: fixed-size sampling) or 'without_replacement' (exact for the simulator's fixed-size client
    #: sampling, replace-one neighbours; rdp only; client level only)
    sampling: Literal["poisson", "without_replacement"] = "poisson"
    #: stop before the round whose release would push epsilon above this
    max_epsilon: float | None = Field(None, gt=0)
    #: DP-aggregated evaluation (client level): instead of exact client metrics, each evaluation
    #: round releases only the mean of every metric in ``eval_metrics`` over the clients, each
    #: client's value clipped to [0, eval_bound], with Gaussian noise of std
    #: eval_noise_multiplier * eval_bound on the sum; the accountant composes these releases too
    eval_noise_multiplier: float | None = Field(None, gt=0)
    eval_metrics: list[str] = Field(default_factory=lambda: ["accuracy"], min_length=1)
    eval_bound: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _combinations(self) -> PrivacyConfig:
        if self.accountant == "pld" and self.sampling == "without_replacement":
            raise ValueError("sampling 'without_replacement' needs accountant 'rdp' (PLD supports 'poisson')")
        if self.level == "sample" and self.eval_noise_multiplier is not None:
            raise ValueError(
                "eval_noise_multiplier (DP-aggregated evaluation) protects clients: it needs level 'client'"
            )
        if self.level == "sample" and self.sampling == "without_replacement":
            raise ValueError("level 'sample' accounts batches as 'poisson' sampling")
        return self
