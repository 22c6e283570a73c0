"""``privacy:`` (differential privacy and its accountant) and ``secagg:`` (secure aggregation)."""

from __future__ import annotations

from fedmtl.config_base import Strict


class PrivacyConfig(Strict):
    enabled: bool = False


class SecAggConfig(Strict):
    enabled: bool = False
