"""Runs and experiments as tables, in one call from a notebook.

``fedmtl.load_run(folder)`` and ``fedmtl.load_experiment(folder)`` return the rows of
``metrics.jsonl`` (round rows unless ``kind`` says otherwise) as a pandas DataFrame when pandas is
installed, else as a list of dicts; each row also says which run, algorithm and seed it comes from.
They read only the files a run writes, so killed and finished runs load alike."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from fedmtl.errors import ConfigError, RunDirError
from fedmtl.experiment.records import CONFIG, METRICS

KINDS = ("round", "client", "train", "new_client")


def _frame(rows: list[dict[str, Any]]) -> Any:
    try:
        import pandas as pd
    except ImportError:
        return rows
    return pd.DataFrame.from_records(rows)


def _config(path: Path) -> dict[str, Any]:
    try:
        cfg = yaml.safe_load((path / CONFIG).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def run_rows(run_dir: str | Path, kind: str | None = "round") -> list[dict[str, Any]]:
    """The rows of one run of ``kind`` (None: every row), each with ``run``, ``algorithm`` and
    ``seed`` in front; a partial last line (a killed run) is skipped."""
    if kind is not None and kind not in KINDS:
        raise ConfigError(f"load_run: kind = {kind!r}; allowed: {', '.join(KINDS)} or None (all rows)")
    path = Path(run_dir)
    metrics = path / METRICS
    if not metrics.is_file():
        raise RunDirError(f"{path} is not a fedmtl run folder (no {METRICS})")
    cfg = _config(path)
    algorithm = (cfg.get("algorithm") or {}).get("name") if isinstance(cfg.get("algorithm"), dict) else None
    front = {"run": path.name, "algorithm": algorithm, "seed": cfg.get("seed")}
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    with open(metrics, encoding="utf-8") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(row, dict) or (kind is not None and row.get("kind") != kind):
                continue
            key = (row.get("round"), row.get("kind"), json.dumps(row.get("client")))
            rows[key] = {**front, **row}  # a later line for the same round replaces an earlier one
    return list(rows.values())


def load_run(run_dir: str | Path, kind: str | None = "round") -> Any:
    """One run's rows of ``kind`` (``round``, ``client``, ``train``, ``new_client``; None: all) as a
    DataFrame (pandas installed) or a list of dicts."""
    return _frame(run_rows(run_dir, kind))


def experiment_runs(path: str | Path) -> list[Path]:
    """The run folders of an experiment (``fedmtl run --seeds``), in seed order; any other folder:
    the run folders directly inside it."""
    from fedmtl.experiment.seeds import is_experiment, read_experiment

    folder = Path(path)
    if is_experiment(folder):
        doc = read_experiment(folder)
        runs = [folder / doc["runs"][str(s)] for s in doc["seeds"]]
        return [r for r in runs if (r / METRICS).is_file()]
    if not folder.is_dir():
        raise RunDirError(f"{folder} is not a folder")
    runs = sorted(p for p in folder.iterdir() if (p / METRICS).is_file())
    if not runs:
        raise RunDirError(f"{folder} holds no run folders (neither experiment.json nor runs with {METRICS})")
    return runs


def load_experiment(path: str | Path, kind: str | None = "round") -> Any:
    """Every run of an experiment (or of a folder of runs), rows of ``kind`` stacked; the ``seed``
    and ``run`` columns tell them apart."""
    rows = [row for run in experiment_runs(path) for row in run_rows(run, kind)]
    return _frame(rows)
