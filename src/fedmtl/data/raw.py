"""What a dataset reader returns, before partitioning, splitting and scaling.

Three shapes cover how federated data arrives: one pool of samples that ``data.partition`` splits
into clients (``Pooled``), one sample set per client that ``data.test_fraction`` splits into train and
test (``Clients``), and per-client train and test sets as distributed, e.g. LEAF's own split
(``ClientSplits``). A reader registered with ``fedmtl.data.register_dataset`` returns one of them.

Labels are one array per sample set, or, for samples that carry several labels (several tasks on
the same samples), a dict of label arrays by name (``{"diagnosis": ..., "stay": ...}``); ``tasks``
then may declare what each is (``fedmtl.data.multilabel.TaskDecl`` or its dict), which the config's
``data.tasks.declare`` overrides."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: One sample set's labels: an array, or several label arrays by name.
Labels = np.ndarray | dict[str, np.ndarray]


@dataclass
class Pooled:
    """One pool of samples; ``x_test``/``y_test`` is an official global test set when the source has one."""

    x: np.ndarray
    y: Labels
    x_test: np.ndarray | None = None
    y_test: Labels | None = None
    tasks: list[Any] | None = None


@dataclass
class Clients:
    """One (name, x, y) per client, in order; split into train and test by ``data.test_fraction``.

    ``vocab``: for token inputs (text), the characters or tokens that ids 1..len(vocab) stand for
    (id 0 is padding); labels then index the same list."""

    names: list[str]
    xs: list[np.ndarray]
    ys: list[Labels]
    vocab: list[str] | None = None
    tasks: list[Any] | None = None


@dataclass
class ClientSplits:
    """Per-client train and test sets used as given (LEAF's split); ``vocab`` as in ``Clients``."""

    names: list[str]
    x_train: list[np.ndarray]
    y_train: list[Labels]
    x_test: list[np.ndarray]
    y_test: list[Labels]
    vocab: list[str] | None = None
    tasks: list[Any] | None = None


Raw = Pooled | Clients | ClientSplits
