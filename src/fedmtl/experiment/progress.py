"""What a run says while it runs: its folder first, then one line per evaluated round.

Everything goes through the ``fedmtl`` logger, so a library user routes, formats or silences it like
any other logging; the ``fedmtl`` command sends it to stderr. On a terminal a tqdm bar stands in for
the per-round lines; off a terminal (a log file, ``nohup``, CI) each evaluated round is one plain
line: round, primary metric, loss, elapsed time and the time left."""

from __future__ import annotations

import logging
import sys
from typing import Any

from tqdm import tqdm

log = logging.getLogger("fedmtl")


def duration(seconds: float) -> str:
    """``4.2 s``, ``3 min 05 s``, ``1 h 12 min``: short and unambiguous."""
    if seconds != seconds or seconds < 0:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def wanted(enabled: bool) -> bool:
    """Progress is shown when the config asks for it and nobody silenced the ``fedmtl`` logger
    (``--quiet``, or a handler set above INFO); an unconfigured logger still gets the bar."""
    return enabled and (log.isEnabledFor(logging.INFO) or not log.hasHandlers())


class Watch:
    """Follows one run's round rows: a bar on a terminal, a line per evaluated round elsewhere."""

    def __init__(self, name: str, metric: str, start: int, total: int, elapsed: float, enabled: bool) -> None:
        self.metric, self.start, self.total, self.elapsed0 = metric, start, total, elapsed
        show = wanted(enabled)
        self.lines = show and not sys.stderr.isatty()
        self.bar = tqdm(
            total=total,
            initial=start - 1,
            desc=name,
            unit="round",
            file=sys.stderr,
            disable=not show or self.lines,
            dynamic_ncols=True,
            leave=False,
        )

    def row(self, row: dict[str, Any]) -> None:
        """One round row, as the loop writes it."""
        self.bar.update(1)
        value = row.get(f"{self.metric}_mean")
        if value is None:
            return
        self.bar.set_postfix({self.metric: f"{value:.4f}"})
        if self.lines:
            log.info(self.line(row))

    def line(self, row: dict[str, Any]) -> str:
        r = int(row["round"])
        parts = [f"round {r}/{self.total}", f"{self.metric} {row[f'{self.metric}_mean']:.4f}"]
        loss = row.get("loss_mean", row.get("train_loss"))
        if isinstance(loss, int | float):
            parts.append(f"loss {loss:.4f}")
        wall = float(row.get("wall_time", float("nan")))
        spent = wall - self.elapsed0  # this process's share: a resumed run counts from where it resumed
        done = r - self.start + 1
        parts.append(f"elapsed {duration(wall)}")
        parts.append(f"ETA {duration(spent / done * (self.total - r)) if done > 0 else '?'}")
        return "  ".join(parts)

    def close(self) -> None:
        self.bar.close()
