"""Read finished (or killed) run directories and turn them into an HTML report or a Markdown table.

The report only reads what the runner wrote (``config.yaml``, ``metrics.jsonl``, ``summary.json``), so it
works on runs from any engine and on runs that were killed half-way: a missing ``summary.json`` is
recomputed from the rows, and a partial last line in ``metrics.jsonl`` is skipped.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedmtl.errors import RunDirError

__all__ = ["Run", "compare_runs", "load_run", "write_compare", "write_report"]

#: Metrics where a smaller value is better; every other metric is taken as higher-is-better.
LOWER_IS_BETTER = frozenset({"loss", "rmse", "mae", "mse"})
#: Client-row columns shown first, in this order; any other numeric key follows alphabetically.
CLIENT_METRIC_ORDER = ("loss", "accuracy", "precision", "recall", "f1", "rmse", "r2")
#: Client-row keys that identify the row rather than measure something.
CLIENT_ID_KEYS = frozenset({"round", "kind", "client", "n_test"})
#: Decimal megabytes, so numbers match what network tools print.
BYTES_PER_MB = 1e6
MISSING = "—"

SUMMARY_COLUMNS = (
    "Run",
    "Algorithm",
    "Dataset",
    "Metric",
    "Rounds",
    "Final mean",
    "Final std",
    "Final worst-10%",
    "Final best-10%",
    "Best round",
    "Best mean",
    "Global (final)",
    "Total MB",
    "Wall time",
)

PNG_METRIC = "report_metric.png"
PNG_CLIENTS = "report_clients.png"
PNG_BYTES = "report_bytes.png"
PNG_TRAIN_LOSS = "report_train_loss.png"


@dataclass
class Run:
    """One run directory, parsed once so every table and plot reads the same numbers."""

    path: Path
    name: str
    config: dict[str, Any]
    rounds: list[dict[str, Any]]
    clients: list[dict[str, Any]]
    #: ``summary.json`` as written by the runner, or ``None`` for an unfinished run.
    summary: dict[str, Any] | None
    #: The summary actually used for reporting: ``summary.json`` where present, else computed from rows.
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def primary(self) -> str:
        """Name of the metric the run is judged on (``accuracy``, ``rmse``, ...)."""
        return str(self.stats.get("primary_metric", "accuracy"))

    @property
    def final(self) -> dict[str, Any]:
        """Round row of the last evaluated round (empty if nothing was evaluated)."""
        return self.stats.get("final") or {}

    @property
    def best(self) -> dict[str, Any]:
        """Round row with the best mean primary metric (empty if nothing was evaluated)."""
        return self.stats.get("best") or {}

    def evaluated_rounds(self) -> list[dict[str, Any]]:
        """Round rows that carry the primary metric, in round order."""
        key = f"{self.primary}_mean"
        return [r for r in self.rounds if _is_number(r.get(key))]

    def final_clients(self) -> list[dict[str, Any]]:
        """Client rows of the final evaluated round, sorted by client id."""
        rnd = self.final.get("round")
        rows = [c for c in self.clients if c.get("round") == rnd]
        return sorted(rows, key=lambda c: _sort_key(c.get("client")))


# --------------------------------------------------------------------------------------------- loading


def load_run(run_dir: Path | str) -> Run:
    """Parse one run directory; raise ``RunDirError`` naming the path when it cannot be read."""
    path = Path(run_dir)
    if not path.exists():
        raise RunDirError(f"run directory {path} does not exist")
    if not path.is_dir():
        raise RunDirError(f"run directory {path} is not a directory")
    metrics_path = path / "metrics.jsonl"
    if not metrics_path.is_file():
        raise RunDirError(f"run directory {path} has no metrics.jsonl (not a fedmtl run?)")

    config = _read_config(path / "config.yaml")
    rounds, clients = _read_metrics(metrics_path)
    summary = _read_summary(path / "summary.json")

    algorithm = _algorithm_name(config) or str((summary or {}).get("algorithm") or "")
    base = str(config.get("name") or (summary or {}).get("name") or path.name)
    name = f"{base} ({algorithm})" if algorithm else base
    run = Run(path=path, name=name, config=config, rounds=rounds, clients=clients, summary=summary)
    run.stats = _resolve_stats(run, algorithm)
    return run


def _read_text(path: Path) -> str:
    """Read a run file, turning OS errors into a one-line ``RunDirError``."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise RunDirError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _read_config(path: Path) -> dict[str, Any]:
    """The resolved config; an absent file is tolerated (names then fall back to the directory)."""
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as exc:
        raise RunDirError(f"cannot parse {path}: {str(exc).splitlines()[0]}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RunDirError(f"cannot parse {path}: expected a mapping, got {type(data).__name__}")
    return data


def _read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Round and client rows; later rows for the same round (a resumed run) replace earlier ones."""
    rounds: dict[int, dict[str, Any]] = {}
    clients: dict[tuple[int, Any], dict[str, Any]] = {}
    for line in _read_text(path).splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a partial line from a killed run
        if not isinstance(row, dict) or not isinstance(row.get("round"), int):
            continue
        if row.get("kind") == "round":
            rounds[row["round"]] = row
        elif row.get("kind") == "client":
            clients[(row["round"], _hashable(row.get("client")))] = row
    round_rows = [rounds[k] for k in sorted(rounds)]
    client_rows = [clients[k] for k in sorted(clients, key=lambda k: (k[0], _sort_key(k[1])))]
    return round_rows, client_rows


def _read_summary(path: Path) -> dict[str, Any] | None:
    """``summary.json`` or ``None``; a half-written file is treated as absent and recomputed."""
    if not path.is_file():
        return None
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _algorithm_name(config: dict[str, Any]) -> str:
    """``algorithm.name`` from the config, accepting a bare string too."""
    algo = config.get("algorithm")
    if isinstance(algo, dict):
        return str(algo.get("name") or "")
    return str(algo or "")


def _dataset_name(config: dict[str, Any]) -> str:
    """``data.dataset`` from the config."""
    data = config.get("data")
    return str(data.get("dataset") or "") if isinstance(data, dict) else ""


def _infer_primary(rounds: Sequence[dict[str, Any]]) -> str:
    """Guess the primary metric from the round rows when there is no summary to say it."""
    keys = {k for r in rounds for k in r if k.endswith("_mean")}
    for candidate in ("accuracy", "rmse"):
        if f"{candidate}_mean" in keys:
            return candidate
    others = sorted(k[: -len("_mean")] for k in keys if not k.startswith(("global_", "train_")))
    return others[0] if others else "accuracy"


def _resolve_stats(run: Run, algorithm: str) -> dict[str, Any]:
    """Merge ``summary.json`` with what the rows say, so unfinished runs report the same fields."""
    summary = run.summary or {}
    primary = str(summary.get("primary_metric") or _infer_primary(run.rounds))
    hib = summary.get("higher_is_better")
    higher = bool(hib) if isinstance(hib, bool) else primary not in LOWER_IS_BETTER
    key = f"{primary}_mean"
    evaluated = [r for r in run.rounds if _is_number(r.get(key))]

    final = summary.get("final")
    if not (isinstance(final, dict) and _is_number(final.get(key))):
        final = evaluated[-1] if evaluated else {}
    best = summary.get("best")
    if not (isinstance(best, dict) and _is_number(best.get(key))):
        best = _best_row(evaluated, key, higher)

    rounds_done = summary.get("rounds_completed")
    if not isinstance(rounds_done, int):
        rounds_done = max((r["round"] for r in run.rounds), default=0)
    wall = summary.get("wall_time")
    if not _is_number(wall):
        walls = [r["wall_time"] for r in run.rounds if _is_number(r.get("wall_time"))]
        wall = walls[-1] if walls else None
    total = summary.get("bytes_total")
    if not _is_number(total):
        total = sum(_num(r.get("bytes_up")) + _num(r.get("bytes_down")) for r in run.rounds)

    return {
        "name": summary.get("name") or run.config.get("name") or run.path.name,
        "algorithm": summary.get("algorithm") or algorithm,
        "dataset": summary.get("dataset") or _dataset_name(run.config),
        "primary_metric": primary,
        "higher_is_better": higher,
        "rounds_completed": rounds_done,
        "final": final,
        "best": best,
        "wall_time": wall,
        "bytes_total": total,
        "finished": run.summary is not None,
    }


def _best_row(rows: Sequence[dict[str, Any]], key: str, higher: bool) -> dict[str, Any]:
    """Row with the best finite value of ``key``; ties go to the earliest round."""
    best: dict[str, Any] = {}
    for row in rows:
        value = row[key]
        if not math.isfinite(value):
            continue
        if not best or (value > best[key] if higher else value < best[key]):
            best = row
    return best


# --------------------------------------------------------------------------------------------- helpers


def _is_number(value: Any) -> bool:
    """True for real numbers (bools are flags, not metrics)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _num(value: Any) -> float:
    """A number or 0, for summing counters that may be missing."""
    return float(value) if _is_number(value) else 0.0


def _hashable(value: Any) -> Any:
    """Client ids are ints or strings; anything else is keyed by its JSON text."""
    return value if isinstance(value, int | str | float) else json.dumps(value, sort_keys=True)


def _sort_key(value: Any) -> tuple[int, Any]:
    """Numbers before strings, so client 2 sorts before client 10."""
    return (0, value) if _is_number(value) else (1, str(value))


def _fmt_metric(value: Any) -> str:
    """Metrics to 4 decimals; missing values as a dash."""
    return f"{value:.4f}" if _is_number(value) else MISSING


def _fmt_mb(value: Any) -> str:
    """Bytes as megabytes to 2 decimals."""
    return f"{value / BYTES_PER_MB:.2f}" if _is_number(value) else MISSING


def _fmt_seconds(value: Any) -> str:
    """Wall time in seconds, to one decimal."""
    return f"{value:.1f} s" if _is_number(value) else MISSING


def _fmt_cell(key: str, value: Any) -> str:
    """Client-table cell: ids and counts as-is, measurements to 4 decimals."""
    if key in ("client", "n_test", "round"):
        return MISSING if value is None else str(value)
    return _fmt_metric(value)


def _load_all(run_dirs: Iterable[Path | str]) -> list[Run]:
    """Load every run, failing on the first unreadable one; duplicate names get their directory."""
    runs = [load_run(d) for d in run_dirs]
    if not runs:
        raise RunDirError("no run directory given")
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.name] = counts.get(run.name, 0) + 1
    for run in runs:
        if counts[run.name] > 1:
            run.name = f"{run.name} [{run.path.name}]"
    return runs


