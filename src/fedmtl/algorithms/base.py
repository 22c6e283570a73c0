"""The algorithm contract: pure-ish steps over plain messages; runtimes move the messages.

An algorithm never learns whether it runs in-process, batched, or on a Flower SuperNode. Server
and client state are dicts of numpy arrays and scalars, so they checkpoint and cross the wire as
they are. Client state stays with the client (in the simulator, in a dict the runtime keeps).

Every hook a runtime calls is declared here, with its default:

- server side: ``init_server``, ``broadcast``/``broadcast_many``, ``server_round`` (the round's
  exchanges: by default one ``train`` exchange and ``server_step``; multi-step protocols yield
  more), ``server_step``, ``expected_reply``, ``global_params``, ``round_info``, ``stop_reason``;
- client side: ``init_client``, ``client_step`` (declares its local work, ``fedmtl.training.work``),
  ``client_actions`` (the further steps of a multi-step protocol);
- evaluation: ``eval_arrays``, ``shared_eval_arrays``, ``new_client_arrays``, ``eval_view`` (what an
  evaluating client receives), ``release_eval`` (what an evaluation round may publish)."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from torch import nn

from fedmtl.algorithms.heads import task_part
from fedmtl.data.federated import ClientData, TaskSpec
from fedmtl.training import LocalSpec, num_local_steps
from fedmtl.training.objectives import TASK_LOSS, Objective, Prox
from fedmtl.training.rows import linked_stack
from fedmtl.training.shuffle import Randomness
from fedmtl.training.tensors import Arrays
from fedmtl.training.work import StepResult, Train

Scalar = float | int | str | bool

#: The action of a round's main exchange: every addressed client runs ``client_step``.
TRAIN = "train"


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


@dataclass(slots=True)
class Exchange:
    """One step of a round: ``messages[cid]`` goes to each addressed client, which answers by
    running ``action`` (``TRAIN``: its client step; otherwise one of its ``client_actions``)."""

    action: str
    messages: dict[int, Message]


#: What ``server_round`` is: it yields ``Exchange``s, receives each exchange's replies (the clients
#: that answered, and for ``TRAIN`` only replies that passed the runtime's checks) and returns
#: (new server state, the replies that stand for each client in the round's records).
ServerRound = Generator[Exchange, dict[int, Message], tuple[dict[str, Any], dict[int, Message]]]
ClientAction = Callable[..., tuple[dict[str, Any], Message]]


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
    #: (lr, epochs) -> optimizer spec, and (samples, work fraction, lr, epochs) -> steps: a round of
    #: thousands of clients asks for a handful of distinct ones
    _specs: dict[tuple[float, float | None], LocalSpec] = field(default_factory=dict, repr=False)
    _steps: dict[tuple[int, float, float, float | None], int] = field(default_factory=dict, repr=False)

    @property
    def multi_task(self) -> bool:
        return len(self.task_init) > 1

    def task_of(self, cid: int) -> str:
        return self.client_tasks.get(cid, self.task.name)

    def model_for(self, task: str) -> nn.Module:
        return self.models.get(task, self.model)

    def init_for(self, task: str) -> Arrays:
        return self.task_init.get(task, self.init_arrays)

    def train(
        self,
        data: ClientData,
        work: ClientWork,
        start: Mapping[str, Any],
        *,
        trainable: Iterable[str] | None = None,
        epochs: float | None = None,
        steps: int | None = None,
        prox: Prox | None = None,
        objective: Objective = TASK_LOSS,
        bounds: Iterable[tuple[str, float, float]] = (),
    ) -> Train:
        """A ``Train`` request for this client: the run's optimizer at the round's learning rate,
        ``train.local_epochs`` (or ``epochs``, or exactly ``steps``) scaled by the client's work
        fraction, its task's model, its mini-batch stream."""
        lr = work.lr
        spec = self._specs.get((lr, epochs))
        if spec is None:
            spec = self._specs[(lr, epochs)] = self.local.with_lr(lr).with_epochs(epochs)
        if steps is None:
            n, fraction = len(data.y_train), work.fraction
            steps = self._steps.get((n, fraction, lr, epochs))
            if steps is None:
                if len(self._steps) > 4096:  # stragglers draw fractions: do not pile up
                    self._steps.clear()
                steps = self._steps[(n, fraction, lr, epochs)] = num_local_steps(n, spec, fraction)
        return Train(
            self.models.get(data.task.name, self.model), start, data, spec, steps, work.rng,
            None if trainable is None else tuple(trainable), prox, objective,
            bounds if type(bounds) is tuple else tuple(bounds),
        )  # fmt: skip


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
    #: True when ``client_step`` declares its training as ``Train`` requests, which the batched
    #: executor stacks across clients; False for methods with their own solver (MOCHA's SDCA).
    batchable: ClassVar[bool] = True
    #: True when a reply's arrays are the client's new values of arrays it received, so its update
    #: is reply minus message: what model poisoning tampers with and client-level DP clips.
    sends_update: ClassVar[bool] = False
    #: True when the server step needs only the sample-weighted mean of those updates, not each one
    #: (what secure aggregation reveals to it).
    mean_of_updates: ClassVar[bool] = False
    #: True when ``server_round`` runs exchanges of its own beyond the train exchange (FedBone's split
    #: steps): a feature wrapper's client and server steps would never see them, so none wraps it.
    multi_step: ClassVar[bool] = False
    #: Why the method cannot run an ``aggregation:`` chain (None: its server step runs the chain
    #: over the client updates, as every FedAvg-family method does).
    no_aggregation_chain: ClassVar[str | None] = None

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

    def server_round(self, server: dict[str, Any], round: int, clients: list[int]) -> ServerRound:
        """The round from the server's side, over the clients that take part (sampled, not
        dropped). One ``TRAIN`` exchange of the broadcasts, then ``server_step`` on the replies;
        a multi-step protocol (split learning, secure aggregation) yields further exchanges."""
        replies = yield Exchange(TRAIN, dict(zip(clients, self.broadcast_many(server, clients), strict=True)))
        return self.server_step(server, replies, round), replies

    def server_step(self, server: dict[str, Any], replies: dict[int, Message], round: int) -> dict[str, Any]:
        raise NotImplementedError

    def expected_reply(self, server: dict[str, Any], cid: int) -> Arrays | None:
        """What a valid reply from ``cid`` looks like (keys and shapes), or None when the server
        step checks replies itself."""
        return None

    def global_params(self, server: dict[str, Any]) -> Arrays | None:
        return server.get("params") if self.has_global_model else None

    # --- client side -------------------------------------------------------------------------
    def init_client(self, cid: int) -> dict[str, Any]:
        return {}

    def client_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> StepResult:
        """The client's round: ``(new state, reply)``, or a generator that yields ``Train``
        requests (``self.ctx.train(...)``) and returns that pair (``fedmtl.training.work``)."""
        raise NotImplementedError

    def steps_per_round(self, data: ClientData) -> int:
        """Optimizer steps the client takes on its data in a round with full work, all its training
        requests together (what sample-level DP budgets ahead of a round)."""
        return num_local_steps(data.n_train, self.ctx.local)

    def client_actions(self) -> dict[str, ClientAction]:
        """The client's further protocol steps by action name, each with ``client_step``'s
        signature and returning (new state, reply) (FedBone's split steps, secure aggregation's
        stages). A runtime delivers an exchange of that action to them."""
        return {}

    def unwrapped(self) -> Algorithm:
        """The algorithm itself, under any feature wrappers."""
        return self

    def eval_arrays(
        self, server: dict[str, Any], state: dict[str, Any], cid: int, data: ClientData | None = None
    ) -> Arrays:
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

    def eval_view(self, server: dict[str, Any], cid: int) -> dict[str, Any]:
        """The part of the server state a client evaluating on its own node receives: enough for
        ``broadcast`` and the evaluation hooks to give this client's arrays, nothing that belongs to
        other clients or tasks (its own personal parameters come from its client state). Default:
        the shared body and this client's task head of ``server["params"]``; an algorithm keeping
        more per client or per group on the server narrows it itself."""
        params = server.get("params")
        if not isinstance(params, dict):
            return {}
        return {"params": task_part(params, self.ctx.task_of(cid), self.ctx.multi_task)}

    def release_eval(self, client_rows: list[dict[str, Any]], round: int) -> dict[str, Any] | None:
        """What an evaluation round publishes instead of the per-client rows, or None to publish
        them (DP-aggregated evaluation releases noisy means only)."""
        return None

    def round_info(self, server: dict[str, Any]) -> dict[str, Any]:
        """Extra per-round facts for the round row of metrics.jsonl (e.g. discovered groups)."""
        return {}

    def stop_reason(self, server: dict[str, Any], round: int) -> str | None:
        """Why the run must stop before ``round`` (e.g. a privacy budget it would exceed), or None.
        The round loop ends the run cleanly, with the reason in the summary."""
        return None
