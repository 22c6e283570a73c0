"""Key spaces for multi-task federations: one shared body, one head per task.

Models name their task-specific layers ``head.*``. On the server, a multi-task federation keeps
each task's head under ``<task>:head.*`` so heads of different shapes never meet in an average;
clients always see plain names. Single-task federations use plain names throughout."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedmtl.errors import ProtocolError
from fedmtl.training.tensors import Arrays

HEAD = "head."
SEP = ":"


def is_head(key: str) -> bool:
    return key.startswith(HEAD)


def body_of(arrays: Arrays) -> Arrays:
    """Shared keys only: neither plain heads nor task-qualified (server-side) heads."""
    return {k: v for k, v in arrays.items() if not is_head(k) and SEP not in k}


def head_of(arrays: Arrays) -> Arrays:
    return {k: v for k, v in arrays.items() if is_head(k)}


def qualify(arrays: Arrays, task: str, multi: bool) -> Arrays:
    """Client names -> server names (heads get their task prefix in multi-task federations)."""
    if not multi:
        return dict(arrays)
    return {(f"{task}{SEP}{k}" if is_head(k) else k): v for k, v in arrays.items()}


def task_part(params: Arrays, task: str, multi: bool) -> Arrays:
    """The server names one client of ``task`` may see: the body and its own task's head (so
    ``for_task`` on it gives what it gives on the whole), none of the other tasks' heads."""
    if not multi:
        return params
    prefix = f"{task}{SEP}"
    return {k: v for k, v in params.items() if SEP not in k or k.startswith(prefix)}


def for_task(params: Arrays, task: str, multi: bool) -> Arrays:
    """Server names -> the arrays one client of ``task`` uses (body + its task's head)."""
    if not multi:
        return params
    prefix = f"{task}{SEP}"
    out = {k: v for k, v in params.items() if SEP not in k}
    out.update({k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)})
    return out


def initial_global(init: dict[str, Arrays], fallback: Arrays) -> Arrays:
    """The server's starting point: the shared body plus every task's initial head."""
    if len(init) <= 1:
        return {k: v.copy() for k, v in fallback.items()}
    first = next(iter(init.values()))
    out = {k: v.copy() for k, v in body_of(first).items()}
    for task, arrays in init.items():
        out.update({f"{task}{SEP}{k}": v.copy() for k, v in head_of(arrays).items()})
    return out


def keywise_mean(updates: Sequence[Arrays], weights: Sequence[float]) -> Arrays:
    """Weighted mean of each key over the updates that carry it (heads: only that task's clients)."""
    if not updates:
        raise ProtocolError("aggregation: no client updates to average")
    sums: dict[str, np.ndarray] = {}
    totals: dict[str, float] = {}
    dtypes: dict[str, np.dtype] = {}
    for u, w in zip(updates, weights, strict=True):
        for k, v in u.items():
            if k in sums and sums[k].shape != v.shape:
                raise ProtocolError(f"aggregation: key {k!r} has shape {v.shape}, expected {sums[k].shape}")
            sums[k] = sums.get(k, 0.0) + float(w) * v.astype(np.float64)
            totals[k] = totals.get(k, 0.0) + float(w)
            dtypes[k] = v.dtype
    return {k: (sums[k] / totals[k]).astype(dtypes[k]) for k in sums if totals[k] > 0}
