"""The report's figures: every series stays visible, experiments carry their spread over seeds.

Each entry (a run, or an experiment over seeds) keeps one colour, line style and marker in every
figure. Entries are drawn first-widest, so two series that coincide (same-seed FedAvg and Ditto
share their global model's curve) show as a wide line with a narrower one of another colour and
marker on top, never as one line under two legend entries. A run's band is its worst..best 10% of
clients; an experiment's curve is the mean over seeds and its band ± one std over seeds. Figures
are drawn on the Agg canvas (no pyplot, no display, no global state)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from fedmtl.experiment.reading import BYTES_PER_MB, Entry, is_number, num

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
MARKER_NAMES = dict(
    zip(MARKERS, ("circles", "squares", "triangles", "diamonds", "down-triangles", "pluses", "crosses",
                  "stars", "left-triangles", "right-triangles"), strict=True)
)  # fmt: skip
LINESTYLES = (("-", "solid"), ("--", "dashed"), ("-.", "dash-dot"))
COLOURS = ("blue", "orange", "green", "red", "purple", "brown", "pink", "grey", "olive", "cyan")
WIDTH_IN = 12.0  # inches at 100 dpi: 1200 px, the report's full width


@dataclass(frozen=True)
class Style:
    """How one entry is drawn in every figure."""

    colour: str
    marker: str
    linestyle: str
    width: float
    size: float
    z: int
    description: str


def styles(entries: Sequence[Entry]) -> list[Style]:
    n = len(entries)
    out = []
    for i in range(n):
        ls, ls_name = LINESTYLES[i % len(LINESTYLES)]
        marker = MARKERS[i % len(MARKERS)]
        rank = n - 1 - i  # the first entry drawn widest, underneath the others
        out.append(
            Style(
                colour=f"C{i % 10}",
                marker=marker,
                linestyle=ls,
                width=min(1.5 + 1.2 * rank, 6.0),
                size=min(4.0 + 2.0 * rank, 12.0),
                z=2 + i,
                description=f"{COLOURS[i % 10]} {ls_name} line, {MARKER_NAMES[marker]}",
            )
        )
    return out


def legend_text(entries: Sequence[Entry], shown: Sequence[Entry] | None = None) -> list[tuple[str, str]]:
    """(entry name, how it is drawn) for the entries a figure shows (default: all), for the page's
    text beside it; styles are the entries' own, as in every figure."""
    pairs = zip(entries, styles(entries), strict=True)
    return [(e.name, s.description) for e, s in pairs if shown is None or any(e is x for x in shown)]


