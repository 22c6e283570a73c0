"""The algorithm contract: pure-ish steps over plain messages; runtimes move the messages.

An algorithm never learns whether it runs in-process, batched, or on a Flower SuperNode. Server
and client state are dicts of numpy arrays and scalars, so they checkpoint and cross the wire as
they are. Client state stays with the client (in the simulator, in a dict the runtime keeps)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from torch import nn

from fedmtl.data.federated import ClientData, TaskSpec
from fedmtl.training import LocalSpec, Params, num_local_steps
from fedmtl.training.batched import DEFAULT_MEMORY_BYTES, batched_local_train
from fedmtl.training.rows import linked_stack
from fedmtl.training.shuffle import Randomness
from fedmtl.training.tensors import Arrays

Scalar = float | int | str | bool


@dataclass
class Message:
    """Named arrays plus scalars: maps 1:1 onto Flower's ArrayRecord + MetricRecord/ConfigRecord."""

    arrays: Arrays = field(default_factory=dict)
    scalars: dict[str, Scalar] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        stack = linked_stack(self.arrays)  # a row of a batched stack: every row has the same size
        if stack is not None:
            return stack.row_nbytes
        return int(sum(a.nbytes for a in self.arrays.values()))


@dataclass
class ClientWork:
    """What the runtime grants a client this round (systems heterogeneity lives in the runtime).

    ``rng``: the runtimes hand a ``Stream`` keyed by (seed, TRAIN, round, client): pass it to
    ``local_train``/``batch_schedule`` for the mini-batch order, call it like a numpy Generator
    for any other draw. A plain Generator works too (batches are then drawn from it)."""

    round: int
    fraction: float
    rng: Randomness
    lr: float


@dataclass
class AlgoContext:
    """Everything an algorithm needs that is not a message: built once per run.

    ``model``/``init_arrays``/``task`` describe the federation's first task; multi-task federations
    also fill ``models``/``task_init`` per task name (same body, heads of different sizes) and
    ``client_tasks`` (public metadata: which task each client solves)."""

    model: nn.Module
    init_arrays: Arrays
    task: TaskSpec
    local: LocalSpec
    seed: int
    num_clients: int
    models: dict[str, nn.Module] = field(default_factory=dict)
    task_init: dict[str, Arrays] = field(default_factory=dict)
    client_tasks: dict[int, str] = field(default_factory=dict)
    task_specs: dict[str, TaskSpec] = field(default_factory=dict)
    #: the ``aggregation:`` chain (``fedmtl.aggregation.pipeline.Pipeline``); None = weighted mean
    aggregator: Any = None

    @property
    def multi_task(self) -> bool:
        return len(self.task_init) > 1

    def task_of(self, cid: int) -> str:
        return self.client_tasks.get(cid, self.task.name)

    def model_for(self, task: str) -> nn.Module:
        return self.models.get(task, self.model)

    def init_for(self, task: str) -> Arrays:
        return self.task_init.get(task, self.init_arrays)


class AlgoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Algorithm:
    """Base class. Subclasses set ``name`` and ``Params`` and override the steps they need."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[AlgoParams]] = AlgoParams
    #: False when clients never talk to the server (no global model to evaluate).
    has_global_model: ClassVar[bool] = True
    #: True when ``eval_arrays`` needs the client's own data (e.g. fine-tuning before evaluation).
    needs_eval_data: ClassVar[bool] = False

    def __init__(self, params: AlgoParams, ctx: AlgoContext) -> None:
        self.p = params
        self.ctx = ctx

    # --- server side -------------------------------------------------------------------------
    def init_server(self) -> dict[str, Any]:
        return {"params": {k: v.copy() for k, v in self.ctx.init_arrays.items()}}

    def broadcast(self, server: dict[str, Any], cid: int) -> Message:
        """The message a sampled client receives this round."""
        return Message(arrays=server["params"])

    def broadcast_many(self, server: dict[str, Any], cids: list[int]) -> list[Message]:
        """``[self.broadcast(server, c) for c in cids]``: what the simulator calls once per round.
        An algorithm whose message depends on the client only through its task may hand the same
        (never modified) Message to every client of a task (FedAvg does)."""
        broadcast = self.broadcast
        return [broadcast(server, c) for c in cids]

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

    def shared_eval_arrays(self, server: dict[str, Any], state: dict[str, Any], cid: int) -> Arrays | None:
        """The non-personalised model for this client, where the method has both (personalisation gain)."""
        return None

    def new_client_arrays(self, server: dict[str, Any], cid: int) -> Arrays:
        """Starting point for a client that never trained: what it would receive, plus a fresh head
        for whatever the message lacks (FedPer/FedRep send only the body)."""
        init = self.ctx.init_for(self.ctx.task_of(cid))
        return {**init, **self.broadcast(server, cid).arrays}

    def round_info(self, server: dict[str, Any]) -> dict[str, Any]:
        """Extra per-round facts for the round row of metrics.jsonl (e.g. discovered groups)."""
        return {}

    def stop_reason(self, server: dict[str, Any], round: int) -> str | None:
        """Why the run must stop before ``round`` (e.g. a privacy budget it would exceed), or None.
        The round loop ends the run cleanly, with the reason in the summary."""
        return None

    # --- batched execution (optional) ---------------------------------------------------------
    def batched_client_step(
        self,
        states: list[dict[str, Any]],
        datas: list[ClientData],
        msgs: list[Message],
        works: list[ClientWork],
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
    ) -> tuple[list[dict[str, Any]], list[Message]]:
        """``client_step`` for all of a round's clients as one computation: same states and replies,
        to float tolerance. Optional; the runtime calls it only when ``batched_unsupported`` is None.
        ``memory_bytes`` bounds what is stacked at once (clients beyond it go in further groups)."""
        raise NotImplementedError(f"algorithm {self.name!r} has no batched client step")

    def batched_unsupported(self) -> str | None:
        """Why ``batched_client_step`` cannot stand in for ``client_step`` (None when it can).

        A subclass that overrides ``client_step`` but inherits ``batched_client_step`` would run
        its parent's update when batched, so it counts as unsupported until it overrides both."""
        batched = _defined_in(type(self), "batched_client_step")
        if batched is Algorithm:
            return f"algorithm {self.name!r} has no batched client step"
        if not issubclass(batched, _defined_in(type(self), "client_step")):
            return f"algorithm {self.name!r} overrides client_step but not batched_client_step"
        return None

    def batched_local_train(
        self,
        starts: list[Arrays],
        datas: list[ClientData],
        works: list[ClientWork],
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
        trainable: list[str] | None = None,
        prox_centers: list[Arrays] | None = None,
        prox_mu: float = 0.0,
    ) -> list[LocalResult]:
        """``local_train`` for every client at once (the batched counterpart of the call each
        ``client_step`` makes), grouped by learning rate and task (each task has its own model
        and loss), results in input order."""
        out: list[LocalResult | None] = [None] * len(starts)
        groups: dict[tuple[float, str, bool], list[int]] = {}
        if len(datas) != len(works):
            raise ValueError("batched_local_train: datas and works need one entry per client")
        task0, lr0 = (datas[0].task, works[0].lr) if datas else (None, None)
        if datas and all(d.task is task0 for d in datas) and all(w.lr == lr0 for w in works):
            # The usual round: one task, one learning rate (thousands of small clients make a
            # per-client dictionary update measurable).
            groups[(lr0, task0.name, task0.is_classification)] = list(range(len(datas)))  # type: ignore[union-attr]
        else:
            for i, (data, work) in enumerate(zip(datas, works, strict=True)):
                groups.setdefault((work.lr, data.task.name, data.task.is_classification), []).append(i)
        for (lr, task, _), idx in groups.items():
            spec = self.ctx.local.with_lr(lr)
            known: dict[tuple[int, float], int] = {}  # (size, work fraction) -> steps: few distinct
            steps = []
            for i in idx:
                key = (len(datas[i].y_train), works[i].fraction)
                n_steps = known.get(key)
                if n_steps is None:
                    n_steps = known[key] = num_local_steps(key[0], spec, key[1])
                steps.append(n_steps)
            res = batched_local_train(
                self.ctx.model_for(task),
                [starts[i] for i in idx],
                [datas[i].x_train for i in idx],
                [datas[i].y_train for i in idx],
                datas[idx[0]].task,
                spec,
                steps,
                [works[i].rng for i in idx],
                trainable=trainable,
                prox_centers=None if prox_centers is None else [prox_centers[i] for i in idx],
                prox_mu=prox_mu,
                memory_bytes=memory_bytes,
            )
            losses, seen = res.loss.tolist(), res.seen.tolist()
            for j, (i, arrays) in enumerate(zip(idx, res.all_arrays(), strict=True)):
                out[i] = LocalResult(arrays, losses[j], seen[j], steps[j])
        return [r for r in out if r is not None]


@dataclass
class LocalResult:
    """One client's outcome of batched local training; ``params`` are views into shared stacks
    (copy them before keeping them beyond the round)."""

    params: Arrays
    loss: float
    seen: int
    steps: int


def _defined_in(cls: type, name: str) -> type:
    """The class in ``cls``'s MRO whose body defines ``name``."""
    return next(c for c in cls.__mro__ if name in vars(c))


def torch_params(arrays: Arrays) -> Params:
    from fedmtl.training import to_torch

    return to_torch(arrays)
