"""The simulator's transport: every client lives in this process.

A ``train`` exchange runs the addressed clients' steps through an executor (one after another, or
batched across clients); any other action runs the client's declared ``client_actions`` method.
Client states live in a dict here; a round works on copies of the entries it touches and keeps
them when the round finishes (a client whose reply was refused keeps its old state, as a node
whose message the server rejected would)."""

from __future__ import annotations

import time
from typing import Any

from fedmtl.algorithms.base import TRAIN, Algorithm, ClientWork, Message
from fedmtl.data.federated import FederatedData
from fedmtl.errors import ProtocolError
from fedmtl.experiment.evaluate import evaluate_clients
from fedmtl.runtime.loop import Done
from fedmtl.runtime.round import TRAIN_STREAM, Delivered, RoundPlan
from fedmtl.training.executors import BatchedExecutor, SequentialExecutor
from fedmtl.training.shuffle import Stream


class InProcessTransport:
    reports_missing = False

    def __init__(
        self, algo: Algorithm, data: FederatedData, executor: SequentialExecutor | BatchedExecutor, seed: int
    ) -> None:
        self.algo = algo
        self.data = data
        self.executor = executor
        self.seed = seed
        #: client id -> client state (the simulator binds the dict its caller keeps)
        self.states: dict[int, dict[str, Any]] = {}
        self._working: dict[int, dict[str, Any]] = {}

    @property
    def execution(self) -> str:
        return self.executor.name

    def _state(self, cid: int) -> dict[str, Any]:
        state = self._working.get(cid)
        if state is None:
            state = self.states.get(cid)
        if state is None:
            state = self.algo.init_client(cid)
        return state

    def exchange(self, action: str, messages: dict[int, Message], plan: RoundPlan) -> Delivered:
        clients = self.data.clients
        replies: dict[int, Message] = {}
        wall: dict[int, float] = {}
        if action == TRAIN:
            cids = list(messages)
            work = plan.work
            jobs = [(self._state(c), clients[c], messages[c], work[c]) for c in cids]
            outcomes = self.executor.run(self.algo.client_step, jobs) if jobs else []
            for cid, (state, reply, seconds) in zip(cids, outcomes, strict=True):
                self._working[cid] = state
                replies[cid] = reply
                wall[cid] = seconds
            return Delivered(replies, {}, wall)
        method = self.algo.client_actions().get(action)
        if method is None:
            raise ProtocolError(f"algorithm {self.algo.name!r} has no client action {action!r}")
        for cid, msg in messages.items():
            w = plan.work.get(cid)
            if w is None:
                raise ProtocolError(f"client {cid} does not take part in round {plan.round}")
            # a fresh copy of the round's stream per message, as a node builds it from its message
            work = ClientWork(w.round, w.fraction, Stream(self.seed, TRAIN_STREAM, w.round, cid), w.lr)
            t0 = time.perf_counter()
            self._working[cid], replies[cid] = method(self._state(cid), clients[cid], msg, work)
            wall[cid] = time.perf_counter() - t0
        return Delivered(replies, {}, wall)

    def finish(self, plan: RoundPlan, rejected: set[int]) -> dict[str, Any]:
        states = self.states
        for cid, state in self._working.items():
            if cid not in rejected:
                states[cid] = state
        self._working = {}
        return {}

    def evaluate(self, server: dict[str, Any], round: int, clients: list[int]) -> Done:
        return Done(evaluate_clients(self.algo, server, self.states, self.data, round, clients))

    def client_states(self) -> dict[int, dict[str, Any]]:
        return self.states

    def checkpointed(self, round: int) -> None:
        """Nothing to tell: the simulator's client states are checkpointed with the run."""
