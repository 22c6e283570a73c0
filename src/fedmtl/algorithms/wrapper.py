"""Cross-cutting behaviour as algorithm wrappers (Flower's DP wrappers and mods, in spirit).

A wrapper is an ``Algorithm`` around another one: sample selection, malicious clients, differential
privacy and secure aggregation change what a client trains on, what it sends, or how the server
combines replies, without any algorithm knowing. Because every runtime builds its algorithm through
``experiment.run.build``, a wrapper works in the simulator and on Flower alike; anything it needs
to tell the other side travels inside the messages."""

from __future__ import annotations

from typing import Any

from fedmtl.algorithms.base import Algorithm, ClientWork, Message
from fedmtl.data.federated import ClientData
from fedmtl.training.batched import DEFAULT_MEMORY_BYTES
from fedmtl.training.tensors import Arrays


class AlgorithmWrapper(Algorithm):
    """Delegates every step to ``inner``; subclasses override the steps they change."""

    def __init__(self, inner: Algorithm) -> None:
        self.inner = inner
        self.p = inner.p
        self.ctx = inner.ctx
        self.name = inner.name  # type: ignore[misc]  # the wrapped method's name everywhere
        self.Params = inner.Params  # type: ignore[misc]
        self.has_global_model = inner.has_global_model  # type: ignore[misc]
        self.needs_eval_data = inner.needs_eval_data  # type: ignore[misc]

    def __getattr__(self, attr: str) -> Any:
        # Only reached for attributes this object lacks: algorithm-specific extras such as MOCHA's
        # ``client_actions`` stay reachable through any number of wrappers.
        if attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def unwrapped(self) -> Algorithm:
        algo: Algorithm = self.inner
        while isinstance(algo, AlgorithmWrapper):
            algo = algo.inner
        return algo

    # --- server side -------------------------------------------------------------------------
    def init_server(self) -> dict[str, Any]:
        return self.inner.init_server()

    def broadcast(self, server: dict[str, Any], cid: int) -> Message:
        return self.inner.broadcast(server, cid)

    def server_step(self, server: dict[str, Any], replies: dict[int, Message], round: int) -> dict[str, Any]:
        return self.inner.server_step(server, replies, round)

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
    ) -> tuple[dict[str, Any], Message]:
        return self.inner.client_step(state, data, msg, work)

    def eval_arrays(self, server: dict[str, Any], state: dict[str, Any], cid: int) -> Arrays:
        return self.inner.eval_arrays(server, state, cid)

    def shared_eval_arrays(self, server: dict[str, Any], state: dict[str, Any], cid: int) -> Arrays | None:
        return self.inner.shared_eval_arrays(server, state, cid)

    def new_client_arrays(self, server: dict[str, Any], cid: int) -> Arrays:
        return self.inner.new_client_arrays(server, cid)

    # --- batched execution --------------------------------------------------------------------
    def batched_client_step(
        self,
        states: list[dict[str, Any]],
        datas: list[ClientData],
        msgs: list[Message],
        works: list[ClientWork],
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
    ) -> tuple[list[dict[str, Any]], list[Message]]:
        return self.inner.batched_client_step(states, datas, msgs, works, memory_bytes)

    def batched_unsupported(self) -> str | None:
        """A wrapper that changes ``client_step`` but not ``batched_client_step`` would be skipped
        by batched execution, so it makes the stack sequential-only."""
        cls = type(self)
        if cls.client_step is not AlgorithmWrapper.client_step and (
            cls.batched_client_step is AlgorithmWrapper.batched_client_step
        ):
            return f"{cls.__name__} has no batched client step"
        return self.inner.batched_unsupported()


class ReplyWrapper(AlgorithmWrapper):
    """A wrapper that only transforms each client's reply after the inner client step (clip and
    noise it, encrypt or mask it), the same way in sequential and batched execution."""

    def after_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork, reply: Message
    ) -> tuple[dict[str, Any], Message]:
        raise NotImplementedError

    def client_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> tuple[dict[str, Any], Message]:
        state, reply = self.inner.client_step(state, data, msg, work)
        return self.after_step(state, data, msg, work, reply)

    def batched_client_step(
        self,
        states: list[dict[str, Any]],
        datas: list[ClientData],
        msgs: list[Message],
        works: list[ClientWork],
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
    ) -> tuple[list[dict[str, Any]], list[Message]]:
        new_states, replies = self.inner.batched_client_step(states, datas, msgs, works, memory_bytes)
        out = [self.after_step(*args) for args in zip(new_states, datas, msgs, works, replies, strict=True)]
        return [s for s, _ in out], [r for _, r in out]
