"""Local training only: every client keeps its own model and nothing is communicated."""

from __future__ import annotations

from typing import Any

from fedmtl.algorithms.base import Algorithm, ClientWork, Message, torch_params
from fedmtl.data.federated import ClientData
from fedmtl.training import local_train, num_local_steps, to_numpy
from fedmtl.training.batched import DEFAULT_MEMORY_BYTES
from fedmtl.training.tensors import Arrays


class Local(Algorithm):
    name = "local"
    has_global_model = False

    def init_server(self) -> dict[str, Any]:
        return {}

    def broadcast(self, server: dict[str, Any], cid: int) -> Message:
        return Message()

    def init_client(self, cid: int) -> dict[str, Any]:
        return {"params": {k: v.copy() for k, v in self.ctx.init_for(self.ctx.task_of(cid)).items()}}

    def client_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> tuple[dict[str, Any], Message]:
        spec = self.ctx.local.with_lr(work.lr)
        steps = num_local_steps(data.n_train, spec, work.fraction)
        params, loss, seen = local_train(
            self.ctx.model_for(data.task.name),
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

    def batched_client_step(
        self,
        states: list[dict[str, Any]],
        datas: list[ClientData],
        msgs: list[Message],
        works: list[ClientWork],
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
    ) -> tuple[list[dict[str, Any]], list[Message]]:
        """Every client's own model trained at once; states get copies (they outlive the round)."""
        results = self.batched_local_train([s["params"] for s in states], datas, works, memory_bytes)
        new_states = [{"params": {k: v.copy() for k, v in r.params.items()}} for r in results]
        replies = [
            Message(
                scalars={"num_examples": d.n_train, "train_loss": r.loss, "steps": r.steps, "samples": r.seen}
            )
            for r, d in zip(results, datas, strict=True)
        ]
        return new_states, replies

    def server_step(self, server: dict[str, Any], replies: dict[int, Message], round: int) -> dict[str, Any]:
        return server

    def eval_arrays(self, server: dict[str, Any], state: dict[str, Any], cid: int) -> Arrays:
        return state["params"] if state else self.ctx.init_for(self.ctx.task_of(cid))
