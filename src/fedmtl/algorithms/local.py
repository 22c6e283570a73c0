"""Local training only: every client keeps its own model and nothing is communicated."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from fedmtl.algorithms.base import Algorithm, ClientWork, Message
from fedmtl.algorithms.reduce import Reduce
from fedmtl.data.federated import ClientData
from fedmtl.training.tensors import Arrays
from fedmtl.training.work import Train, Trained


class Local(Algorithm):
    name = "local"
    has_global_model = False
    reduces = "none"
    reduces_why = "clients never send an update, so there is nothing to aggregate"

    def init_server(self) -> dict[str, Any]:
        return {}

    def broadcast(self, server: dict[str, Any], cid: int) -> Message:
        return Message()

    def init_client(self, cid: int) -> dict[str, Any]:
        return {"params": {k: v.copy() for k, v in self.ctx.init_for(self.ctx.task_of(cid)).items()}}

    def client_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> Generator[Train, Trained, tuple[dict[str, Any], Message]]:
        trained = yield self.ctx.train(data, work, state["params"])
        return {"params": trained.kept()}, Message(scalars=trained.scalars(data))

    def reduction(self, server: dict[str, Any], replies: dict[int, Message], round: int) -> Reduce | None:
        return None

    def eval_arrays(
        self, server: dict[str, Any], state: dict[str, Any], cid: int, data: ClientData | None = None
    ) -> Arrays:
        return state["params"] if state else self.ctx.init_for(self.ctx.task_of(cid))
