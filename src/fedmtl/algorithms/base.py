"""The algorithm contract: pure-ish steps over plain messages; runtimes move the messages.

An algorithm never learns whether it runs in-process, batched, or on a Flower SuperNode. Server
and client state are dicts of numpy arrays and scalars, so they checkpoint and cross the wire as
they are. Client state stays with the client (in the simulator, in a dict the runtime keeps)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict
from torch import nn

from fedmtl.data.federated import ClientData, TaskSpec
from fedmtl.training import LocalSpec, Params
from fedmtl.training.tensors import Arrays

Scalar = float | int | str | bool


@dataclass
class Message:
    """Named arrays plus scalars: maps 1:1 onto Flower's ArrayRecord + MetricRecord/ConfigRecord."""

    arrays: Arrays = field(default_factory=dict)
    scalars: dict[str, Scalar] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))


@dataclass
class ClientWork:
    """What the runtime grants a client this round (systems heterogeneity lives in the runtime)."""

    round: int
    fraction: float
    rng: np.random.Generator
    lr: float


@dataclass
class AlgoContext:
    """Everything an algorithm needs that is not a message: built once per run."""

    model: nn.Module
    init_arrays: Arrays
    task: TaskSpec
    local: LocalSpec
    seed: int
    num_clients: int


class AlgoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Algorithm:
    """Base class. Subclasses set ``name`` and ``Params`` and override the steps they need."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[AlgoParams]] = AlgoParams
    #: False when clients never talk to the server (no global model to evaluate).
    has_global_model: ClassVar[bool] = True

    def __init__(self, params: AlgoParams, ctx: AlgoContext) -> None:
        self.p = params
        self.ctx = ctx

    # --- server side -------------------------------------------------------------------------
    def init_server(self) -> dict[str, Any]:
        return {"params": {k: v.copy() for k, v in self.ctx.init_arrays.items()}}

    def broadcast(self, server: dict[str, Any], cid: int) -> Message:
        """The message a sampled client receives this round."""
        return Message(arrays=server["params"])

    def server_step(self, server: dict[str, Any], replies: dict[int, Message], round: int) -> dict[str, Any]:
        raise NotImplementedError

    def global_params(self, server: dict[str, Any]) -> Arrays | None:
        return server.get("params") if self.has_global_model else None

    # --- client side -------------------------------------------------------------------------
    def init_client(self, cid: int) -> dict[str, Any]:
        return {}

    def client_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> tuple[dict[str, Any], Message]:
        raise NotImplementedError

    def eval_arrays(self, server: dict[str, Any], state: dict[str, Any], cid: int) -> Arrays:
        """The parameters this client would use for prediction (personal where the method has one)."""
        return self.broadcast(server, cid).arrays


def torch_params(arrays: Arrays) -> Params:
    from fedmtl.training import to_torch

    return to_torch(arrays)
