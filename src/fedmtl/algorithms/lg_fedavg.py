"""LG-FedAvg (Liang et al. 2020, "Think Locally, Act Globally"): local representations, global layers.

Every client keeps its own lower layers (the representation, learned only on its data) and the
server averages the upper ``global_layers`` layers (counted from the output; the head is one), the
part every client's representation feeds. A client trains its whole model (its own layers, the
received global ones) and sends back the global layers alone; in a multi-task federation each
task's head is averaged over that task's clients.

The authors' released code (pliang279/LG-FedAvg, ``main_lg.py`` and its MNIST scripts) differs
from the defaults in two ways, both available here:

- it starts from a FedAvg-trained model (``--load_fed``): ``warmup_rounds`` rounds of plain FedAvg
  on the whole model come first; at the split every client starts its own layers from the warm
  model's (it receives them with its first message after the split, once);
- it keeps the top 3 of its MLP's 5 layers global (``--num_layers_keep 3``): ``global_layers: 3``.

The defaults (``warmup_rounds: 0``, ``global_layers: 1``) are the paper's framing of the method as
local representations under one global head, from the seeded initialisation."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import numpy as np
from pydantic import Field

from fedmtl.aggregation import server_opt_init
from fedmtl.algorithms.base import AlgoContext, ClientWork, Expected, Message
from fedmtl.algorithms.fedavg import FedAvg, FedAvgParams
from fedmtl.algorithms.heads import SEP, body_of, is_head
from fedmtl.algorithms.reduce import Aggregate
from fedmtl.data.federated import ClientData
from fedmtl.errors import ConfigError
from fedmtl.training.tensors import Arrays
from fedmtl.training.work import Train, Trained


class LGFedAvgParams(FedAvgParams):
    global_layers: int = Field(
        1, ge=1, description="layers with parameters, counted from the output, that the server averages"
    )
    warmup_rounds: int = Field(
        0, ge=0, description="rounds of plain FedAvg on the whole model before the split"
    )


def layers(arrays: Arrays) -> list[list[str]]:
    """The model's keys grouped by layer (``body.3.weight`` and ``body.3.bias`` are one), in order."""
    out: dict[str, list[str]] = {}
    for key in arrays:
        out.setdefault(key.rsplit(".", 1)[0], []).append(key)
    return list(out.values())


