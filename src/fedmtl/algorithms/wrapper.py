"""Cross-cutting behaviour as algorithm wrappers (Flower's DP wrappers and mods, in spirit).

A wrapper is an ``Algorithm`` around another one: sample selection, malicious clients, differential
privacy and secure aggregation change what a client trains on or what it sends, and keep their own
server-side books (a privacy accountant, a detector), without any algorithm knowing. How the server
combines replies is not a wrapper's business: the round carries out every ``Reduce`` request
through the chain the features contribute (``fedmtl.runtime.reduction``).

Because every runtime builds its algorithm through ``experiment.run.build``, a wrapper works in
the simulator and on Flower alike; anything it needs to tell the other side travels inside the
messages. A wrapper that changes the client step does so once, with ``yield from`` around the inner
step (``fedmtl.training.work``), so it runs under every executor."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from fedmtl.algorithms.base import Algorithm, ClientAction, ClientWork, Expected, Message
from fedmtl.algorithms.reduce import Aggregate, Reduce
from fedmtl.data.federated import ClientData
from fedmtl.errors import ConfigError
from fedmtl.training.tensors import Arrays
from fedmtl.training.work import StepResult, Train, Trained, local_work


class AlgorithmWrapper(Algorithm):
    """Delegates every step to ``inner``; subclasses override the steps they change.

    Its round is the default ``server_round`` (one train exchange, ``reduction``, ``server_update``)
    run with the wrapper's own hooks, so each wrapper in a stack takes part. An algorithm that
    replaces the default round (a multi-step protocol) is refused: no wrapper could see into it."""

    #: The inner algorithm's declared properties, which a wrapper keeps (the method's name in every
    #: record; what features check).
    DECLARED = (
        "name", "Params", "has_global_model", "needs_eval_data", "batchable", "reduces", "reduces_why",
        "mean_of_updates",
    )  # fmt: skip

    def __init__(self, inner: Algorithm) -> None:
        self.inner = inner
        self.p = inner.p
        self.ctx = inner.ctx
        for attr in self.DECLARED:
            setattr(self, attr, getattr(inner, attr))
        if type(inner.unwrapped()).runs_own_round():
            raise ConfigError(
                f"config: algorithm.name = {inner.name!r}: its rounds are a multi-step protocol whose "
                f"exchanges {type(self).__name__} cannot see; disable that feature for this algorithm"
            )

    def __getattr__(self, attr: str) -> Any:
        # Only reached for attributes this object lacks: an algorithm's own helpers (e.g. MOCHA's
        # ``_omega_due``) stay reachable through any number of wrappers. Runtimes never rely on
        # this: every hook they call is declared on ``Algorithm`` and delegated above.
        if attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def unwrapped(self) -> Algorithm:
        return self.inner.unwrapped()

    # --- server side -------------------------------------------------------------------------
    def init_server(self) -> dict[str, Any]:
        return self.inner.init_server()

    def broadcast(self, server: dict[str, Any], cid: int) -> Message:
        return self.inner.broadcast(server, cid)

    def broadcast_many(self, server: dict[str, Any], cids: list[int]) -> list[Message]:
        if type(self).broadcast is not AlgorithmWrapper.broadcast:  # this wrapper changes messages
            return super().broadcast_many(server, cids)
        return self.inner.broadcast_many(server, cids)

    def expected_reply(self, server: dict[str, Any], cid: int, sent: Message) -> Expected | None:
        return self.inner.expected_reply(server, cid, sent)

    def reduction(self, server: dict[str, Any], replies: dict[int, Message], round: int) -> Reduce | None:
        return self.inner.reduction(server, replies, round)

    def keeps_updates(self) -> bool:
        return self.inner.keeps_updates()

    def server_update(self, server: dict[str, Any], aggregate: Aggregate, round: int) -> dict[str, Any]:
        return self.inner.server_update(server, aggregate, round)

    def global_params(self, server: dict[str, Any]) -> Arrays | None:
        return self.inner.global_params(server)

    def round_info(self, server: dict[str, Any]) -> dict[str, Any]:
        return self.inner.round_info(server)

    def stop_reason(self, server: dict[str, Any], round: int) -> str | None:
        return self.inner.stop_reason(server, round)

    # --- client side -------------------------------------------------------------------------
    def init_client(self, cid: int) -> dict[str, Any]:
        return self.inner.init_client(cid)

    def client_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> StepResult:
        return self.inner.client_step(state, data, msg, work)

    def client_actions(self) -> dict[str, ClientAction]:
        return self.inner.client_actions()

    def steps_per_round(self, data: ClientData) -> int:
        return self.inner.steps_per_round(data)

    def eval_arrays(
        self, server: dict[str, Any], state: dict[str, Any], cid: int, data: ClientData | None = None
    ) -> Arrays:
        return self.inner.eval_arrays(server, state, cid, data)

    def eval_view(self, server: dict[str, Any], cid: int) -> dict[str, Any]:
        return self.inner.eval_view(server, cid)

    def evaluates_clients(self) -> bool:
        return self.inner.evaluates_clients()

    def release_eval(self, client_rows: list[dict[str, Any]], round: int) -> dict[str, Any] | None:
        return self.inner.release_eval(client_rows, round)

    def shared_eval_arrays(self, server: dict[str, Any], state: dict[str, Any], cid: int) -> Arrays | None:
        return self.inner.shared_eval_arrays(server, state, cid)

    def new_client_arrays(self, server: dict[str, Any], cid: int) -> Arrays:
        return self.inner.new_client_arrays(server, cid)


class ReplyWrapper(AlgorithmWrapper):
    """A wrapper that only transforms each client's reply after the inner client step (clip and
    noise it, encrypt or mask it), whichever executor carries the step out."""

    def after_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork, reply: Message
    ) -> tuple[dict[str, Any], Message]:
        raise NotImplementedError

    def client_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> Generator[Train, Trained, tuple[dict[str, Any], Message]]:
        state, reply = yield from local_work(self.inner.client_step(state, data, msg, work))
        return self.after_step(state, data, msg, work, reply)