def _summary_row(run: Run) -> list[str]:
    """One row of the summary table, shared by HTML and Markdown so both always agree."""
    final, best, s = run.final, run.best, run.stats
    pm = run.primary
    arrow = "↑" if s["higher_is_better"] else "↓"
    return [
        run.name,
        str(s["algorithm"] or MISSING),
        str(s["dataset"] or MISSING),
        f"{pm} {arrow}",
        str(s["rounds_completed"]) + ("" if s["finished"] else " (unfinished)") + _privacy_note(final),
        _fmt_metric(final.get(f"{pm}_mean")),
        _fmt_metric(final.get(f"{pm}_std")),
        _fmt_metric(final.get(f"{pm}_worst10")),
        _fmt_metric(final.get(f"{pm}_best10")),
        str(best.get("round", MISSING)),
        _fmt_metric(best.get(f"{pm}_mean")),
        _fmt_metric(final.get(f"global_{pm}")),
        _fmt_mb(s["bytes_total"]),
        _fmt_seconds(s["wall_time"]),
    ]


def _privacy_note(final: dict[str, Any]) -> str:
    """Epsilon at delta of a differentially private run (the accountant's value after the last round)."""
    if not _is_number(final.get("epsilon")):
        return ""
    how = f"; {final['dp_accounting']}" if final.get("dp_accounting") else ""
    return f" (ε = {final['epsilon']:.3g} at δ = {final.get('delta', float('nan')):.0e}{how})"


