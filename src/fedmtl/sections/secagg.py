"""``secagg:``: secure aggregation (pairwise masking, or CKKS homomorphic encryption when installed)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from fedmtl.config_base import Strict


class SecAggConfig(Strict):
    enabled: bool = False
    mode: Literal["masking", "ckks"] = Field(
        "masking", description="masking: Bonawitz et al. pairwise masks; ckks: TenSEAL homomorphic sum"
    )
    threshold: int | None = Field(
        None,
        ge=2,
        description="clients that must survive every stage (Shamir t); default: threshold_fraction",
    )
    threshold_fraction: float = Field(
        2 / 3, gt=0, le=1, description="t = ceil(fraction * clients sampled per round), at least 2"
    )
    neighbors: int = Field(
        0, ge=0, description="0: every client masks with every other; k (even): SecAgg+'s k-regular graph"
    )
    bits: int = Field(16, ge=2, le=32, description="fixed-point levels per coordinate: 2^(bits-1) - 1")
    clip: float = Field(1.0, gt=0, description="update coordinates (client model - global) clipped to +-clip")
    rounding: Literal["stochastic", "nearest"] = "stochastic"
    weighting: Literal["samples", "uniform"] = Field(
        "samples", description="samples: weight = num_examples inside the masked vector (FedAvg)"
    )
    stage_drop_prob: float = Field(
        0.0, ge=0, lt=1, description="simulator: each client drops before each protocol stage after training"
    )
    send_metrics: bool = Field(True, description="clients still report train loss/steps in the clear")
    ckks_poly_degree: Literal[8192, 16384] = 8192
    ckks_scale_bits: int = Field(40, ge=20, le=60)

    @field_validator("neighbors")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError("must be even (k/2 neighbours on either side of a ring), or 0 for all pairs")
        return v
