"""Multi-task data as one stacked array: the layout the compiled kernels want.

Task t owns rows ``offsets[t]:offsets[t+1]`` of ``X`` and ``y``. Stacking once, instead of keeping a
list of per-task arrays, lets one kernel call run a whole round for every task."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from fedmtl.data.datasets import get_spec, locate_files
from fedmtl.data.formats import read_leaf_json, read_mat_tasks
from fedmtl.errors import DataError

#: The natural multi-task datasets MOCHA is evaluated on, and their loss.
DATASETS = {
    "landmine": "classification",
    "landmine_small": "classification",
    "vehicle": "classification",
    "school": "regression",
}


@dataclass
class Tasks:
    """m tasks stacked row-wise; labels are +/-1 for classification, real targets otherwise."""

    X: np.ndarray
    y: np.ndarray
    offsets: np.ndarray
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.X = np.ascontiguousarray(self.X, dtype=np.float64)
        self.y = np.ascontiguousarray(self.y, dtype=np.float64)
        self.offsets = np.ascontiguousarray(self.offsets, dtype=np.int64)
        if not self.names:
            self.names = [f"task_{t:03d}" for t in range(self.m)]

    @classmethod
    def from_lists(cls, xs: list[np.ndarray], ys: list[np.ndarray], names: list[str] | None = None) -> Tasks:
        sizes = [len(y) for y in ys]
        d = xs[0].shape[1] if xs else 0
        X = np.concatenate([np.asarray(x, dtype=np.float64).reshape(-1, d) for x in xs])
        y = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in ys])
        return cls(X, y, np.concatenate([[0], np.cumsum(sizes)]), list(names or []))

    @property
    def m(self) -> int:
        return len(self.offsets) - 1

    @property
    def d(self) -> int:
        return int(self.X.shape[1])

    @property
    def N(self) -> int:
        return int(self.offsets[-1])

    @cached_property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    @cached_property
    def sqnorm(self) -> np.ndarray:
        return np.einsum("ij,ij->i", self.X, self.X)

    @cached_property
    def task_index(self) -> np.ndarray:
        return np.repeat(np.arange(self.m), self.sizes)

    def task(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[t], self.offsets[t + 1]
        return self.X[lo:hi], self.y[lo:hi]

    def take(self, rows: list[np.ndarray]) -> Tasks:
        """A new Tasks with, for each task t, the rows ``rows[t]`` (indices local to the task)."""
        idx = np.concatenate([self.offsets[t] + np.asarray(r, dtype=np.int64) for t, r in enumerate(rows)])
        sizes = [len(r) for r in rows]
        return Tasks(
            self.X[idx], self.y[idx], np.concatenate([[0], np.cumsum(sizes)]), self.names[: len(rows)]
        )

    def with_features(self, X: np.ndarray) -> Tasks:
        return Tasks(X, self.y, self.offsets, list(self.names))

    def with_targets(self, y: np.ndarray) -> Tasks:
        return Tasks(self.X, y, self.offsets, list(self.names))


def _pm1(y: np.ndarray) -> np.ndarray:
    """Labels {0,1} or {-1,+1} -> {-1,+1} floats."""
    y = np.asarray(y, dtype=np.float64).ravel()
    return np.where(y > 0, 1.0, -1.0)


def load_tasks(name: str, data_dir: str | Path | None = None) -> Tasks:
    """Read a natural multi-task dataset from the data directory, raw (no scaling), one task per node.

    Classification labels become +/-1 as in the reference code. The features are left as the files
    have them: Land Mine is roughly standardised already and Vehicle is z-scored per sensor."""
    if name not in DATASETS:
        raise DataError(
            f"mocha: dataset {name!r} is not a natural multi-task dataset; use {', '.join(DATASETS)}"
        )
    spec = get_spec(name)
    path = locate_files(spec, None if data_dir is None else str(data_dir))[0]
    if path.name.endswith((".json", ".json.gz")):
        users = read_leaf_json(path)
        return Tasks.from_lists(
            [x for _, x, _ in users], [_pm1(y) for _, _, y in users], [u for u, _, _ in users]
        )
    xs, ys = read_mat_tasks(path)
    if DATASETS[name] == "classification":
        ys = [_pm1(y) for y in ys]
    return Tasks.from_lists(xs, [np.asarray(y, dtype=np.float64) for y in ys])