def _figure(ncols: int, height: float = 4.8) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(max(WIDTH_IN, 6.0 * ncols), height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def _label(text: str) -> str:
    """Plot-safe name: ``$`` would start mathtext, a leading ``_`` hides the legend entry."""
    text = text.replace("$", r"\$")
    return f" {text}" if text.startswith("_") else text


def _no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")


def _by_metric(entries: Sequence[Entry]) -> list[tuple[str, list[int]]]:
    """Entries grouped by primary metric, so accuracy and RMSE never share an axis."""
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        groups.setdefault(e.primary, []).append(i)
    return list(groups.items())


def _line(ax: Axes, x: np.ndarray, y: np.ndarray, s: Style, label: str, dotted: bool = False) -> None:
    ax.plot(
        x,
        y,
        color=s.colour,
        linestyle=":" if dotted else s.linestyle,
        linewidth=s.width,
        marker=s.marker,
        markersize=s.size,
        markerfacecolor="none" if dotted else s.colour,
        markeredgewidth=1.5 if dotted else 1.0,
        markevery=max(1, len(x) // 12),
        zorder=s.z,
        label=_label(label),
    )


def _band(ax: Axes, x: np.ndarray, lo: np.ndarray, hi: np.ndarray, s: Style) -> None:
    ax.fill_between(x, lo, hi, color=s.colour, alpha=0.12, linewidth=0, zorder=1)


def _finish(ax: Axes, drawn: bool) -> None:
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize="small")
    else:
        _no_data(ax)


def plot_metric(entries: Sequence[Entry], path: Path) -> None:
    """Client-mean primary metric per round, with its band; the global test set dotted."""
    groups = _by_metric(entries)
    st = styles(entries)
    fig, axes = _figure(len(groups))
    for ax, (pm, members) in zip(axes, groups, strict=True):
        drawn = False
        for i in members:
            e, s = entries[i], st[i]
            curve = e.curve(f"{pm}_mean")
            if curve is None:
                continue
            drawn = True
            x, mean, std = curve
            if e.experiment:
                _band(ax, x, mean - std, mean + std, s)
            else:
                band = [e.curve(f"{pm}_worst10"), e.curve(f"{pm}_best10")]
                if band[0] is not None and band[1] is not None and len(band[0][0]) == len(band[1][0]):
                    _band(ax, band[0][0], band[0][1], band[1][1], s)
            _line(ax, x, mean, s, e.name)
            glob = e.curve(f"global_{pm}")
            if glob is not None:
                _line(ax, glob[0], glob[1], s, f"{e.name} (global test)", dotted=True)
        ax.set_xlabel("round")
        ax.set_ylabel(f"{pm} (client mean)")
        _finish(ax, drawn)
    fig.savefig(path, dpi=100)


def plot_clients(entries: Sequence[Entry], path: Path) -> None:
    """Spread of the primary metric over clients at the final round (an experiment: all seeds)."""
    groups = _by_metric(entries)
    st = styles(entries)
    fig, axes = _figure(len(groups))
    rng = np.random.default_rng(0)  # fixed jitter: identical reports for identical runs
    for ax, (pm, members) in zip(axes, groups, strict=True):
        data, labels, used = [], [], []
        for i in members:
            values = [
                c[pm] for c in entries[i].final_clients() if is_number(c.get(pm)) and math.isfinite(c[pm])
            ]
            if values:
                data.append(np.asarray(values, dtype=float))
                labels.append(_label(entries[i].name))
                used.append(st[i])
        if not data:
            _no_data(ax)
        else:
            positions = np.arange(1, len(data) + 1)
            ax.boxplot(data, positions=positions, widths=0.5, showfliers=False)
            for pos, values, s in zip(positions, data, used, strict=True):
                jitter = rng.uniform(-0.12, 0.12, size=len(values))
                ax.scatter(pos + jitter, values, s=16, color=s.colour, marker=s.marker, alpha=0.7, zorder=3)
            ax.set_xticks(positions, labels, fontsize="small")
        ax.set_ylabel(f"{pm} per client (final round)")
        ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=100)


def plot_bytes(entries: Sequence[Entry], path: Path) -> None:
    """Communication against quality: cumulative MB (up + down) vs the client-mean primary metric."""
    groups = _by_metric(entries)
    st = styles(entries)
    fig, axes = _figure(len(groups))
    for ax, (pm, members) in zip(axes, groups, strict=True):
        drawn = False
        for i in members:
            xs, ys = [], []
            for run in entries[i].runs:
                total, x, y = 0.0, [], []
                for row in run.rounds:
                    total += num(row.get("bytes_up")) + num(row.get("bytes_down"))
                    if is_number(row.get(f"{pm}_mean")):
                        x.append(total / BYTES_PER_MB)
                        y.append(row[f"{pm}_mean"])
                xs.append(x)
                ys.append(y)
            n = min((len(x) for x in xs), default=0)
            if n:
                drawn = True
                x = np.mean([v[:n] for v in xs], axis=0)
                y = np.mean([v[:n] for v in ys], axis=0)
                _line(ax, x, y, st[i], entries[i].name)
        ax.set_xlabel("cumulative MB (up + down)")
        ax.set_ylabel(f"{pm} (client mean)")
        _finish(ax, drawn)
    fig.savefig(path, dpi=100)