def _client_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Numeric client keys present in ``rows``: the usual metrics first, extras (``gain``...) after."""
    present = {k for r in rows for k, v in r.items() if k not in CLIENT_ID_KEYS and _is_number(v)}
    known = [k for k in CLIENT_METRIC_ORDER if k in present]
    return known + sorted(present - set(known))


# --------------------------------------------------------------------------------------------- markdown


def compare_runs(run_dirs: list[Path]) -> str:
    """Markdown table of the runs' final and best results, one row per run."""
    runs = _load_all(run_dirs)

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    lines += ["| " + " | ".join(cell(c) for c in _summary_row(run)) + " |" for run in runs]
    return "\n".join(lines) + "\n"


def write_compare(run_dirs: list[Path], out: Path) -> Path:
    """Write :func:`compare_runs` to ``out`` (parents created) and return the path."""
    text = compare_runs(run_dirs)
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise RunDirError(f"cannot write {out}: {exc.strerror or exc}") from exc
    return out


# --------------------------------------------------------------------------------------------- plots


def _new_figure(ncols: int, height: float = 4.0) -> tuple[Figure, list[Axes]]:
    """A figure on the Agg canvas (no pyplot, no display, no global state)."""
    fig = Figure(figsize=(6.0 * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _by_metric(runs: Sequence[Run]) -> list[tuple[str, list[tuple[int, Run]]]]:
    """Group runs by primary metric, so accuracy and RMSE never share an axis."""
    groups: dict[str, list[tuple[int, Run]]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(run.primary, []).append((i, run))
    return list(groups.items())


def _label(text: str) -> str:
    """Plot-safe run name: ``$`` would start mathtext, a leading ``_`` hides the legend entry."""
    text = text.replace("$", r"\$")
    return f" {text}" if text.startswith("_") else text


def _no_data(ax: Axes) -> None:
    """Say so on an empty panel instead of leaving a blank square."""
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")


def _plot_metric(runs: Sequence[Run], path: Path) -> None:
    """Mean primary metric per round, worst..best-10% band, global-test metric dashed."""
    groups = _by_metric(runs)
    fig, axes = _new_figure(len(groups))
    for ax, (pm, members) in zip(axes, groups, strict=True):
        drawn = False
        for i, run in members:
            rows = run.evaluated_rounds()
            if not rows:
                continue
            drawn = True
            color = f"C{i % 10}"
            x = np.array([r["round"] for r in rows], dtype=float)
            ax.plot(x, [r[f"{pm}_mean"] for r in rows], color=color, marker=".", label=_label(run.name))
            band = [
                r for r in rows if _is_number(r.get(f"{pm}_worst10")) and _is_number(r.get(f"{pm}_best10"))
            ]
            if band:
                ax.fill_between(
                    [r["round"] for r in band],
                    [r[f"{pm}_worst10"] for r in band],
                    [r[f"{pm}_best10"] for r in band],
                    color=color,
                    alpha=0.15,
                    linewidth=0,
                )
            glob = [r for r in rows if _is_number(r.get(f"global_{pm}"))]
            if glob:
                ax.plot(
                    [r["round"] for r in glob],
                    [r[f"global_{pm}"] for r in glob],
                    color=color,
                    linestyle="--",
                    label=_label(f"{run.name} (global test)"),
                )
        ax.set_xlabel("round")
        ax.set_ylabel(f"{pm} (client mean; band: worst..best 10%)")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize="small")
        else:
            _no_data(ax)
    fig.savefig(path, dpi=100)


def _plot_clients(runs: Sequence[Run], path: Path) -> None:
    """Spread of the primary metric over clients at each run's final evaluated round."""
    groups = _by_metric(runs)
    fig, axes = _new_figure(len(groups))
    rng = np.random.default_rng(0)  # fixed jitter: identical reports for identical runs
    for ax, (pm, members) in zip(axes, groups, strict=True):
        data, labels, colors = [], [], []
        for i, run in members:
            values = [c[pm] for c in run.final_clients() if _is_number(c.get(pm)) and math.isfinite(c[pm])]
            if values:
                data.append(np.asarray(values, dtype=float))
                labels.append(_label(f"{run.name}\n(round {run.final.get('round')})"))
                colors.append(f"C{i % 10}")
        if not data:
            _no_data(ax)
        else:
            positions = np.arange(1, len(data) + 1)
            ax.boxplot(data, positions=positions, widths=0.5, showfliers=False)
            for pos, values, color in zip(positions, data, colors, strict=True):
                jitter = rng.uniform(-0.12, 0.12, size=len(values))
                ax.scatter(pos + jitter, values, s=14, color=color, alpha=0.7, zorder=3)
            ax.set_xticks(positions, labels, fontsize="small")
        ax.set_ylabel(f"{pm} per client (final round)")
        ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=100)


def _plot_bytes(runs: Sequence[Run], path: Path) -> None:
    """Communication cost against quality: cumulative MB (up+down) vs mean primary metric."""
    groups = _by_metric(runs)
    fig, axes = _new_figure(len(groups))
    for ax, (pm, members) in zip(axes, groups, strict=True):
        drawn = False
        for i, run in members:
            total, xs, ys = 0.0, [], []
            for row in run.rounds:
                total += _num(row.get("bytes_up")) + _num(row.get("bytes_down"))
                if _is_number(row.get(f"{pm}_mean")):
                    xs.append(total / BYTES_PER_MB)
                    ys.append(row[f"{pm}_mean"])
            if xs:
                drawn = True
                ax.plot(xs, ys, color=f"C{i % 10}", marker=".", label=_label(run.name))
        ax.set_xlabel("cumulative MB (up + down)")
        ax.set_ylabel(f"{pm} (client mean)")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize="small")
        else:
            _no_data(ax)
    fig.savefig(path, dpi=100)


