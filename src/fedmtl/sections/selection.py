"""``selection:``: client-side sample selection (see docs/selection.md)."""

from __future__ import annotations

from fedmtl.config_base import Strict


class SelectionConfig(Strict):
    enabled: bool = False
