"""``aggregation:`` (the server's chain of transforms over client updates) and ``attack:``
(malicious clients, for measuring defences)."""

from __future__ import annotations

from typing import Any

from fedmtl.config_base import Strict

#: One step of the aggregation chain, e.g. ``{name: clip, max_norm: 1.0}``; empty list = weighted mean.
AggregationSteps = list[dict[str, Any]]


class AttackConfig(Strict):
    enabled: bool = False
