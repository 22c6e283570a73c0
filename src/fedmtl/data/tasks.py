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


#: A client group's task(s): one derived task, or several on the same samples.
TaskEntry = str | list[str]


def entry_name(entry: TaskEntry) -> str:
    return entry if isinstance(entry, str) else "+".join(entry)


def assign_tasks(
    clients: list[ClientData], names: list[TaskEntry], image: bool, num_classes: int
) -> list[ClientData]:
    """Give client ``c`` the task(s) ``names[c % len(names)]`` and relabel its data for them. An
    entry that lists several tasks gives its clients all of them on the same samples (one label
    column each, ``TaskSpec.parts``); once any entry does, every client's task is such a set (of one,
    for a single task), so a task's head has one name whichever other tasks a client holds."""
    for entry in names:
        for name in [entry] if isinstance(entry, str) else entry:
            if name not in TASKS:
                allowed = ", ".join(sorted(TASKS))
                raise ConfigError(
                    f"config: data.tasks = {names!r}: unknown task {name!r}; allowed: {allowed}"
                )
        if not isinstance(entry, str) and (not entry or len(set(entry)) != len(entry)):
            raise ConfigError(f"config: data.tasks = {names!r}: {entry!r} must list distinct tasks")
    if not image or num_classes != 10:
        raise ConfigError(
            f"config: data.tasks = {names!r}: derived tasks need a 10-class image dataset (digits, mnist)"
        )
    sets = any(not isinstance(e, str) for e in names)
    entries = [([e] if isinstance(e, str) else list(e)) if sets else e for e in names]
    groups: dict[int, list[int]] = {}
    for c in clients:
        groups.setdefault(c.cid % len(entries), []).append(c.cid)
    # every part is specified (and a regression part standardised) over all clients holding it
    holders: dict[str, list[int]] = {}
    for i, cids in groups.items():
        for name in [entries[i]] if isinstance(entries[i], str) else entries[i]:
            holders.setdefault(name, []).extend(cids)
    specs = {name: _spec(name, [clients[c] for c in cids]) for name, cids in holders.items()}
    out = list(clients)
    for i, cids in groups.items():
        entry = entries[i]
        if isinstance(entry, str):
            task = specs[entry]
            for c in cids:
                tr, te = (_encode(TASKS[entry].target(x, y), task) for x, y in _splits(clients[c]))
                out[c] = replace(clients[c], y_train=tr, y_test=te, task=task)
            continue
        task = TaskSpec("multi", len(entry), entry_name(entry), parts=tuple(specs[n] for n in entry))
        for c in cids:
            tr, te = (
                np.stack([_encode(TASKS[n].target(x, y), specs[n]).astype(np.float32) for n in entry], 1)
                for x, y in _splits(clients[c])
            )
            out[c] = replace(clients[c], y_train=tr, y_test=te, task=task)
    return out


def _splits(c: ClientData) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(c.x_train, c.y_train), (c.x_test, c.y_test)]


def _spec(name: str, holders: list[ClientData]) -> TaskSpec:
    spec = TASKS[name]
    if spec.kind == "regression":
        pooled = np.concatenate([spec.target(c.x_train, c.y_train) for c in holders]).astype(np.float64)
        return TaskSpec("regression", 1, name, float(pooled.mean()), float(pooled.std() or 1.0))
    return TaskSpec("classification", spec.num_outputs, name)


def _encode(target: np.ndarray, task: TaskSpec) -> np.ndarray:
    if task.is_classification:
        return target.astype(np.int64)
    return ((target - task.target_mean) / task.target_std).astype(np.float32)
