"""FedRep (Collins et al. 2021): per round, train the head on the frozen body, then the body on the
frozen head; only the body is averaged. The head learns on a fixed representation."""

from __future__ import annotations

from pydantic import Field

from fedmtl.algorithms.base import ClientWork
from fedmtl.algorithms.fedavg import FedAvgParams
from fedmtl.algorithms.fedper import FedPer, LocalUpdate
from fedmtl.algorithms.heads import body_of, head_of
from fedmtl.data.federated import ClientData
from fedmtl.training import num_local_steps
from fedmtl.training.tensors import Arrays
from fedmtl.training.work import Trained


class FedRepParams(FedAvgParams):
    head_epochs: float = Field(5.0, gt=0)
    body_epochs: float | None = Field(None, gt=0, description="default: train.local_epochs")


class FedRep(FedPer):
    name = "fedrep"
    Params = FedRepParams

    def local_update(self, data: ClientData, full: Arrays, work: ClientWork) -> LocalUpdate:
        head = yield self.ctx.train(data, work, full, epochs=self.p.head_epochs, trainable=head_of(full))
        body = yield self.ctx.train(
            data, work, head.params, epochs=self.p.body_epochs, trainable=body_of(full)
        )
        seen, steps = head.seen + body.seen, head.steps + body.steps
        return Trained(body.params, body.loss, seen=seen, steps=steps, owned=body.owned)

    def steps_per_round(self, data: ClientData) -> int:
        phases = (self.p.head_epochs, self.p.body_epochs)
        return sum(num_local_steps(data.n_train, self.ctx.local.with_epochs(e)) for e in phases)
