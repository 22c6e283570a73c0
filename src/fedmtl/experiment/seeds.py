"""Seeds as one experiment: one config run once per seed, each run in its own folder under one
experiment folder, so ``compare`` and ``report`` show mean ± std over seeds.

Layout: ``experiment.json`` (what it is, the seeds, which folder holds which seed, and once complete
the mean and std of every final metric over seeds) and one ordinary run folder per seed
(``seed-0/``, ``seed-1/``, ...). ``fedmtl resume`` on the experiment folder continues the seed that
was cut short and runs the ones not started."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmtl.config import Config, parse_config
from fedmtl.errors import ConfigError, RunDirError
from fedmtl.experiment.progress import log
from fedmtl.experiment.records import RunDir, atomic_write_bytes

EXPERIMENT = "experiment.json"
FORMAT = "fedmtl-experiment/1"


@dataclass
class ExperimentResult:
    path: Path
    runs: list[Any]  # RunResult, one per seed in the order asked
    summary: dict[str, Any]


def is_experiment(path: str | Path) -> bool:
    return (Path(path) / EXPERIMENT).is_file()


def seed_folder(seed: int) -> str:
    return f"seed-{seed}"


def read_experiment(path: str | Path) -> dict[str, Any]:
    p = Path(path) / EXPERIMENT
    try:
        doc = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{p}: unreadable experiment record ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise RunDirError(f"{p}: not a fedmtl experiment record (format {FORMAT!r} expected)")
    return doc


def _check_seeds(seeds: list[int]) -> list[int]:
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    if any(s < 0 for s in seeds):
        raise ConfigError(f"--seeds: seeds must be >= 0, got {seeds}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: each seed once, got {seeds}")
    return list(seeds)


def _folder(cfg: Config, out: str | Path | None) -> Path:
    from fedmtl.experiment.run import folder_name

    if out is not None:
        path = Path(out)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise RunDirError(
                f"experiment folder {path} already exists and is not empty; choose another --out"
            )
        return path
    root = Path(cfg.output.dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        path = root / (f"{folder_name(cfg)}-{stamp}-seeds" + (f"-{i}" if i else ""))
        if not path.exists():
            return path
    raise RunDirError(f"could not find a new experiment folder name under {root}")


def run_seeds(config: Config | dict[str, Any] | str | Path, seeds: list[int], out: str | Path | None = None):
    """Run ``config`` once per seed under one experiment folder; returns every run and the
    mean ± std over seeds of the final metrics (also written to ``experiment.json``)."""
    from fedmtl.experiment.run import _as_config, run

    cfg = _as_config(config)
    seeds = _check_seeds(seeds)
    folder = _folder(cfg, out)
    doc = {
        "format": FORMAT,
        "name": cfg.name,
        "algorithm": cfg.algorithm.name,
        "dataset": cfg.data.dataset,
        "seeds": seeds,
        "runs": {str(s): seed_folder(s) for s in seeds},
        "complete": False,
    }
    results = []
    for i, seed in enumerate(seeds):
        log.info(f"experiment {folder}: seed {seed} ({i + 1} of {len(seeds)})")
        # the first run validates config and data before anything is created
        results.append(run(cfg.model_copy(update={"seed": seed}), out=folder / seed_folder(seed)))
        if i == 0:
            _write(folder, doc)
    return _finish(folder, doc, results)


def resume_seeds(path: str | Path, accept_mismatch: bool = False) -> ExperimentResult:
    """Continue an experiment: finished seeds as they are, the interrupted one from its checkpoint
    (``accept_mismatch``: as ``resume``), the ones not started from the first seed's config."""
    from fedmtl.experiment.run import resume, run

    folder = Path(path)
    doc = read_experiment(folder)
    first = RunDir.open(folder / doc["runs"][str(doc["seeds"][0])])
    base = parse_config(first.read_config())
    results = []
    for seed in doc["seeds"]:
        sub = folder / doc["runs"][str(seed)]
        if (sub / "config.yaml").is_file():
            results.append(resume(sub, accept_mismatch=accept_mismatch))
        else:
            log.info(f"experiment {folder}: seed {seed}")
            results.append(run(base.model_copy(update={"seed": seed}), out=sub))
    return _finish(folder, doc, results)


def _write(folder: Path, doc: dict[str, Any]) -> None:
    atomic_write_bytes(folder / EXPERIMENT, json.dumps(doc, indent=2).encode())


def _finish(folder: Path, doc: dict[str, Any], results: list[Any]) -> ExperimentResult:
    summary = over_seeds([r.summary["final"] for r in results])
    doc.update(
        complete=True,
        primary_metric=results[0].summary["primary_metric"],
        higher_is_better=results[0].summary["higher_is_better"],
        final=summary,
    )
    _write(folder, doc)
    return ExperimentResult(folder, results, doc)


def over_seeds(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``{key: {"mean", "std", "n"}}`` for every numeric key of the rows (std over seeds, ddof 0,
    as in the benchmark tables)."""
    keys = dict.fromkeys(k for r in rows for k, v in r.items() if _number(v))
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        values = np.asarray([float(r[key]) for r in rows if _number(r.get(key))], dtype=float)
        values = values[np.isfinite(values)]
        if values.size:
            out[key] = {"mean": float(values.mean()), "std": float(values.std()), "n": int(values.size)}
    return out


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
