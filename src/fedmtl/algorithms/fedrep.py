"""FedRep (Collins et al. 2021): per round, train the head on the frozen body, then the body on the
frozen head; only the body is averaged. The head learns on a fixed representation."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from fedmtl.algorithms.base import ClientWork
from fedmtl.algorithms.common import train_arrays
from fedmtl.algorithms.fedavg import FedAvgParams
from fedmtl.algorithms.fedper import FedPer
from fedmtl.algorithms.heads import body_of, head_of
from fedmtl.data.federated import ClientData
from fedmtl.training.tensors import Arrays


class FedRepParams(FedAvgParams):
    head_epochs: float = Field(5.0, gt=0)
    body_epochs: float | None = Field(None, gt=0, description="default: train.local_epochs")


class FedRep(FedPer):
    name = "fedrep"
    Params = FedRepParams

    def local_update(self, state: dict[str, Any], data: ClientData, full: Arrays, work: ClientWork) -> tuple:
        heads = list(head_of(full))
        arrays, _, s1, n1 = train_arrays(
            self.ctx, data, full, work, epochs=self.p.head_epochs, trainable=heads
        )
        arrays, loss, s2, n2 = train_arrays(
            self.ctx, data, arrays, work, epochs=self.p.body_epochs, trainable=list(body_of(full))
        )
        return arrays, loss, s1 + s2, n1 + n2
