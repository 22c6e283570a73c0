"""``secagg:``: secure aggregation (pairwise masking, or CKKS homomorphic encryption when installed)."""

from __future__ import annotations

from fedmtl.config_base import Strict


class SecAggConfig(Strict):
    enabled: bool = False
