"""The protocol's stages as exchanges, and a standalone in-process run of them for tests and
benchmarks.

``protocol_stages`` is the server side of stages 1-3: a generator that yields one ``Exchange`` per
stage (``secagg_share``, ``secagg_mask``, ``secagg_unmask``) and gets the clients' replies back. In
a run, the secure-aggregation wrapper yields those exchanges from its ``server_round``, so the
round's transport delivers them like any other (in-process in the simulator, as Flower messages on
a federation). ``secure_sum`` runs them on ``LocalClients`` (sessions in a dict, optional dropouts)
with byte and time accounting (``Traffic``), without a federation around them."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmtl.algorithms.base import Exchange, Message
from fedmtl.errors import ProtocolError
from fedmtl.secagg.protocol import (
    ADVERTISE,
    MASK,
    SHARE,
    STAGES,
    UNMASK,
    SecAggServer,
    client_advertise,
    client_masked_input,
    client_share_keys,
    client_unmask,
    refusal,
)
from fedmtl.secagg.quantize import RingCodec

#: ``(action, {cid: Message}, round) -> ({cid: reply}, {cid: why missing})``: a standalone delivery.
Deliver = Callable[[str, dict[int, Message], int], tuple[dict[int, Message], dict[int, str]]]
#: Flower message sub-types of the three server-initiated stages (``train.<action>``).
ACTIONS = {SHARE: "secagg_share", MASK: "secagg_mask", UNMASK: "secagg_unmask"}


def message_bytes(msg: Message) -> int:
    """Bytes of a message's arrays plus 8 per scalar (what a binary encoding would carry)."""
    return msg.nbytes + 8 * len(msg.scalars)


@dataclass
class Traffic:
    """Bytes (per client) and client compute seconds, per stage."""

    up: dict[str, dict[int, int]] = field(default_factory=lambda: {s: {} for s in STAGES})
    down: dict[str, dict[int, int]] = field(default_factory=lambda: {s: {} for s in STAGES})
    seconds: dict[str, dict[int, float]] = field(default_factory=lambda: {s: {} for s in STAGES})

    def add(
        self, stage: str, cid: int, down: Message | None, up: Message | None, seconds: float | None = None
    ) -> None:
        """``seconds``: the client's compute time, where it is measured here (standalone runs)."""
        if down is not None:
            self.down[stage][cid] = self.down[stage].get(cid, 0) + message_bytes(down)
        if up is not None:
            self.up[stage][cid] = self.up[stage].get(cid, 0) + message_bytes(up)
        if seconds is not None:
            self.seconds[stage][cid] = self.seconds[stage].get(cid, 0.0) + seconds

    def summary(self) -> dict[str, Any]:
        """Per stage: total bytes up/down, mean bytes per participating client, client seconds."""
        out: dict[str, Any] = {}
        for s in STAGES:
            up, down, sec = self.up[s], self.down[s], self.seconds[s]
            if not (up or down or sec):
                continue
            out[s] = {
                "bytes_up": int(sum(up.values())),
                "bytes_down": int(sum(down.values())),
                "bytes_up_per_client": float(np.mean(list(up.values()))) if up else 0.0,
                "bytes_down_per_client": float(np.mean(list(down.values()))) if down else 0.0,
            }
            if sec:
                out[s]["client_seconds_mean"] = float(np.mean(list(sec.values())))
                out[s]["client_seconds_max"] = float(max(sec.values()))
        return out

    def totals(self) -> tuple[int, int]:
        return (
            int(sum(sum(v.values()) for v in self.up.values())),
            int(sum(sum(v.values()) for v in self.down.values())),
        )


def protocol_stages(
    server: SecAggServer, advertised: dict[int, Message], sampled: int | None = None
) -> Generator[Exchange, dict[int, Message], np.ndarray]:
    """Stages 1-3 driven from the server: yields each stage's exchange, returns the ring sum of the
    surviving inputs, or raises a one-line ``ProtocolError`` (threshold not met, inconsistent shares)."""
    msgs = server.collect_keys(advertised, sampled)
    replies = yield Exchange(ACTIONS[SHARE], msgs)
    msgs = server.route_shares(replies)
    replies = yield Exchange(ACTIONS[MASK], msgs)
    msgs = server.collect_masked(replies)
    replies = yield Exchange(ACTIONS[UNMASK], msgs)
    return server.unmask(replies)


