"""Ditto (Li et al. 2021): a FedAvg global model w, plus a personal model v_k per client trained on
F_k(v) + (lambda/2)||v - w||^2. v never leaves the client and is what the client uses."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from fedmtl.algorithms.base import ClientWork, Message
from fedmtl.algorithms.common import train_arrays
from fedmtl.algorithms.fedavg import FedAvg, FedAvgParams
from fedmtl.data.federated import ClientData
from fedmtl.training.tensors import Arrays


class DittoParams(FedAvgParams):
    lam: float = Field(0.1, ge=0, description="pull of the personal model toward the global one")
    personal_epochs: float | None = Field(None, gt=0, description="default: train.local_epochs")


class Ditto(FedAvg):
    name = "ditto"
    Params = DittoParams

    def client_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> tuple[dict[str, Any], Message]:
        state, reply = super().client_step(state, data, msg, work)
        personal = state.get("personal") or {k: v.copy() for k, v in msg.arrays.items()}
        personal, ploss, steps, seen = train_arrays(
            self.ctx,
            data,
            personal,
            work,
            epochs=self.p.personal_epochs,
            prox_center=msg.arrays,
            prox_mu=self.p.lam,
        )
        reply.scalars.update(
            steps=int(reply.scalars["steps"]) + steps,
            samples=int(reply.scalars["samples"]) + seen,
            personal_loss=ploss,
        )
        return {**state, "personal": personal}, reply

    def eval_arrays(self, server: dict[str, Any], state: dict[str, Any], cid: int) -> Arrays:
        return state.get("personal") or self.broadcast(server, cid).arrays

    def shared_eval_arrays(self, server: dict[str, Any], state: dict[str, Any], cid: int) -> Arrays | None:
        return self.broadcast(server, cid).arrays
