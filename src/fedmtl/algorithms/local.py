"""Local training only: every client keeps its own model and nothing is communicated."""

from __future__ import annotations

from typing import Any

from fedmtl.algorithms.base import Algorithm, ClientWork, Message, torch_params
from fedmtl.data.federated import ClientData
from fedmtl.training import local_train, num_local_steps, to_numpy
from fedmtl.training.tensors import Arrays


class Local(Algorithm):
    name = "local"
    has_global_model = False

    def init_server(self) -> dict[str, Any]:
        return {}

    def broadcast(self, server: dict[str, Any], cid: int) -> Message:
        return Message()

    def init_client(self, cid: int) -> dict[str, Any]:
        return {"params": {k: v.copy() for k, v in self.ctx.init_arrays.items()}}

    def client_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> tuple[dict[str, Any], Message]:
        spec = self.ctx.local.with_lr(work.lr)
        steps = num_local_steps(data.n_train, spec, work.fraction)
        params, loss, seen = local_train(
            self.ctx.model,
            torch_params(state["params"]),
            data.x_train,
            data.y_train,
            data.task,
            spec,
            steps,
            work.rng,
        )
        reply = Message(
            scalars={"num_examples": data.n_train, "train_loss": loss, "steps": steps, "samples": seen}
        )
        return {"params": to_numpy(params)}, reply

    def server_step(self, server: dict[str, Any], replies: dict[int, Message], round: int) -> dict[str, Any]:
        return server

    def eval_arrays(self, server: dict[str, Any], state: dict[str, Any], cid: int) -> Arrays:
        return state["params"] if state else self.ctx.init_arrays