def run_stages(
    server: SecAggServer, advertised: dict[int, Message], deliver: Deliver, sampled: int | None = None
) -> np.ndarray:
    """``protocol_stages`` with every exchange handed to ``deliver`` (a standalone run)."""
    stages = protocol_stages(server, advertised, sampled)
    try:
        exchange = next(stages)
        while True:
            replies, _ = deliver(exchange.action, exchange.messages, server.round)
            exchange = stages.send(replies)
    except StopIteration as stop:
        return stop.value


Handler = Callable[[int, str, Message, int], Message]


class InProcessExchange:
    """Delivers each message to ``handler(cid, action, msg, round)`` in this process.

    ``drop(stage, cid)`` says whether a client vanishes just before a stage (it then never sees the
    message); ``traffic`` records what crossed the (simulated) wire and the clients' compute time."""

    def __init__(self, handler: Handler, drop: Callable[[str, int], bool] | None = None) -> None:
        self.handler = handler
        self.drop = drop or (lambda stage, cid: False)
        self.traffic = Traffic()
        self.stage_of = {a: s for s, a in ACTIONS.items()}

    def __call__(
        self, action: str, msgs: dict[int, Message], rnd: int
    ) -> tuple[dict[int, Message], dict[int, str]]:
        stage = self.stage_of.get(action, action)
        replies: dict[int, Message] = {}
        missing: dict[int, str] = {}
        for cid, msg in msgs.items():
            if self.drop(stage, cid):
                missing[cid] = f"dropped before {stage}"
                continue
            t0 = time.perf_counter()
            reply = self.handler(cid, action, msg, rnd)
            self.traffic.add(stage, cid, msg, reply, time.perf_counter() - t0)
            replies[cid] = reply
        return replies, missing


class LocalClients:
    """In-process clients holding their own sessions: the standalone protocol for tests and
    benchmarks (the simulator's wrapper keeps sessions in each client's state instead)."""

    def __init__(self, codec: RingCodec, drop_before: dict[str, set[int]] | None = None) -> None:
        self.codec = codec
        self.sessions: dict[int, dict[str, Any]] = {}
        drops = drop_before or {}
        self.exchange = InProcessExchange(self.handle, lambda stage, cid: cid in drops.get(stage, set()))
        self._drop_advertise = drops.get(ADVERTISE, set())

    @property
    def traffic(self) -> Traffic:
        return self.exchange.traffic

    def advertise(self, inputs: dict[int, np.ndarray], rnd: int) -> dict[int, Message]:
        out = {}
        for cid, x in inputs.items():
            if cid in self._drop_advertise:
                continue
            t0 = time.perf_counter()
            self.sessions[cid], out[cid] = client_advertise(cid, rnd, x)
            self.traffic.add(ADVERTISE, cid, None, out[cid], time.perf_counter() - t0)
        return out

    def handle(self, cid: int, action: str, msg: Message, rnd: int) -> Message:
        s = self.sessions[cid]
        try:
            if action == ACTIONS[SHARE]:
                self.sessions[cid], reply = client_share_keys(s, msg)
            elif action == ACTIONS[MASK]:
                self.sessions[cid], reply = client_masked_input(s, msg, self.codec)
            else:
                reply = client_unmask(s, msg)
                del self.sessions[cid]
        except ProtocolError as exc:
            return refusal(exc)
        return reply


def secure_sum(
    inputs: dict[int, np.ndarray],
    codec: RingCodec,
    threshold: int,
    rnd: int = 1,
    drop_before: dict[str, set[int]] | None = None,
    neighbors: int = 0,
) -> tuple[np.ndarray, SecAggServer, Traffic]:
    """One full protocol round over encoded inputs (uint64 ring vectors): (ring sum, server, traffic).
    ``neighbors`` > 0 masks over SecAgg+'s k-regular graph instead of all pairs."""
    clients = LocalClients(codec, drop_before)
    length = len(next(iter(inputs.values())))
    server = SecAggServer(codec, length, threshold, rnd, neighbors, graph_seed=rnd)
    total = run_stages(server, clients.advertise(inputs, rnd), clients.exchange, sampled=len(inputs))
    return total, server, clients.traffic
