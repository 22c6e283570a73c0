"""fedmtl: federated multi-task learning with one library and one CLI."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from pathlib import Path

    from fedmtl.config import Config
    from fedmtl.experiment.run import RunResult
    from fedmtl.experiment.seeds import ExperimentResult


def run(config: Config | dict[str, Any] | str | Path, out: str | Path | None = None) -> RunResult:
    """Run a config (a ``Config``, a dict with the YAML schema, or a YAML path); see the README."""
    from fedmtl.experiment.run import run as _run

    return _run(config, out=out)


def resume(run_dir: str | Path) -> RunResult:
    from fedmtl.experiment.run import resume as _resume

    return _resume(run_dir)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    from fedmtl.config import load_config as _load

    return _load(path, overrides)


def run_seeds(
    config: Config | dict[str, Any] | str | Path, seeds: list[int], out: str | Path | None = None
) -> ExperimentResult:
    """Run a config once per seed under one experiment folder (``fedmtl run --seeds``)."""
    from fedmtl.experiment.seeds import run_seeds as _run_seeds

    return _run_seeds(config, seeds, out=out)


def load_run(run_dir: str | Path, kind: str | None = "round") -> Any:
    """A run's rows of ``kind`` (round, client, train, new_client; None: all) as a pandas DataFrame,
    or a list of dicts without pandas."""
    from fedmtl.experiment.results import load_run as _load_run

    return _load_run(run_dir, kind)


def load_experiment(path: str | Path, kind: str | None = "round") -> Any:
    """Every seed's rows of an experiment folder (or every run in a folder), stacked."""
    from fedmtl.experiment.results import load_experiment as _load_experiment

    return _load_experiment(path, kind)


__all__ = ["__version__", "load_config", "load_experiment", "load_run", "resume", "run", "run_seeds"]
