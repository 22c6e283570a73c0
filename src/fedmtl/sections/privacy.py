"""``privacy:``: differential privacy and its accountant."""

from __future__ import annotations

from fedmtl.config_base import Strict


class PrivacyConfig(Strict):
    enabled: bool = False
