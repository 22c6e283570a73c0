"""Read run folders and experiment folders (seeds of one config) the way reports need them.

Only what the runner wrote is read (``config.yaml``, ``metrics.jsonl``, ``summary.json``,
``experiment.json``), so runs from any engine and runs killed half-way read alike: a missing
``summary.json`` is recomputed from the rows, and a partial last line of ``metrics.jsonl`` is
skipped."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedmtl.errors import RunDirError

#: Metrics where a smaller value is better; every other metric is taken as higher-is-better.
LOWER_IS_BETTER = frozenset({"loss", "rmse", "mae", "mse"})
#: Client-row columns shown first, in this order; any other numeric key follows alphabetically.
CLIENT_METRIC_ORDER = ("loss", "accuracy", "precision", "recall", "f1", "rmse", "r2")
#: Client-row keys that identify the row rather than measure something.
CLIENT_ID_KEYS = frozenset({"round", "kind", "client", "n_test"})
#: Decimal megabytes, so numbers match what network tools print.
BYTES_PER_MB = 1e6
MISSING = "—"


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
        return [r for r in self.rounds if is_number(r.get(key))]

    def final_clients(self) -> list[dict[str, Any]]:
        """Client rows of the final evaluated round, sorted by client id."""
        rnd = self.final.get("round")
        rows = [c for c in self.clients if c.get("round") == rnd]
        return sorted(rows, key=lambda c: sort_key(c.get("client")))


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
            clients[(row["round"], hashable(row.get("client")))] = row
    round_rows = [rounds[k] for k in sorted(rounds)]
    client_rows = [clients[k] for k in sorted(clients, key=lambda k: (k[0], sort_key(k[1])))]
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
    evaluated = [r for r in run.rounds if is_number(r.get(key))]

    final = summary.get("final")
    if not (isinstance(final, dict) and is_number(final.get(key))):
        final = evaluated[-1] if evaluated else {}
    best = summary.get("best")
    if not (isinstance(best, dict) and is_number(best.get(key))):
        best = _best_row(evaluated, key, higher)

    rounds_done = summary.get("rounds_completed")
    if not isinstance(rounds_done, int):
        rounds_done = max((r["round"] for r in run.rounds), default=0)
    wall = summary.get("wall_time")
    if not is_number(wall):
        walls = [r["wall_time"] for r in run.rounds if is_number(r.get("wall_time"))]
        wall = walls[-1] if walls else None
    total = summary.get("bytes_total")
    if not is_number(total):
        total = sum(num(r.get("bytes_up")) + num(r.get("bytes_down")) for r in run.rounds)

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


def is_number(value: Any) -> bool:
    """True for real numbers (bools are flags, not metrics)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def num(value: Any) -> float:
    """A number or 0, for summing counters that may be missing."""
    return float(value) if is_number(value) else 0.0


def hashable(value: Any) -> Any:
    """Client ids are ints or strings; anything else is keyed by its JSON text."""
    return value if isinstance(value, int | str | float) else json.dumps(value, sort_keys=True)


def sort_key(value: Any) -> tuple[int, Any]:
    """Numbers before strings, so client 2 sorts before client 10."""
    return (0, value) if is_number(value) else (1, str(value))


def fmt_metric(value: Any) -> str:
    """Metrics to 4 decimals; missing values as a dash."""
    return f"{value:.4f}" if is_number(value) else MISSING


def fmt_mb(value: Any) -> str:
    """Bytes as megabytes to 2 decimals."""
    return f"{value / BYTES_PER_MB:.2f}" if is_number(value) else MISSING


def fmt_seconds(value: Any) -> str:
    """Wall time in seconds, to one decimal."""
    return f"{value:.1f} s" if is_number(value) else MISSING


def fmt_cell(key: str, value: Any) -> str:
    """Client-table cell: ids and counts as-is, measurements to 4 decimals."""
    if key in ("client", "n_test", "round"):
        return MISSING if value is None else str(value)
    return fmt_metric(value)


# --------------------------------------------------------------------------------------------- entries


@dataclass
class Entry:
    """What one table row and one plotted series stand for: a run, or an experiment (one config
    over several seeds, shown as mean ± std over them)."""

    name: str
    path: Path
    runs: list[Run]
    experiment: bool = False

    @property
    def primary(self) -> str:
        return self.runs[0].primary

    @property
    def higher(self) -> bool:
        return bool(self.runs[0].stats["higher_is_better"])

    @property
    def seeds(self) -> list[Any]:
        return [r.config.get("seed", (r.summary or {}).get("seed")) for r in self.runs]

    def finals(self, key: str) -> list[float]:
        """``key`` of each run's final row (runs without it left out)."""
        return [float(r.final[key]) for r in self.runs if is_number(r.final.get(key))]

    def bests(self, key: str) -> list[float]:
        return [float(r.best[key]) for r in self.runs if is_number(r.best.get(key))]

    def stat(self, key: str) -> list[float]:
        """A summary statistic (``wall_time``, ``bytes_total``, ...) of each run."""
        return [float(r.stats[key]) for r in self.runs if is_number(r.stats.get(key))]

    def curve(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Rounds, mean and std over runs of round-row ``key`` at the rounds every run has it (a
        single run: std 0)."""
        per_run = [
            {r["round"]: float(r[key]) for r in run.rounds if is_number(r.get(key))} for run in self.runs
        ]
        common = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
        if not common:
            return None
        values = np.array([[p[x] for x in common] for p in per_run], dtype=float)
        return np.asarray(common, dtype=float), values.mean(axis=0), values.std(axis=0)

    def final_clients(self) -> list[dict[str, Any]]:
        """Every run's client rows at its final evaluated round."""
        return [c for r in self.runs for c in r.final_clients()]


def load_entry(path: Path | str) -> Entry:
    """A run folder, or an experiment folder (``fedmtl run --seeds``) as one entry of its seeds."""
    from fedmtl.experiment.seeds import is_experiment, read_experiment

    path = Path(path)
    if not is_experiment(path):
        run = load_run(path)
        return Entry(run.name, path, [run])
    doc = read_experiment(path)
    runs = [
        load_run(path / doc["runs"][str(s)]) for s in doc["seeds"] if (path / doc["runs"][str(s)]).is_dir()
    ]
    if not runs:
        raise RunDirError(f"experiment folder {path} holds no run yet")
    base = str(doc.get("name") or path.name)
    algorithm = str(doc.get("algorithm") or "")
    name = (f"{base} ({algorithm})" if algorithm else base) + f", {len(runs)} seeds"
    return Entry(name, path, runs, experiment=True)


def load_entries(paths: Iterable[Path | str]) -> list[Entry]:
    """Every folder as an entry, failing on the first unreadable one; equal names get their folder."""
    entries = [load_entry(p) for p in paths]
    if not entries:
        raise RunDirError("no run directory given")
    counts: dict[str, int] = {}
    for e in entries:
        counts[e.name] = counts.get(e.name, 0) + 1
    for e in entries:
        if counts[e.name] > 1:
            e.name = f"{e.name} [{e.path.name}]"
    return entries