class LGFedAvg(FedAvg):
    name = "lg_fedavg"
    Params = LGFedAvgParams

    def __init__(self, params: LGFedAvgParams, ctx: AlgoContext) -> None:  # type: ignore[override]
        super().__init__(params, ctx)
        found = layers(body_of(ctx.init_arrays))  # the body's layers; the heads are the top layer
        if params.global_layers > len(found) + 1:
            raise ConfigError(
                f"config: algorithm.global_layers = {params.global_layers}: the model has "
                f"{len(found) + 1} layers with parameters; allowed: 1 to {len(found) + 1}"
            )
        heads = {k for arrays in [ctx.init_arrays, *ctx.task_init.values()] for k in arrays if is_head(k)}
        top = found[len(found) - params.global_layers + 1 :] if params.global_layers > 1 else []
        #: client names of the global layers: every task's head (one layer side by side, whatever
        #: the task) and the body's top ``global_layers - 1`` layers
        self.global_keys = frozenset(heads | {k for group in top for k in group})

    def _is_global(self, server_key: str) -> bool:
        return server_key.split(SEP, 1)[-1] in self.global_keys

    def init_server(self) -> dict[str, Any]:
        full = self.ctx.initial_params()
        split = self.p.warmup_rounds == 0
        params = {k: v for k, v in full.items() if self._is_global(k)} if split else full
        return {"params": params, "opt": server_opt_init(self.p.server_optimizer, params), "split": split}

    def broadcast(self, server: dict[str, Any], cid: int) -> Message:
        """During the warm-up the whole model; after it the global layers, plus the warm model's own
        layers the first time a client is addressed after the split."""
        task = self.ctx.task_of(cid)
        arrays = self.ctx.view(server["params"], task)
        warm = server.get("warm")
        if warm is not None and cid not in server.get("started", ()):
            arrays = {**self.ctx.view(warm, task), **arrays}
        return Message(arrays=arrays)

    def expected_reply(self, server: dict[str, Any], cid: int, sent: Message) -> Expected | None:
        if not server["split"]:
            return sent.arrays
        return {k: v for k, v in sent.arrays.items() if k in self.global_keys}

    def server_update(self, server: dict[str, Any], aggregate: Aggregate, round: int) -> dict[str, Any]:
        server = super().server_update(server, aggregate, round)
        if server.get("warm") is not None:  # who holds the warm model's layers now
            started = sorted(set(server.get("started", [])) | set(aggregate.accepted))
            server = {**server, "started": started}
        if not server["split"] and round >= self.p.warmup_rounds:
            params = server["params"]
            warm = {k: v for k, v in params.items() if not self._is_global(k)}
            shared = {k: v for k, v in params.items() if self._is_global(k)}
            server = {**server, "params": shared, "warm": warm, "started": [], "split": True}
        return server

    def global_params(self, server: dict[str, Any]) -> Arrays | None:
        if not server.get("split", True) and not self.ctx.multi_task:
            return server["params"]  # the warm-up's FedAvg model
        return None  # global layers without a representation predict nothing

    def init_client(self, cid: int) -> dict[str, Any]:
        return {}

    def _own_layers(self, server: dict[str, Any], state: dict[str, Any], cid: int) -> Arrays:
        """The client's own layers: its trained ones, else the warm model's, else the seeded init."""
        if state.get("body"):
            return state["body"]
        task = self.ctx.task_of(cid)
        if server.get("warm") is not None:
            return self.ctx.view(server["warm"], task)
        return {k: v for k, v in self.ctx.init_for(task).items() if k not in self.global_keys}

    def client_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> Generator[Train, Trained, tuple[dict[str, Any], Message]]:
        received = msg.arrays
        if work.round <= self.p.warmup_rounds:  # plain FedAvg on the whole model
            trained = yield self.ctx.train(data, work, received)
            return state, Message(arrays=trained.params, scalars=trained.scalars(data))
        own = {k: v for k, v in received.items() if k not in self.global_keys}  # the warm model's, once
        if not own:
            own = state.get("body") or {
                k: v for k, v in self.ctx.init_for(data.task.name).items() if k not in self.global_keys
            }
        shared = {k: v for k, v in received.items() if k in self.global_keys}
        trained = yield self.ctx.train(data, work, {**own, **shared})
        out = trained.params
        body = {k: np.array(out[k]) for k in own}
        return {**state, "body": body}, Message(
            arrays={k: out[k] for k in shared}, scalars=trained.scalars(data)
        )

    def eval_arrays(
        self, server: dict[str, Any], state: dict[str, Any], cid: int, data: ClientData | None = None
    ) -> Arrays:
        shared = self.ctx.view(server["params"], self.ctx.task_of(cid))
        if not server.get("split", True):
            return shared  # the warm-up's FedAvg model
        return {**self._own_layers(server, state, cid), **shared}

    def new_client_arrays(self, server: dict[str, Any], cid: int) -> Arrays:
        return self.eval_arrays(server, {}, cid)

    def eval_view(self, server: dict[str, Any], cid: int) -> dict[str, Any]:
        """The global layers of the client's task and, after a warm-up, the warm model's own layers
        (not who has received them)."""
        task = self.ctx.task_of(cid)
        view: dict[str, Any] = {
            "params": self.ctx.server_view(server["params"], task),
            "split": server["split"],
        }
        if server.get("warm") is not None:
            view["warm"] = self.ctx.server_view(server["warm"], task)
        return view
