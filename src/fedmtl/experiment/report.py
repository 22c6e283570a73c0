"""``fedmtl report``: one HTML page with tables and figures for runs and experiments.

Reading lives in ``reading`` (runs, experiments over seeds), the table rows in ``tables`` (shared
with ``fedmtl compare``), the figures in ``plots``; this module lays them out. Every figure has its
legend also as text beside it, so the page says which series is which without reading the image."""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fedmtl.errors import RunDirError
from fedmtl.experiment import plots
from fedmtl.experiment.reading import Entry, Run, fmt_cell, fmt_metric, load_entries, load_run
from fedmtl.experiment.tables import (
    SEEDS_NOTE,
    SUMMARY_COLUMNS,
    client_columns,
    compare_runs,
    personal_cells,
    personal_columns,
    spread,
    table,
    write_compare,
)

__all__ = ["SUMMARY_COLUMNS", "Run", "compare_runs", "load_run", "write_compare", "write_report"]

PNG_METRIC = "report_metric.png"
PNG_CLIENTS = "report_clients.png"
PNG_BYTES = "report_bytes.png"
PNG_LOSS = "report_loss.png"
PNG_PERSONAL = "report_personal.png"

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
.wide { overflow-x: auto; }
th { background: #f2f2f2; }
td:first-child, th:first-child { text-align: left; }
img { width: 100%; max-width: 1400px; border: 1px solid #eee; margin: 0.5em 0; }
code { background: #f5f5f5; padding: 0 0.2em; }
.note, .legend { color: #666; font-size: 0.9em; }
.legend li { margin: 0.1em 0; }
"""


def _html_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A plain HTML table with every cell escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>\n" for row in rows)
    return (
        f'<div class="wide"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table></div>'
    )


def _client_table(run: Run, title: str) -> str:
    """Per-client table of one run's final evaluated round."""
    rows = run.final_clients()
    head = f"<h3>{html.escape(title)}</h3>"
    if not rows:
        return head + '<p class="note">No client evaluation rows for the final round.</p>'
    cols = ["client", "n_test", *client_columns(rows)]
    cells = [[fmt_cell(k, r.get(k)) for k in cols] for r in rows]
    note = f'<p class="note">Round {html.escape(str(run.final.get("round")))}, {len(rows)} clients.</p>'
    return head + note + _html_table(cols, cells)


def _client_section(e: Entry) -> str:
    if not e.experiment:
        return _client_table(e.runs[0], e.name)
    parts = [f"<h3>{html.escape(e.name)}</h3>"]
    for run, seed in zip(e.runs, e.seeds, strict=True):
        inner = _client_table(run, f"seed {seed}").replace("<h3>", "<h4>").replace("</h3>", "</h4>")
        parts.append(f"<details><summary>seed {html.escape(str(seed))}</summary>{inner}</details>")
    return "".join(parts)


_TASK_KEY = re.compile(r"^task_(?P<task>.+)_(?P<metric>accuracy|rmse|r2|gain|miou|psnr)_mean$")


def _task_section(entries: Sequence[Entry]) -> str:
    """Per-task client means at the final round, for multi-task federations (empty otherwise): the
    primary-metric summary only covers the tasks that share the primary metric."""
    rows: list[list[str]] = []
    metrics: list[str] = []
    found: list[tuple[Entry, dict[str, list[str]]]] = []
    for e in entries:
        per_task: dict[str, list[str]] = {}
        for key in e.runs[0].final:
            m = _TASK_KEY.match(key)
            if m is not None:
                per_task.setdefault(m["task"], []).append(m["metric"])
                if m["metric"] not in metrics:
                    metrics.append(m["metric"])
        if per_task:
            found.append((e, per_task))
    if not found:
        return ""
    for e, per_task in found:
        for task, have in per_task.items():
            cells = [
                spread(e.finals(f"task_{task}_{k}_mean"), fmt_metric) if k in have else "—" for k in metrics
            ]
            rows.append([e.name, task, *cells])
    return "<h2>Per task at the final round</h2>" + _html_table(["run", "task", *metrics], rows)


def _personal_section(entries: Sequence[Entry], figure: str | None) -> str:
    """What personalisation did: each client's own model against the shared one, the share of
    clients it hurts, and held-out clients before and after adapting (empty when no run has these)."""
    columns = personal_columns(entries)
    if not columns:
        return ""
    with_them = [e for e in entries if any(c != "—" for c in personal_cells(e, columns))]
    header = ["run", "own models (final mean)", *(h for h, _ in columns)]
    rows = [
        [e.name, spread(e.finals(f"{e.primary}_mean"), fmt_metric), *personal_cells(e, columns)]
        for e in with_them
    ]
    note = (
        "<p class=\"note\">Gain: each client's own model minus the shared model on the client's test "
        "split (in the primary metric, sign flipped where lower is better); clients hurt: the share "
        "with a negative gain; new clients: held-out clients that never trained, evaluated with the "
        "shared model before and after a few steps of adapting its head.</p>"
    )
    parts = ["<h2>Personalisation</h2>", _html_table(header, rows), note]
    if figure is not None:
        parts.append(_figure(figure, "Personalisation at the final round", entries, with_them))
    return "".join(parts)


def _figure(
    filename: str, caption: str, entries: Sequence[Entry], shown: Sequence[Entry] | None = None
) -> str:
    src = html.escape(filename, quote=True)
    legend = "".join(
        f"<li>{html.escape(name)}: {html.escape(how)}</li>" for name, how in plots.legend_text(entries, shown)
    )
    return (
        f'<h3>{html.escape(caption)}</h3><img src="{src}" alt="{html.escape(caption)}">'
        f'<ul class="legend">{legend}</ul>'
    )


def write_report(run_dirs: Sequence[Path | str], out_dir: Path | None = None) -> Path:
    """Write ``report.html`` and its PNGs into ``out_dir`` (default: the first folder given)."""
    entries = load_entries(run_dirs)
    out = Path(out_dir) if out_dir is not None else entries[0].path
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot create report directory {out}: {exc.strerror or exc}") from exc

    figures: list[tuple[str, Any, str]] = [
        (
            PNG_METRIC,
            plots.plot_metric,
            "Primary metric (client mean) per round; band: a run's worst..best 10% of clients, an "
            "experiment's ± std over seeds; dotted: the global test set",
        ),
        (PNG_CLIENTS, plots.plot_clients, "Per-client primary metric at the final evaluated round"),
        (PNG_BYTES, plots.plot_bytes, "Cumulative communication vs primary metric"),
        (PNG_LOSS, plots.plot_loss, "Loss per round: the models each run reports, and local training"),
    ]
    personal = plots.has_personal(entries)
    try:
        for filename, plot, _ in figures:
            plot(entries, out / filename)
        if personal:
            plots.plot_personal(entries, out / PNG_PERSONAL)
    except OSError as exc:
        raise RunDirError(f"cannot write plots into {out}: {exc.strerror or exc}") from exc

    header, rows = table(entries, personal=False)  # personalisation has a section of its own
    notes = (
        "Final = last evaluated round; std (clients) and worst/best-10% = over clients as logged by "
        "the runner; ↑/↓ = higher/lower is better; MB = 10<sup>6</sup> bytes, up + down."
    )
    if any(e.experiment for e in entries):
        notes += " " + html.escape(SEEDS_NOTE)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>fedmtl report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>fedmtl report</h1>",
        "<ul>"
        + "".join(f"<li>{html.escape(e.name)}: <code>{html.escape(str(e.path))}</code></li>" for e in entries)
        + "</ul>",
        "<h2>Summary</h2>",
        _html_table(header, rows),
        f'<p class="note">{notes}</p>',
        _personal_section(entries, PNG_PERSONAL if personal else None),
        "<h2>Plots</h2>",
    ]
    parts += [_figure(filename, caption, entries) for filename, _, caption in figures]
    parts.append(_task_section(entries))
    parts.append("<h2>Clients at the final round</h2>")
    parts += [_client_section(e) for e in entries]
    parts.append("</body></html>\n")

    report = out / "report.html"
    try:
        report.write_text("\n".join(parts), encoding="utf-8")
    except OSError as exc:
        raise RunDirError(f"cannot write {report}: {exc.strerror or exc}") from exc
    return report
