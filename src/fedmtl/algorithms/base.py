"""The algorithm contract: pure-ish steps over plain messages; runtimes move the messages.

An algorithm never learns whether it runs in-process, batched, or on a Flower SuperNode. Server
and client state are dicts of numpy arrays and scalars, so they checkpoint and cross the wire as
they are. Client state stays with the client (in the simulator, in a dict the runtime keeps).

Both sides are declared. The client step yields ``Train`` requests that executors carry out
(``fedmtl.training.work``). The server side says what to reduce, not how: the default round sends
the broadcasts, hands the round a ``Reduce`` request (``reduction``) and gets back an
``Aggregate``, which ``server_update`` turns into the new server state. The round checks every
reply and carries the reduction out (``fedmtl.runtime.reduction``): the features' clip, noise and
robust steps, the user's ``aggregation:`` list, or secure aggregation. So a guarantee never depends
on an algorithm calling the right helper.

Every hook a runtime calls is declared here, with its default:

- server side: ``init_server``, ``broadcast``/``broadcast_many``, ``expected_reply``,
  ``server_round`` (the round's exchanges: by default one ``train`` exchange, ``reduction`` and
  ``server_update``; multi-step protocols yield more), ``reduction``, ``server_update``,
  ``global_params``, ``round_info``, ``stop_reason``;
- client side: ``init_client``, ``client_step`` (declares its local work, ``fedmtl.training.work``),
  ``client_actions`` (the further steps of a multi-step protocol);
- evaluation: ``eval_arrays``, ``shared_eval_arrays``, ``new_client_arrays``, ``eval_view`` (what an
  evaluating client receives), ``release_eval`` (what an evaluation round may publish).

The defaults are a whole algorithm: FedAvg over the model's arrays, with each task's head averaged
over its own clients in a multi-task federation. A new method overrides what it changes."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from torch import nn

from fedmtl.algorithms.heads import for_task, initial_global, task_part
from fedmtl.algorithms.message import TRAIN, Exchange, Expected, Message, Scalar
from fedmtl.algorithms.reduce import Aggregate, Reduce, ReduceKind
from fedmtl.data.federated import ClientData, TaskSpec
from fedmtl.training import LocalSpec, num_local_steps
from fedmtl.training.objectives import TASK_LOSS, Objective, Prox
from fedmtl.training.shuffle import Randomness
from fedmtl.training.tensors import Arrays
from fedmtl.training.work import StepResult, Train

__all__ = ["TRAIN", "Aggregate", "Exchange", "Expected", "Message", "Reduce", "Scalar"]

#: What ``server_round`` is: it yields ``Exchange``s, receiving each exchange's replies (the clients
#: that answered with replies the round accepted), and ``Reduce`` requests, receiving each one's
#: ``Aggregate``; it returns (new server state, the replies that stand for each client in the
#: round's records).
ServerRound = Generator[
    Exchange | Reduce, dict[int, Message] | Aggregate, tuple[dict[str, Any], dict[int, Message]]
]
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
    """Base class, and by itself FedAvg. Subclasses set ``name`` and ``Params`` and override the
    steps they change."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[AlgoParams]] = AlgoParams
    #: False when clients never talk to the server (no global model to evaluate).
    has_global_model: ClassVar[bool] = True
    #: True when ``eval_arrays`` needs the client's own data (e.g. fine-tuning before evaluation).
    needs_eval_data: ClassVar[bool] = False
    #: True when ``client_step`` declares its training as ``Train`` requests, which the batched
    #: executor stacks across clients; False for methods with their own solver (MOCHA's SDCA).
    batchable: ClassVar[bool] = True
    #: How its server combines the train replies (``fedmtl.algorithms.reduce.ReduceKind``): "mean"
    #: (through the round's chain: client DP, robust and secure aggregation apply), "each", "none"
    #: or "own". Features refuse a combination the kind cannot honour, with the reason; the round
    #: refuses a "mean" algorithm whose rounds use the train replies without reducing them.
    reduces: ClassVar[ReduceKind] = "mean"
    #: Why the server combines replies the way ``reduces`` says, for "each"/"none"/"own" (named in
    #: the refusal of a feature that needs "mean").
    reduces_why: ClassVar[str] = ""
    #: True when the weighted mean of the updates is all the server needs (what secure aggregation
    #: reveals, and what a Poisson-sampled expected-count mean estimates); False when it reduces
    #: per group or keeps each update (hierarchical grouping).
    mean_of_updates: ClassVar[bool] = True

    def __init__(self, params: AlgoParams, ctx: AlgoContext) -> None:
        self.p = params
        self.ctx = ctx

    # --- server side -------------------------------------------------------------------------
    def init_server(self) -> dict[str, Any]:
        """The shared body plus every task's initial head (server names: ``fedmtl.algorithms.heads``)."""
        return {"params": initial_global(self.ctx.task_init, self.ctx.init_arrays)}

    def broadcast(self, server: dict[str, Any], cid: int) -> Message:
        """The message a sampled client receives this round: the body and its task's head."""
        return Message(arrays=for_task(server["params"], self.ctx.task_of(cid), self.ctx.multi_task))

    def broadcast_many(self, server: dict[str, Any], cids: list[int]) -> list[Message]:
        """``[self.broadcast(server, c) for c in cids]``: what the round calls. With the default
        ``broadcast`` one (never modified) Message per task is shared by its clients: a round of
        thousands of clients does not rebuild the same view thousands of times."""
        broadcast = self.broadcast
        if type(self).broadcast is not Algorithm.broadcast:
            return [broadcast(server, c) for c in cids]
        task_of, by_task = self.ctx.task_of, {}
        out = []
        for c in cids:
            task = task_of(c)
            msg = by_task.get(task)
            if msg is None:
                msg = by_task[task] = broadcast(server, c)
            out.append(msg)
        return out

    def expected_reply(self, server: dict[str, Any], cid: int, sent: Message) -> Expected | None:
        """What a valid train reply from ``cid`` looks like, given the message ``sent`` to it.
        Default: new values of exactly the arrays it received (same keys, same shapes)."""
        return sent.arrays

    def server_round(self, server: dict[str, Any], round: int, clients: list[int]) -> ServerRound:
        """The round from the server's side, over the clients that take part (sampled, not
        dropped): one ``TRAIN`` exchange of the broadcasts, the ``reduction`` of its replies, which
        the round carries out, then ``server_update``. A multi-step protocol (split learning)
        yields further exchanges; it then declares ``reduces = "own"``."""
        messages = dict(zip(clients, self.broadcast_many(server, clients), strict=True))
        expected = self.expected_reply
        expect = {c: expected(server, c, m) for c, m in messages.items()}
        replies = yield Exchange(TRAIN, messages, expect)
        request = self.reduction(server, replies, round)
        if request is None:  # nothing to reduce: the replies carry scalars only (local training)
            reported = {c: r.scalars for c, r in replies.items()}
            aggregate = Aggregate(accepted=sorted(replies), replies=replies, reported=reported)
        else:
            aggregate = yield request
        return self.server_update(server, aggregate, round), replies

    def reduction(self, server: dict[str, Any], replies: dict[int, Message], round: int) -> Reduce | None:
        """What to reduce (None: nothing, the replies carry no arrays). Default: every reply as new
        values of ``server["params"]``, heads per task in a multi-task federation."""
        return Reduce(replies, server["params"], groups=self.head_groups(replies))

    def keeps_updates(self) -> bool:
        """Whether its reduction asks for each client's update (``Reduce.keep_updates``), which
        client-level DP and secure aggregation, releasing only a mean, refuse."""
        return False

    def head_groups(self, replies: Mapping[int, Message]) -> dict[int, str] | None:
        """Each client's task, under which its head is reduced (None in a single-task federation)."""
        if not self.ctx.multi_task:
            return None
        task_of = self.ctx.task_of
        return {c: task_of(c) for c in replies}

    def server_update(self, server: dict[str, Any], aggregate: Aggregate, round: int) -> dict[str, Any]:
        """The new server state from the round's aggregate (pure). Default: take the new values."""
        if aggregate.empty:
            return server
        return {**server, "params": {**server["params"], **aggregate.params}}

    def global_params(self, server: dict[str, Any]) -> Arrays | None:
        """The one model every client shares, where there is one (not in multi-task federations,
        whose heads differ per task)."""
        if not self.has_global_model or self.ctx.multi_task:
            return None
        return server.get("params")

    # --- client side -------------------------------------------------------------------------
    def init_client(self, cid: int) -> dict[str, Any]:
        return {}

    def client_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> StepResult:
        """The client's round: ``(new state, reply)``, or a generator that yields ``Train``
        requests (``self.ctx.train(...)``) and returns that pair (``fedmtl.training.work``).
        Default: train the received model; reply with its new values."""
        trained = yield self.ctx.train(data, work, msg.arrays)
        return state, Message(arrays=trained.params, scalars=trained.scalars(data))

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

    @classmethod
    def runs_own_round(cls) -> bool:
        """Whether it replaces the default round (a multi-step protocol), which feature wrappers,
        built around the default round's hooks, cannot see into."""
        return cls.server_round is not Algorithm.server_round

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

    def evaluates_clients(self) -> bool:
        """Whether the training clients evaluate (client-level DP without a private evaluation
        releases nothing of theirs, so they are not asked)."""
        return True

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
