"""fedmtl: federated multi-task learning with one library and one CLI."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from pathlib import Path

    from fedmtl.config import Config
    from fedmtl.experiment.run import RunResult


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


__all__ = ["__version__", "load_config", "resume", "run"]
