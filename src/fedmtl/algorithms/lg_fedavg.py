"""LG-FedAvg (Liang et al. 2020, "Think Locally, Act Globally"): local representations, a global head.

The opposite split to FedPer: every client keeps its own body (the representation, learned only
on its data) and the server averages the head, the part every client's representation feeds. A
client trains its whole model (its body, the received head) and sends back the head alone; in a
multi-task federation each task's head is averaged over that task's clients."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import numpy as np

from fedmtl.aggregation import server_opt_init
from fedmtl.algorithms.base import ClientWork, Message
from fedmtl.algorithms.fedavg import FedAvg
from fedmtl.algorithms.heads import body_of
from fedmtl.data.federated import ClientData
from fedmtl.training.tensors import Arrays
from fedmtl.training.work import Train, Trained


class LGFedAvg(FedAvg):
    name = "lg_fedavg"

    def init_server(self) -> dict[str, Any]:
        full = self.ctx.initial_params()
        body = body_of(full)
        heads = {k: v for k, v in full.items() if k not in body}
        return {"params": heads, "opt": server_opt_init(self.p.server_optimizer, heads)}

    def global_params(self, server: dict[str, Any]) -> Arrays | None:
        return None  # a head without a body predicts nothing

    def init_client(self, cid: int) -> dict[str, Any]:
        return {"body": {k: v.copy() for k, v in body_of(self.ctx.init_for(self.ctx.task_of(cid))).items()}}

    def client_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> Generator[Train, Trained, tuple[dict[str, Any], Message]]:
        trained = yield self.ctx.train(data, work, {**state["body"], **msg.arrays})
        out = trained.params
        body = {k: np.array(out[k]) for k in state["body"]}
        return {**state, "body": body}, Message(
            arrays={k: out[k] for k in msg.arrays}, scalars=trained.scalars(data)
        )

    def eval_arrays(
        self, server: dict[str, Any], state: dict[str, Any], cid: int, data: ClientData | None = None
    ) -> Arrays:
        body = state.get("body") or body_of(self.ctx.init_for(self.ctx.task_of(cid)))
        return {**body, **self.broadcast(server, cid).arrays}
