"""The rows of ``fedmtl compare`` and of the report's tables, built once so Markdown and HTML agree.

A run's cells are its numbers; an experiment's (one config over several seeds) are ``mean ± std``
over seeds, so "Final std (clients)" stays the spread over clients and the ``±`` the spread over
seeds."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedmtl.errors import RunDirError
from fedmtl.experiment.reading import (
    BYTES_PER_MB,
    CLIENT_ID_KEYS,
    CLIENT_METRIC_ORDER,
    MISSING,
    Entry,
    is_number,
    load_entries,
)

SUMMARY_COLUMNS = (
    "Run",
    "Algorithm",
    "Dataset",
    "Metric",
    "Seeds",
    "Rounds",
    "Final mean",
    "Final std (clients)",
    "Final worst-10%",
    "Final best-10%",
    "Best round",
    "Best mean",
    "Global (final)",
    "Total MB",
    "Wall time",
)
#: shown when any entry has them: what personalisation did (round-row keys; {m}: primary metric)
PERSONAL_COLUMNS: tuple[tuple[str, str], ...] = (
    ("Personal gain", "gain_mean"),
    ("Gain worst-10%", "gain_worst10"),
    ("Clients hurt", "gain_negative_frac"),
    ("Shared model", "shared_{m}_mean"),
    ("New clients before", "new_before_{m}_mean"),
    ("New clients after", "new_after_{m}_mean"),
)


SEEDS_NOTE = "Rows over several seeds: mean ± std over seeds (ddof 0); rounds as their range."


def spread(values: Sequence[float], fmt: Callable[[float], str]) -> str:
    """One value as itself, several as ``mean ± std`` (std over seeds, ddof 0), none as a dash."""
    if not values:
        return MISSING
    if len(values) == 1:
        return fmt(values[0])
    arr = np.asarray(values, dtype=float)
    return f"{fmt(float(arr.mean()))} ± {fmt(float(arr.std()))}"


def _metric(v: float) -> str:
    return f"{v:.4f}"


def _rounds(values: Sequence[float]) -> str:
    if not values:
        return MISSING
    lo, hi = int(min(values)), int(max(values))
    return str(lo) if lo == hi else f"{lo}–{hi}"


def summary_row(e: Entry) -> list[str]:
    """One row of the summary table."""
    pm = e.primary
    arrow = "↑" if e.higher else "↓"
    unfinished = sum(not r.stats["finished"] for r in e.runs)
    note = "" if not unfinished else (" (unfinished)" if len(e.runs) == 1 else f" ({unfinished} unfinished)")
    stats = e.runs[0].stats
    return [
        e.name,
        str(stats["algorithm"] or MISSING),
        str(stats["dataset"] or MISSING),
        f"{pm} {arrow}",
        ", ".join(str(s) for s in e.seeds if s is not None) or MISSING,
        _rounds(e.stat("rounds_completed")) + note + privacy_note(e.runs[0].final),
        spread(e.finals(f"{pm}_mean"), _metric),
        spread(e.finals(f"{pm}_std"), _metric),
        spread(e.finals(f"{pm}_worst10"), _metric),
        spread(e.finals(f"{pm}_best10"), _metric),
        _rounds(e.bests("round")),
        spread(e.bests(f"{pm}_mean"), _metric),
        spread(e.finals(f"global_{pm}"), _metric),
        spread([b / BYTES_PER_MB for b in e.stat("bytes_total")], lambda v: f"{v:.2f}"),
        spread(e.stat("wall_time"), lambda v: f"{v:.1f}") + (" s" if e.stat("wall_time") else ""),
    ]


def personal_columns(entries: Sequence[Entry]) -> list[tuple[str, str]]:
    """The personalisation columns some entry has a value for (header, key with the metric filled in)."""
    out = []
    for header, key in PERSONAL_COLUMNS:
        if any(e.finals(key.format(m=e.primary)) for e in entries):
            out.append((header, key))
    return out


def personal_cells(e: Entry, columns: Sequence[tuple[str, str]]) -> list[str]:
    cells = []
    for _, key in columns:
        values = e.finals(key.format(m=e.primary))
        fmt = (lambda v: f"{v:.0%}") if key == "gain_negative_frac" else _metric
        cells.append(spread(values, fmt))
    return cells


def privacy_note(final: dict[str, Any]) -> str:
    """Epsilon at delta of a differentially private run (the accountant's value after the last round)."""
    if not is_number(final.get("epsilon")):
        return ""
    how = f"; {final['dp_accounting']}" if final.get("dp_accounting") else ""
    return f" (ε = {final['epsilon']:.3g} at δ = {final.get('delta', float('nan')):.0e}{how})"


def client_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Numeric client keys present in ``rows``: the usual metrics first, extras (``gain``...) after."""
    present = {k for r in rows for k, v in r.items() if k not in CLIENT_ID_KEYS and is_number(v)}
    known = [k for k in CLIENT_METRIC_ORDER if k in present]
    return known + sorted(present - set(known))


def table(entries: Sequence[Entry], personal: bool = True) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary: the fixed columns, then (``personal``) the personalisation
    columns where any entry has them."""
    extra = personal_columns(entries) if personal else []
    header = [*SUMMARY_COLUMNS, *(h for h, _ in extra)]
    return header, [summary_row(e) + personal_cells(e, extra) for e in entries]


def compare_runs(run_dirs: Sequence[Path | str]) -> str:
    """Markdown table of runs' and experiments' final and best results, one row each."""
    entries = load_entries(run_dirs)
    header, rows = table(entries)

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    if any(e.experiment for e in entries):
        lines += ["", SEEDS_NOTE]
    return "\n".join(lines) + "\n"


def write_compare(run_dirs: Sequence[Path | str], out: Path) -> Path:
    """Write :func:`compare_runs` to ``out`` (parents created) and return the path."""
    text = compare_runs(run_dirs)
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise RunDirError(f"cannot write {out}: {exc.strerror or exc}") from exc
    return out
