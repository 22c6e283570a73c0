"""``data.corrupt:``: the seeded corruption harness applied to clients' training splits."""

from __future__ import annotations

from fedmtl.config_base import Strict


class CorruptConfig(Strict):
    enabled: bool = False
