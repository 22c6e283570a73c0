"""FedPer (Arivazhagan et al. 2019): the body is averaged, each client's head never leaves it."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import numpy as np

from fedmtl.aggregation import server_opt_init
from fedmtl.algorithms.base import ClientWork, Message
from fedmtl.algorithms.fedavg import FedAvg
from fedmtl.algorithms.heads import body_of, head_of
from fedmtl.data.federated import ClientData
from fedmtl.training.tensors import Arrays
from fedmtl.training.work import Train, Trained

LocalUpdate = Generator[Train, Trained, Trained]


class FedPer(FedAvg):
    name = "fedper"

    def init_server(self) -> dict[str, Any]:
        body = body_of(self.ctx.initial_params())
        return {"params": body, "opt": server_opt_init(self.p.server_optimizer, body)}

    def broadcast(self, server: dict[str, Any], cid: int) -> Message:
        return Message(arrays=server["params"])

    def global_params(self, server: dict[str, Any]) -> Arrays | None:
        return None

    def init_client(self, cid: int) -> dict[str, Any]:
        return {"head": {k: v.copy() for k, v in head_of(self.ctx.init_for(self.ctx.task_of(cid))).items()}}

    def local_update(self, data: ClientData, full: Arrays, work: ClientWork) -> LocalUpdate:
        """The whole model (received body, own head) trained together."""
        return (yield self.ctx.train(data, work, full))

    def client_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> Generator[Train, Trained, tuple[dict[str, Any], Message]]:
        trained = yield from self.local_update(data, {**msg.arrays, **state["head"]}, work)
        head = {k: np.array(v, copy=True) for k, v in head_of(trained.params).items()}
        reply = Message(arrays=body_of(trained.params), scalars=trained.scalars(data))
        return {**state, "head": head}, reply

    def eval_arrays(
        self, server: dict[str, Any], state: dict[str, Any], cid: int, data: ClientData | None = None
    ) -> Arrays:
        head = state.get("head") or head_of(self.ctx.init_for(self.ctx.task_of(cid)))
        return {**server["params"], **head}
