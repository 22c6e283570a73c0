"""The federated view of a dataset: one ``ClientData`` per client, each with its own split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from fedmtl.data.corrupt import Corruption


@dataclass(frozen=True)
class TaskSpec:
    """What a client predicts. Regression targets are standardised for training; metrics undo it.

    A client with several tasks on the same samples has one ``TaskSpec`` of kind "multi" whose
    ``parts`` are its tasks (``fedmtl.data.multitask``): its labels are one float array with a
    column per part (multi-label parts: one per label), NaN where a sample has no label for a part;
    its model has one head per part (``head.<part>.*``)."""

    kind: Literal["classification", "regression", "multilabel", "multi"]
    num_outputs: int
    name: str = "default"
    target_mean: float = 0.0
    target_std: float = 1.0
    #: "" for per-sample outputs; a dense task's name (e.g. "segment") when the output is a
    #: per-pixel map: classification then means per-pixel classes, regression a target image.
    dense: str = ""
    #: kind "multi": the client's tasks, in label-column order
    parts: tuple[TaskSpec, ...] = ()
    #: as a part of a multi-task client: its weight in the client's objective
    weight: float = 1.0
    #: the per-sample loss ("" = the kind's default: cross_entropy, mse, bce)
    loss: str = ""
    #: as a part: widths of hidden layers of its head (an MLP on the body's features; () = the
    #: model's own head)
    head_hidden: tuple[int, ...] = ()

    @property
    def is_classification(self) -> bool:
        return self.kind == "classification"

    @property
    def is_multi(self) -> bool:
        return self.kind == "multi"

    @property
    def columns(self) -> int:
        """Label columns it takes in a multi-task label array (a multi-label task: one per label)."""
        if self.is_multi:
            return sum(p.columns for p in self.parts)
        return self.num_outputs if self.kind == "multilabel" else 1

    def to_dict(self) -> dict[str, Any]:
        """Plain data (a store's or a federation's metadata); ``from_dict`` reads it back."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "parts"}
        out["parts"] = [p.to_dict() for p in self.parts]
        out["head_hidden"] = list(self.head_hidden)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TaskSpec:
        fields = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        fields["parts"] = tuple(cls.from_dict(p) for p in raw.get("parts") or ())
        fields["head_hidden"] = tuple(raw.get("head_hidden") or ())
        return cls(**fields)


@dataclass
class ClientData:
    cid: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    task: TaskSpec
    name: str = ""
    #: ground truth of the corruption harness (``data.corrupt``) for the training split, if any
    corruption: Corruption | None = None
    #: validation rows carved from the training data (``data.val_fraction``), if any
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None

    @property
    def n_train(self) -> int:
        return int(len(self.y_train))

    @property
    def n_test(self) -> int:
        return int(len(self.y_test))


@dataclass
class FederatedData:
    name: str
    #: a list, or a ``fedmtl.data.clients.ClientList`` that makes each client on access
    clients: Sequence[ClientData]
    input_shape: tuple[int, ...]
    task: TaskSpec
    x_global_test: np.ndarray | None = None
    y_global_test: np.ndarray | None = None
    source: str = "embedded"
    info: dict[str, Any] = field(default_factory=dict)
    #: clients never trained on: they only join for new-client fine-tuning evaluation
    holdout: list[int] = field(default_factory=list)
    #: token inputs (text): what ids 1..len(vocab) stand for; id 0 is padding. None for numbers.
    vocab: list[str] | None = None

    @property
    def train_clients(self) -> list[int]:
        held = set(self.holdout)  # client ids are positions: no client is built to list them
        return [c for c in range(len(self.clients)) if c not in held]

    @property
    def tasks(self) -> dict[str, TaskSpec]:
        """Every task in the federation by name (one for single-task federations)."""
        listed = getattr(self.clients, "tasks", None)  # a ClientList knows them without a scan
        if listed is not None:
            return {t.name: t for t in listed}
        return {c.task.name: c.task for c in self.clients}

    def task_names(self) -> list[str]:
        """Each client's task name, by client id."""
        fast = getattr(self.clients, "task_names", None)
        return fast() if fast is not None else [c.task.name for c in self.clients]

    def train_sizes(self) -> np.ndarray:
        """Each client's number of training samples, by client id."""
        fast = getattr(self.clients, "n_train", None)
        if fast is not None:
            return np.asarray(fast)
        return np.array([c.n_train for c in self.clients], dtype=np.int64)

    def test_sizes(self) -> np.ndarray:
        fast = getattr(self.clients, "n_test", None)
        if fast is not None:
            return np.asarray(fast)
        return np.array([c.n_test for c in self.clients], dtype=np.int64)

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def summary(self) -> dict[str, Any]:
        n_train = self.train_sizes()
        return {
            "dataset": self.name,
            "source": self.source,
            "clients": self.num_clients,
            "input_shape": list(self.input_shape),
            "task": self.task.kind,
            "outputs": self.task.num_outputs,
            "train_samples": int(n_train.sum()),
            "test_samples": int(self.test_sizes().sum()),
            "global_test_samples": 0 if self.y_global_test is None else int(len(self.y_global_test)),
            "min_client_train": int(min(n_train)),
            "max_client_train": int(max(n_train)),
            # the true concept groups (``data.concepts``), for reports; algorithms never see them
            **({"concepts": self.info["concepts"]} if "concepts" in self.info else {}),
        }