def _plot_train_loss(runs: Sequence[Run], path: Path) -> None:
    """Training loss per round, all runs on one axis."""
    fig, (ax,) = _new_figure(1)
    drawn = False
    for i, run in enumerate(runs):
        rows = [r for r in run.rounds if _is_number(r.get("train_loss"))]
        if rows:
            drawn = True
            ax.plot(
                [r["round"] for r in rows],
                [r["train_loss"] for r in rows],
                color=f"C{i % 10}",
                label=_label(run.name),
            )
    ax.set_xlabel("round")
    ax.set_ylabel("train loss")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize="small")
    else:
        _no_data(ax)
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------------------------- html

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
code { background: #f5f5f5; padding: 0 0.2em; }
.note { color: #666; font-size: 0.9em; }
"""


def _html_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A plain HTML table with every cell escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>\n" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def _client_section(run: Run) -> str:
    """Per-client table of one run's final evaluated round."""
    rows = run.final_clients()
    title = f"<h3>{html.escape(run.name)}</h3>"
    if not rows:
        return title + '<p class="note">No client evaluation rows for the final round.</p>'
    cols = ["client", "n_test", *_client_columns(rows)]
    cells = [[_fmt_cell(k, r.get(k)) for k in cols] for r in rows]
    note = f'<p class="note">Round {html.escape(str(run.final.get("round")))}, {len(rows)} clients.</p>'
    return title + note + _html_table(cols, cells)


_TASK_KEY = re.compile(r"^task_(?P<task>.+)_(?P<metric>accuracy|rmse|r2|gain|miou|psnr)_mean$")


def _task_section(runs: Sequence[Run]) -> str:
    """Per-task client means at the final round, for multi-task federations (empty otherwise): the
    primary-metric summary only covers the tasks that share the primary metric."""
    rows: list[list[str]] = []
    metrics: list[str] = []
    found: list[tuple[Run, dict[str, dict[str, Any]]]] = []
    for run in runs:
        per_task: dict[str, dict[str, Any]] = {}
        for key, value in run.final.items():
            m = _TASK_KEY.match(key)
            if m is not None:
                per_task.setdefault(m["task"], {})[m["metric"]] = value
                if m["metric"] not in metrics:
                    metrics.append(m["metric"])
        if per_task:
            found.append((run, per_task))
    if not found:
        return ""
    for run, per_task in found:
        for task, values in per_task.items():
            rows.append([run.name, task, *(_fmt_metric(values.get(k)) for k in metrics)])
    return "<h2>Per task at the final round</h2>" + _html_table(["run", "task", *metrics], rows)


def write_report(run_dirs: list[Path], out_dir: Path | None = None) -> Path:
    """Write ``report.html`` and its four PNGs into ``out_dir`` (default: the first run dir)."""
    runs = _load_all(run_dirs)
    out = Path(out_dir) if out_dir is not None else runs[0].path
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot create report directory {out}: {exc.strerror or exc}") from exc

    figures = [
        (PNG_METRIC, _plot_metric, "Primary metric (client mean) per round"),
        (PNG_CLIENTS, _plot_clients, "Per-client primary metric at the final evaluated round"),
        (PNG_BYTES, _plot_bytes, "Cumulative communication vs primary metric"),
        (PNG_TRAIN_LOSS, _plot_train_loss, "Training loss per round"),
    ]
    try:
        for filename, plot, _ in figures:
            plot(runs, out / filename)
    except OSError as exc:
        raise RunDirError(f"cannot write plots into {out}: {exc.strerror or exc}") from exc

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>fedmtl report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>fedmtl report</h1>",
        "<ul>"
        + "".join(f"<li>{html.escape(r.name)}: <code>{html.escape(str(r.path))}</code></li>" for r in runs)
        + "</ul>",
        "<h2>Summary</h2>",
        _html_table(SUMMARY_COLUMNS, (_summary_row(r) for r in runs)),
        '<p class="note">Final = last evaluated round; worst/best-10% = the worst/best tenth of clients '
        "as logged by the runner; ↑/↓ = higher/lower is better; MB = 10<sup>6</sup> bytes, up + down.</p>",
        "<h2>Plots</h2>",
    ]
    for filename, _, caption in figures:
        src = html.escape(filename, quote=True)
        parts.append(f'<h3>{html.escape(caption)}</h3><img src="{src}" alt="{html.escape(caption)}">')
    parts.append(_task_section(runs))
    parts.append("<h2>Clients at the final round</h2>")
    parts += [_client_section(r) for r in runs]
    parts.append("</body></html>\n")

    report = out / "report.html"
    try:
        report.write_text("\n".join(parts), encoding="utf-8")
    except OSError as exc:
        raise RunDirError(f"cannot write {report}: {exc.strerror or exc}") from exc
    return report
