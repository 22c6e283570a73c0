"""Seconds spent in named phases, lap by lap: where a process's own time goes between two points.

The round and the run loop call ``lap(name)`` at the end of each phase of the server's work
(planning, checks, reduction, evaluation, records, checkpoint); a runtime that reports them (the
Flower ServerApp, per exchange) ``take``s the totals. ``NO_LAPS`` costs one attribute lookup."""

from __future__ import annotations

import time


class Laps:
    """Accumulates the time since the previous lap under the name of the phase that just ended."""

    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.totals: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.totals[name] = self.totals.get(name, 0.0) + now - self.t
        self.t = now

    def take(self) -> dict[str, float]:
        """The totals since the last ``take``, reset."""
        out, self.totals = self.totals, {}
        return out


class _NoLaps(Laps):
    def lap(self, name: str) -> None:
        return None


NO_LAPS: Laps = _NoLaps()
