"""Derived tasks on labelled images, so client groups can learn different things from the same kind
of input: heads then differ in size and in loss inside one federation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from fedmtl.data.federated import ClientData, TaskSpec
from fedmtl.errors import ConfigError


@dataclass(frozen=True)
class DerivedTask:
    kind: Literal["classification", "regression"]
    num_outputs: int
    target: Callable[[np.ndarray, np.ndarray], np.ndarray]
    description: str


TASKS: dict[str, DerivedTask] = {
    "digit": DerivedTask("classification", 10, lambda x, y: y, "10-way digit class"),
    "parity": DerivedTask("classification", 2, lambda x, y: y % 2, "odd (1) or even (0) digit"),
    "ge5": DerivedTask("classification", 2, lambda x, y: (y >= 5).astype(np.int64), "digit >= 5"),
    "ink": DerivedTask(
        "regression", 1, lambda x, y: x.reshape(len(x), -1).mean(axis=1), "ink mass: mean pixel intensity"
    ),
}


def assign_tasks(
    clients: list[ClientData], names: list[str], image: bool, num_classes: int
) -> list[ClientData]:
    """Give client ``c`` the task ``names[c % len(names)]`` and relabel its data for that task."""
    for name in names:
        if name not in TASKS:
            allowed = ", ".join(sorted(TASKS))
            raise ConfigError(f"config: data.tasks = {names!r}: unknown task {name!r}; allowed: {allowed}")
    if not image or num_classes != 10:
        raise ConfigError(
            f"config: data.tasks = {names!r}: derived tasks need a 10-class image dataset (digits, mnist)"
        )
    groups: dict[str, list[int]] = {}
    for c in clients:
        groups.setdefault(names[c.cid % len(names)], []).append(c.cid)
    out = list(clients)
    for name, cids in groups.items():
        spec = TASKS[name]
        targets = {
            c: (
                spec.target(clients[c].x_train, clients[c].y_train),
                spec.target(clients[c].x_test, clients[c].y_test),
            )
            for c in cids
        }
        if spec.kind == "regression":
            pooled = np.concatenate([targets[c][0] for c in cids]).astype(np.float64)
            mean, std = float(pooled.mean()), float(pooled.std() or 1.0)
            task = TaskSpec("regression", 1, name, mean, std)
        else:
            task = TaskSpec("classification", spec.num_outputs, name)
        for c in cids:
            tr, te = (_encode(t, task) for t in targets[c])
            out[c] = replace(clients[c], y_train=tr, y_test=te, task=task)
    return out


def _encode(target: np.ndarray, task: TaskSpec) -> np.ndarray:
    if task.is_classification:
        return target.astype(np.int64)
    return ((target - task.target_mean) / task.target_std).astype(np.float32)
