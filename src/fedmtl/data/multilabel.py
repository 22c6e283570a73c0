"""Tasks as data: several label arrays on the same samples, declared once, assigned per client.

A dataset whose samples carry several labels (a registered reader returning a dict of label arrays
per client or pool, a LEAF file whose ``y`` is a dict of label lists) gives its clients several
tasks. What each task is comes from a declaration (``data.tasks.declare`` in the config, or the
reader's own ``tasks``; inferred from the arrays as the last resort): a name, a kind, the label it
reads (or derives with a threshold), its classes, loss, weight and head. Which client holds which
task comes from ``data.tasks.assign`` (by client id, by name pattern, or every k-th client), by
default every task a client has labels for.

On the way through partitioning and splitting, a client's labels are one float array with a column
per task (a multi-label task: one per label), NaN where a sample has no label; the first column is
a classification task's where there is one, so Dirichlet partitions and stratified splits follow
its classes. ``encode`` then maps every column (class ids, standardised targets) and ``assign``
gives each client the columns and ``TaskSpec`` of its own tasks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedmtl.data.config import TaskAssign, TaskDecl, TasksConfig
from fedmtl.data.federated import ClientData, TaskSpec
from fedmtl.errors import ConfigError, DataError

Labels = dict[str, np.ndarray]


@dataclass
class LabelPlan:
    """The declared tasks in label-column order, and what each column reads."""

    tasks: list[TaskDecl]

    @property
    def key_is_class(self) -> bool:
        return self.tasks[0].kind == "classification"

    def columns(self) -> list[tuple[TaskDecl, int, int]]:
        """(task, first column, width) of every task."""
        out, col = [], 0
        for t in self.tasks:
            width = self.width(t)
            out.append((t, col, width))
            col += width
        return out

    def width(self, t: TaskDecl) -> int:
        return int(t.classes or 0) if t.kind == "multilabel" else 1

    def matrix(self, labels: Labels, n: int, where: str) -> np.ndarray:
        """One client's (or the pool's) label arrays as the label matrix (float64, NaN: none)."""
        cols = []
        for t, _, width in self.columns():
            source = t.label or t.name
            if source not in labels:
                cols.append(np.full((n, width), np.nan))
                continue
            a = np.asarray(labels[source])
            if a.dtype.kind not in "fiub":
                raise DataError(f"{where}: task {t.name!r}: label {source!r} is not numeric ({a.dtype})")
            if len(a) != n:
                raise DataError(
                    f"{where}: task {t.name!r}: label {source!r} has {len(a)} entries for {n} samples; "
                    "allowed: one per sample"
                )
            a = a.astype(np.float64)
            if t.kind == "multilabel":
                if a.ndim != 2 or a.shape[1] != width:
                    raise DataError(
                        f"{where}: task {t.name!r}: label {source!r} has shape {a.shape}; allowed: "
                        f"({n}, {width}), one 0/1 column per label"
                    )
                cols.append(a)
                continue
            if a.ndim == 2 and a.shape[1] == 1:
                a = a[:, 0]
            if a.ndim != 1:
                raise DataError(
                    f"{where}: task {t.name!r}: label {source!r} has shape {a.shape}; allowed: ({n},)"
                )
            if t.threshold is not None:
                a = np.where(np.isnan(a), np.nan, (a > t.threshold).astype(np.float64))
            cols.append(a[:, None])
        return np.concatenate(cols, axis=1) if cols else np.zeros((n, 0))


def plan_labels(
    declared: TasksConfig | None, reader_tasks: Sequence[Any] | None, label_sets: list[Labels], where: str
) -> LabelPlan:
    """The tasks: the config's declarations, else the reader's, else inferred from the labels."""
    if declared is not None and declared.declare:
        tasks = list(declared.declare)
    elif reader_tasks:
        try:
            tasks = [t if isinstance(t, TaskDecl) else TaskDecl.model_validate(t) for t in reader_tasks]
        except ValueError as exc:
            raise DataError(f"{where}: the reader's tasks: {str(exc).splitlines()[-1].strip()}") from None
    else:
        tasks = _inferred(label_sets, where)
    present = {k for labels in label_sets for k in labels}
    for t in tasks:
        source = t.label or t.name
        if source not in present:
            raise ConfigError(
                f"config: data.tasks: task {t.name!r} reads label {source!r}, which no client has; "
                f"labels: {', '.join(sorted(present))}"
            )
        if t.kind == "multilabel" and t.classes is None:
            widths = {np.shape(labels[source])[1] for labels in label_sets if source in labels}
            tasks[tasks.index(t)] = t = t.model_copy(update={"classes": max(widths)})
    first = next((i for i, t in enumerate(tasks) if t.kind == "classification"), 0)
    return LabelPlan([tasks[first], *tasks[:first], *tasks[first + 1 :]])


def _inferred(label_sets: list[Labels], where: str) -> list[TaskDecl]:
    """Integer labels: classification; 2-D 0/1 labels: multi-label; anything else: regression."""
    names = list(dict.fromkeys(k for labels in label_sets for k in labels))
    out = []
    for name in names:
        arrays = [np.asarray(labels[name]) for labels in label_sets if name in labels]
        flat = np.concatenate([a.reshape(len(a), -1) for a in arrays])
        finite = flat[~np.isnan(flat.astype(np.float64))]
        if flat.shape[1] > 1:
            out.append(TaskDecl(name=_safe(name), kind="multilabel", label=name, classes=flat.shape[1]))
        elif finite.size and np.all(finite == np.round(finite)) and finite.min() >= 0:
            out.append(TaskDecl(name=_safe(name), kind="classification", label=name))
        else:
            out.append(TaskDecl(name=_safe(name), kind="regression", label=name))
    if not out:
        raise DataError(f"{where}: no label arrays")
    return out


def _safe(name: str) -> str:
    return name.removeprefix("y_").replace(".", "_").replace("+", "_") or "y"


def encode(
    plan: LabelPlan, train: np.ndarray, every: np.ndarray, dataset: str
) -> tuple[TaskSpec, Callable[[np.ndarray], np.ndarray]]:
    """The federation's ``TaskSpec`` (kind 'multi', every declared task) and the label encoder:
    class ids as given (-1/+1 mapped to 0/1), targets standardised with the clients' training
    rows, multi-label columns as 0/1; NaN stays NaN."""
    parts = []
    scale: list[tuple[int, float, float]] = []
    for t, col, width in plan.columns():
        column = every[:, col : col + width]
        labelled = column[~np.isnan(column)]
        if t.kind == "classification":
            signed = labelled.size and set(np.unique(labelled).tolist()) <= {-1.0, 1.0} and labelled.min() < 0
            classes = t.classes or (2 if signed else max(2, int(labelled.max(initial=0)) + 1))
            parts.append(TaskSpec("classification", classes, t.name, weight=t.weight, loss=t.loss or ""))
            scale.append((col, -1.0 if signed else 0.0, 0.0))
        elif t.kind == "regression":
            rows = train[:, col]
            rows = rows[~np.isnan(rows)]
            mean = float(rows.mean()) if rows.size else 0.0
            std = float(rows.std()) if rows.size and rows.std() > 0 else 1.0
            parts.append(TaskSpec("regression", 1, t.name, mean, std, weight=t.weight, loss=t.loss or ""))
            scale.append((col, mean, std))
        else:
            parts.append(TaskSpec("multilabel", width, t.name, weight=t.weight, loss=t.loss or ""))
        if t.head:
            parts[-1] = replace(parts[-1], head_hidden=tuple(t.head))
    task = TaskSpec("multi", len(parts), dataset, parts=tuple(parts))

    def fy(y: np.ndarray) -> np.ndarray:
        out = y.astype(np.float32, copy=True)
        for col, a, b in scale:
            if b > 0:  # a regression target: standardised
                out[:, col] = (y[:, col] - a) / b
            elif a < 0:  # -1/+1 classes: 0/1
                out[:, col] = np.where(np.isnan(y[:, col]), np.nan, (y[:, col] > 0).astype(np.float32))
        return out

    return task, fy


def assign(
    clients: list[ClientData], task: TaskSpec, rules: Sequence[TaskAssign], dataset: str
) -> list[ClientData]:
    """Each client with the label columns and ``TaskSpec`` of the tasks it holds (the rules', or
    every task it has labels for); checks each held task's labels against its declaration."""
    spans, col = {}, 0
    for p in task.parts:
        spans[p.name] = (col, p.columns)
        col += p.columns
    order = [p.name for p in task.parts]
    specs: dict[tuple[str, ...], TaskSpec] = {}
    out = []
    for c in clients:
        where = f"dataset {dataset!r}: client {c.cid} ({c.name or c.cid})"
        held = None
        for rule in rules:
            if rule.holds(c.cid, c.name):
                held = list(rule.tasks)
        if held is None:  # every task it has a label for
            held = [n for n in order if not _missing(c, *spans[n])]
        held = [n for n in order if n in held]
        if not held:
            raise DataError(f"{where}: holds no task (no labels for any of {', '.join(order)})")
        for name in held:
            _check(c, task.parts[order.index(name)], *spans[name], where)
        key = tuple(held)
        if key not in specs:
            parts = tuple(task.parts[order.index(n)] for n in held)
            specs[key] = TaskSpec("multi", len(parts), "+".join(held), parts=parts)
        cols = [i for n in held for i in range(spans[n][0], spans[n][0] + spans[n][1])]
        out.append(
            replace(
                c,
                y_train=np.ascontiguousarray(c.y_train[:, cols]),
                y_test=np.ascontiguousarray(c.y_test[:, cols]),
                task=specs[key],
                y_val=None if c.y_val is None else np.ascontiguousarray(c.y_val[:, cols]),
            )
        )
    return out


def _missing(c: ClientData, col: int, width: int) -> bool:
    return bool(np.isnan(c.y_train[:, col : col + width]).all()) and bool(
        np.isnan(c.y_test[:, col : col + width]).all()
    )


def _check(c: ClientData, part: TaskSpec, col: int, width: int, where: str) -> None:
    if _missing(c, col, width):
        raise DataError(f"{where}: holds task {part.name!r} but has no label for it")
    values = np.concatenate([c.y_train[:, col : col + width], c.y_test[:, col : col + width]]).ravel()
    values = values[~np.isnan(values)]
    if part.is_classification:
        bad = values[(values != np.round(values)) | (values < 0) | (values >= part.num_outputs)]
        if bad.size:
            raise DataError(
                f"{where}: task {part.name!r}: label {bad[0]:g} outside the declared classes; allowed: "
                f"0..{part.num_outputs - 1}"
            )
    elif part.kind == "multilabel":
        bad = values[(values != 0) & (values != 1)]
        if bad.size:
            raise DataError(f"{where}: task {part.name!r}: label {bad[0]:g}; allowed: 0 or 1")
