"""Shared fixtures: small, fast configs on real (embedded or shared) data."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedmtl.data import resolve_data_dir


def digits_config(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "name": "t",
        "seed": 0,
        "data": {"dataset": "digits", "partition": {"kind": "dirichlet", "alpha": 0.5, "num_clients": 8}},
        "model": {"name": "mlp", "hidden": [32]},
        "train": {"rounds": 5, "local_epochs": 1, "batch_size": 16, "lr": 0.1},
        "clients": {"per_round": 4},
        "output": {"progress": False},
    }
    for key, value in overrides.items():
        cur = cfg
        parts = key.split("__")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = value
    return cfg


def copy_checkpoint(src: Path, dst: Path) -> None:
    """Give run directory ``dst`` the last checkpoint of ``src``: its checkpoint file and the
    client-state segments it names (tests forge interrupted runs this way)."""
    shutil.copy2(src / "checkpoint.tree", dst / "checkpoint.tree")
    shutil.rmtree(dst / "clients", ignore_errors=True)
    shutil.copytree(src / "clients", dst / "clients")


@pytest.fixture
def shared_data():
    path = resolve_data_dir(None)
    if path is None:
        pytest.skip("../shared/data not present")
    return path


@pytest.fixture
def flower() -> Iterator[Any]:
    """The in-process Flower Grid helpers of ``tests/test_flower.py`` (``LoopbackGrid``, ``_cfg``,
    ``_flower_run``, ...), with the task identity Flower's runtimes set; skips only the test that
    asks for it when Flower is not installed."""
    pytest.importorskip("flwr", reason="Flower is not installed (pip install 'fedmtl[flower]')")
    from flwr.supercore.task_identity import TaskIdentity

    import tests.test_flower as helpers

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    try:
        yield helpers
    finally:
        TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None  # type: ignore[assignment]
