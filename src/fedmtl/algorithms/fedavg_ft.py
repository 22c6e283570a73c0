"""Fine-tuned FedAvg: FedAvg training; before evaluation each client takes k local steps on the
global model. The simplest personalisation baseline, and a strong one."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from fedmtl.algorithms.base import AlgoContext, ClientWork
from fedmtl.algorithms.fedavg import FedAvg, FedAvgParams
from fedmtl.algorithms.heads import head_of
from fedmtl.data.federated import ClientData
from fedmtl.training.executors import train_one
from fedmtl.training.tensors import Arrays

FINETUNE = 7  # rng purpose, distinct from the runtime's


class FedAvgFTParams(FedAvgParams):
    finetune_steps: int = Field(10, ge=1)
    finetune: Literal["all", "head"] = "all"


class FedAvgFT(FedAvg):
    name = "fedavg_ft"
    Params = FedAvgFTParams

    #: evaluation fine-tunes on the client's own training split, which never leaves the client
    needs_eval_data = True

    def eval_arrays(
        self, server: dict[str, Any], state: dict[str, Any], cid: int, data: ClientData | None = None
    ) -> Arrays:
        start = self.broadcast(server, cid).arrays
        if data is None:
            return start
        return finetuned(self.ctx, data, start, self.p.finetune, steps=self.p.finetune_steps)

    def shared_eval_arrays(self, server: dict[str, Any], state: dict[str, Any], cid: int) -> Arrays | None:
        return self.broadcast(server, cid).arrays


def finetuned(
    ctx: AlgoContext,
    data: ClientData,
    start: Arrays,
    which: str,
    *,
    steps: int | None = None,
    epochs: float | None = None,
    lr: float | None = None,
) -> Arrays:
    """``start`` after local training on the client's training split (``which``: "all" or "head"):
    exactly ``steps`` steps, else ``epochs`` passes, at ``lr`` (default: the run's learning rate),
    with mini-batches from (seed, FINETUNE, client): the same tuned model whenever and wherever it
    is evaluated."""
    work = ClientWork(
        round=0,
        fraction=1.0,
        rng=np.random.default_rng([ctx.seed, FINETUNE, data.cid]),
        lr=ctx.local.optimizer.lr if lr is None else lr,
    )
    trainable = head_of(start) if which == "head" else None
    return train_one(ctx.train(data, work, start, trainable=trainable, steps=steps, epochs=epochs)).params