def plot_loss(entries: Sequence[Entry], path: Path) -> None:
    """Loss per round of the models each run reports (each client's own model on its test split:
    a personalised method's personal models), and dotted the training loss of the local updates."""
    st = styles(entries)
    fig, (ax,) = _figure(1)
    drawn = False
    for e, s in zip(entries, st, strict=True):
        curve = e.curve("loss_mean")
        if curve is not None:
            drawn = True
            x, mean, std = curve
            if e.experiment:
                _band(ax, x, mean - std, mean + std, s)
            _line(ax, x, mean, s, f"{e.name} (models reported, test)")
        train = e.curve("train_loss")
        if train is not None:
            drawn = True
            _line(ax, train[0], train[1], s, f"{e.name} (local training)", dotted=True)
    ax.set_xlabel("round")
    ax.set_ylabel("loss")
    _finish(ax, drawn)
    fig.savefig(path, dpi=100)


def has_personal(entries: Sequence[Entry]) -> bool:
    return any(e.finals("gain_mean") or e.finals(f"new_after_{e.primary}_mean") for e in entries)


def plot_personal(entries: Sequence[Entry], path: Path) -> None:
    """Left: each client's gain of its own model over the shared one at the final round. Right:
    held-out clients' primary metric before and after adapting the shared model (± std over seeds)."""
    st = styles(entries)
    fig, (left, right) = _figure(2)
    rng = np.random.default_rng(0)
    data, labels, used = [], [], []
    for e, s in zip(entries, st, strict=True):
        gains = [
            c["gain"] for c in e.final_clients() if is_number(c.get("gain")) and math.isfinite(c["gain"])
        ]
        if gains:
            data.append(np.asarray(gains, dtype=float))
            labels.append(_label(e.name))
            used.append(s)
    if data:
        positions = np.arange(1, len(data) + 1)
        left.boxplot(data, positions=positions, widths=0.5, showfliers=False)
        for pos, values, s in zip(positions, data, used, strict=True):
            jitter = rng.uniform(-0.12, 0.12, size=len(values))
            left.scatter(pos + jitter, values, s=16, color=s.colour, marker=s.marker, alpha=0.7, zorder=3)
        left.axhline(0.0, color="grey", linewidth=1)
        left.set_xticks(positions, labels, fontsize="small")
    else:
        _no_data(left)
    left.set_ylabel("gain per client: own model - shared model (final round)")
    left.grid(alpha=0.3, axis="y")

    bars = [(e, s) for e, s in zip(entries, st, strict=True) if e.finals(f"new_after_{e.primary}_mean")]
    if bars:
        for j, (e, s) in enumerate(bars):
            for k, (when, hatch) in enumerate((("before", "//"), ("after", ""))):
                vals = e.finals(f"new_{when}_{e.primary}_mean")
                right.bar(
                    j + (k - 0.5) * 0.38,
                    float(np.mean(vals)),
                    width=0.36,
                    yerr=float(np.std(vals)) if len(vals) > 1 else None,
                    color=s.colour,
                    alpha=0.45 if when == "before" else 0.9,
                    hatch=hatch,
                    edgecolor="black",
                )
        right.set_xticks(range(len(bars)), [_label(e.name) for e, _ in bars], fontsize="small")
        right.set_ylabel(f"held-out clients' {bars[0][0].primary} (mean)")
        right.set_ylim(top=right.get_ylim()[1] * 1.2)  # room for the legend above the bars
        key = [
            Patch(facecolor="white", edgecolor="black", hatch="//", label="before adapting (hatched)"),
            Patch(facecolor="grey", edgecolor="black", label="after adapting (solid)"),
        ]
        right.legend(handles=key, fontsize="small", loc="upper center", ncols=2)
    else:
        _no_data(right)
    right.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=100)
