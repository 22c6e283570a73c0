"""Ditto (Li et al. 2021): a FedAvg global model w, plus a personal model v_k per client trained on
F_k(v) + (lambda/2)||v - w||^2. v never leaves the client and is what the client uses."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from pydantic import Field

from fedmtl.algorithms.base import ClientWork, Message
from fedmtl.algorithms.fedavg import FedAvg, FedAvgParams
from fedmtl.data.federated import ClientData
from fedmtl.training import num_local_steps
from fedmtl.training.objectives import Prox
from fedmtl.training.tensors import Arrays
from fedmtl.training.work import Train, Trained, local_work


class DittoParams(FedAvgParams):
    lam: float = Field(0.1, ge=0, description="pull of the personal model toward the global one")
    personal_epochs: float | None = Field(None, gt=0, description="default: train.local_epochs")


class Ditto(FedAvg):
    name = "ditto"
    Params = DittoParams

    def client_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> Generator[Train, Trained, tuple[dict[str, Any], Message]]:
        state, reply = yield from local_work(super().client_step(state, data, msg, work))
        personal = state.get("personal") or msg.arrays
        lam = self.p.lam
        mine = yield self.ctx.train(
            data,
            work,
            personal,
            epochs=self.p.personal_epochs,
            prox=Prox(msg.arrays, lam) if lam > 0 else None,
        )
        reply.scalars.update(
            steps=int(reply.scalars["steps"]) + mine.steps,
            samples=int(reply.scalars["samples"]) + mine.seen,
            personal_loss=mine.loss,
        )
        return {**state, "personal": mine.kept()}, reply

    def eval_arrays(
        self, server: dict[str, Any], state: dict[str, Any], cid: int, data: ClientData | None = None
    ) -> Arrays:
        return state.get("personal") or self.broadcast(server, cid).arrays

    def shared_eval_arrays(self, server: dict[str, Any], state: dict[str, Any], cid: int) -> Arrays | None:
        return self.broadcast(server, cid).arrays

    def steps_per_round(self, data: ClientData) -> int:
        personal = num_local_steps(data.n_train, self.ctx.local.with_epochs(self.p.personal_epochs))
        return super().steps_per_round(data) + personal
