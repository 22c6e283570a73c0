"""FedBABU (Oh, Kim & Yun 2022, "Body Aggregation and Body Update"): the head stays at its random
initialisation during federated training; only the body trains and is averaged. At evaluation each
client fine-tunes from the global body and that fixed head on its own training data.

Fine-tuning runs for epochs, as the authors' (``finetune_epochs``, 5 as in the public Flower copy
of their code), at its own learning rate (``finetune_lr``, default the run's): a head learned from
random weights on features the body scaled for a fixed head can need a smaller step than the
body's training. ``finetune_steps`` fine-tunes for exactly that many steps instead. The part it
tunes is the head by default (the paper's "the head is fine-tuned"); ``finetune: all`` tunes the
whole model, as that public copy does.

The fixed head is the seeded initial one, which every client builds itself, so it never travels:
the server sends and averages the body alone."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, Literal

from pydantic import Field

from fedmtl.algorithms.base import ClientWork, Message
from fedmtl.algorithms.fedavg import FedAvgParams
from fedmtl.algorithms.fedavg_ft import finetuned
from fedmtl.algorithms.fedper import FedPer
from fedmtl.algorithms.heads import body_of, head_of
from fedmtl.data.federated import ClientData
from fedmtl.training.tensors import Arrays
from fedmtl.training.work import Train, Trained


class FedBABUParams(FedAvgParams):
    finetune_epochs: float = Field(5.0, gt=0, description="passes over the training split before evaluation")
    finetune_steps: int | None = Field(None, ge=1, description="exactly this many steps instead of epochs")
    finetune_lr: float | None = Field(None, gt=0, description="fine-tuning learning rate (default: train.lr)")
    finetune: Literal["head", "all"] = "head"


class FedBABU(FedPer):
    name = "fedbabu"
    Params = FedBABUParams

    #: evaluation fine-tunes on the client's own training split, which never leaves the client
    needs_eval_data = True

    def init_client(self, cid: int) -> dict[str, Any]:
        return {}

    def _start(self, server: dict[str, Any], cid: int) -> Arrays:
        """The global body with the client's task's fixed initial head."""
        return {**head_of(self.ctx.init_for(self.ctx.task_of(cid))), **self.broadcast(server, cid).arrays}

    def client_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> Generator[Train, Trained, tuple[dict[str, Any], Message]]:
        start = {**head_of(self.ctx.init_for(data.task.name)), **msg.arrays}
        trained = yield self.ctx.train(data, work, start, trainable=body_of(start))
        out = trained.params
        return state, Message(arrays={k: out[k] for k in msg.arrays}, scalars=trained.scalars(data))

    def eval_arrays(
        self, server: dict[str, Any], state: dict[str, Any], cid: int, data: ClientData | None = None
    ) -> Arrays:
        start = self._start(server, cid)
        if data is None:
            return start
        p = self.p
        epochs = None if p.finetune_steps is not None else p.finetune_epochs
        return finetuned(
            self.ctx, data, start, p.finetune, steps=p.finetune_steps, epochs=epochs, lr=p.finetune_lr
        )

    def shared_eval_arrays(self, server: dict[str, Any], state: dict[str, Any], cid: int) -> Arrays | None:
        return self._start(server, cid)

    def new_client_arrays(self, server: dict[str, Any], cid: int) -> Arrays:
        return self._start(server, cid)
