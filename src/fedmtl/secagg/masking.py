"""``SecAggWrapper``: FedAvg-family training where the server only learns the weighted sum.

Client side (``client_step`` and the three ``client_actions``): the inner algorithm trains as
usual, then its update (client model - broadcast) is clipped, optionally noised, quantised,
weighted and kept in the client's own state; what leaves the client is its public keys, then
ciphertexts, then the masked vector, then shares. Server side (``server_round``): the train
exchange's replies are the advertised keys; stages 1-3 are further exchanges of the same round,
which the runtime delivers like any other (in-process in the simulator, ``train.secagg_*`` messages
on Flower); the server decodes the sum into the mean update and hands the inner algorithm one
aggregated reply, so its own server step (server optimizer included) runs unchanged. An aborted
round (fewer than t clients left at some stage) leaves the global model as it was and is recorded
in the round row."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Generator
from typing import Any

import numpy as np

from fedmtl.algorithms.base import TRAIN, Algorithm, ClientAction, ClientWork, Exchange, Message, ServerRound
from fedmtl.algorithms.wrapper import ReplyWrapper
from fedmtl.config import Config
from fedmtl.data.federated import ClientData, FederatedData
from fedmtl.errors import ProtocolError
from fedmtl.runtime.seeds import derived_rng
from fedmtl.runtime.validation import reply_problem
from fedmtl.secagg.channel import ACTIONS, Traffic, protocol_stages
from fedmtl.secagg.layout import Layout
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
from fedmtl.training.work import Train, Trained

#: Purposes of derived random streams (the simulator uses 1-3).
ROUNDING, STAGE_DROP, GRAPH = 101, 103, 104
#: Key of the one aggregated reply handed to the inner server step (it comes from no single client).
AGGREGATE = -1
#: Client scalars that may travel in the clear next to the keys (run bookkeeping, not the update).
METRICS = ("train_loss", "steps", "samples", "personal_loss")


def sampled_per_round(cfg: Config, data: FederatedData) -> int:
    """The simulator's number of clients sampled per round (before drops)."""
    n = len(data.train_clients)
    c = cfg.clients
    k = c.per_round if c.per_round is not None else max(1, round(c.fraction * n))
    return min(k, n)


def share_holders(cfg: Config, sampled: int) -> int:
    """How many clients hold shares of one client's secrets (itself included)."""
    k = cfg.secagg.neighbors
    return sampled if k == 0 or k >= sampled - 1 else k + 1


def threshold_for(cfg: Config, sampled: int) -> int:
    """Shamir's t: of the sampled clients, or of one neighbourhood with ``neighbors`` (SecAgg+)."""
    sa = cfg.secagg
    n = share_holders(cfg, sampled)
    return sa.threshold if sa.threshold is not None else max(2, math.ceil(sa.threshold_fraction * n))


class SecureUpdates(ReplyWrapper):
    """Shared by both modes: encoding updates, the aggregated reply, the round row."""

    def __init__(self, inner: Algorithm, cfg: Config, data: FederatedData) -> None:
        super().__init__(inner)
        self.sa = cfg.secagg
        self.seed = cfg.seed
        self.data = data
        self.sampled = sampled_per_round(cfg, data)
        self.threshold = threshold_for(cfg, self.sampled)
        train = [data.clients[c] for c in data.train_clients]
        total = sum(c.n_train for c in train) if self.sa.weighting == "samples" else len(train)
        self.codec = RingCodec.for_weights(
            self.sa.bits, self.sa.clip, total, self.sa.rounding == "stochastic"
        )

    def layout(self, msg: Message) -> Layout:
        return Layout.of(msg.arrays)

    def weight_of(self, reply: Message) -> int:
        return int(reply.scalars["num_examples"]) if self.sa.weighting == "samples" else 1

    def client_delta(self, cid: int, msg: Message, reply: Message, work: ClientWork) -> np.ndarray:
        """The update that gets protected: client model - broadcast. Differential privacy's clipping
        and noise (``privacy.noise_at: client``) are already in it: that wrapper sits inside this one."""
        return self.layout(msg).delta(reply.arrays, msg.arrays, f"client {cid}")

    def clear_scalars(self, reply: Message) -> dict[str, Any]:
        if not self.sa.send_metrics:
            return {}
        return {k: reply.scalars[k] for k in METRICS if k in reply.scalars}

    def aggregated(self, server: dict[str, Any], mean: np.ndarray, total_weight: int) -> Message:
        base = self.inner.broadcast(server, next(iter(self.data.train_clients)))
        return Message(
            arrays=self.layout(base).apply(base.arrays, mean), scalars={"num_examples": total_weight}
        )

    def round_info(self, server: dict[str, Any]) -> dict[str, Any]:
        return {**self.inner.round_info(server), **server.get("secagg", {})}


class SecAggWrapper(SecureUpdates):
    """Pairwise-masking secure aggregation around a FedAvg-family algorithm (see module doc)."""

    def __init__(self, inner: Algorithm, cfg: Config, data: FederatedData) -> None:
        super().__init__(inner, cfg, data)
        #: Tests: clients forced to drop just before a stage, e.g. {"masked_input": {3}}.
        self.force_drop: dict[str, set[int]] = {}

    def client_actions(self) -> dict[str, ClientAction]:
        return {
            **self.inner.client_actions(),
            ACTIONS[SHARE]: self.client_share_keys,
            ACTIONS[MASK]: self.client_masked_input,
            ACTIONS[UNMASK]: self.client_unmask,
        }

    # --- client side ---------------------------------------------------------------------------
    def client_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> Generator[Train, Trained, tuple[dict[str, Any], Message]]:
        # a session left by a round this client dropped out of never serves another round
        return (yield from super().client_step(_ended(state), data, msg, work))

    def after_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork, reply: Message
    ) -> tuple[dict[str, Any], Message]:
        cid = data.cid
        if reply_problem(reply) is not None:  # diverged: the runtime rejects and names this client
            return state, Message(arrays={"update": np.array([np.nan], np.float32)})
        delta = self.client_delta(cid, msg, reply, work)
        rng = derived_rng(self.seed, ROUNDING, work.round, cid)
        x, clipped = self.codec.encode(delta, self.weight_of(reply), rng)
        session, adv = client_advertise(cid, work.round, x)
        adv.scalars.update(self.clear_scalars(reply))
        if self.sa.send_metrics:  # how many coordinates hit the clip range: tuning feedback
            adv.scalars["secagg_clipped"] = clipped
        return {**state, "secagg": session}, adv

    def _session(self, state: dict[str, Any], cid: int) -> dict[str, Any]:
        if "secagg" not in state:
            raise ProtocolError(f"secagg: client {cid} has no protocol session (it did not train this round)")
        return state["secagg"]

    def client_share_keys(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> tuple[dict[str, Any], Message]:
        try:
            session, reply = client_share_keys(self._session(state, data.cid), msg)
        except ProtocolError as exc:  # refuse (counts as a dropout) rather than crash the node
            return _ended(state), refusal(exc)
        return {**state, "secagg": session}, reply

    def client_masked_input(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> tuple[dict[str, Any], Message]:
        try:
            session, reply = client_masked_input(self._session(state, data.cid), msg, self.codec)
        except ProtocolError as exc:
            return _ended(state), refusal(exc)
        return {**state, "secagg": session}, reply

    def client_unmask(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> tuple[dict[str, Any], Message]:
        try:
            reply = client_unmask(self._session(state, data.cid), msg)
        except ProtocolError as exc:
            reply = refusal(exc)
        return _ended(state), reply

    # --- server side ---------------------------------------------------------------------------
    def _drops(self, stage: str, cid: int, rnd: int) -> bool:
        """Whether ``cid`` drops out just before ``stage`` (``stage_drop_prob``, a simulated fault)."""
        if cid in self.force_drop.get(stage, set()):
            return True
        p = self.sa.stage_drop_prob
        return p > 0 and derived_rng(self.seed, STAGE_DROP, rnd, cid, STAGES.index(stage)).random() < p

    def _stages(
        self, srv: SecAggServer, advertised: dict[int, Message], traffic: Traffic
    ) -> Generator[Exchange, dict[int, Message], np.ndarray]:
        """``protocol_stages`` with the simulated stage dropouts and per-stage byte counts."""
        stages = protocol_stages(srv, advertised, self.sampled)
        stage_of = {a: s for s, a in ACTIONS.items()}
        try:
            exchange = next(stages)
            while True:
                stage = stage_of[exchange.action]
                msgs = {c: m for c, m in exchange.messages.items() if not self._drops(stage, c, srv.round)}
                replies = yield Exchange(exchange.action, msgs)
                for cid, m in msgs.items():
                    traffic.add(stage, cid, m, replies.get(cid))
                exchange = stages.send(replies)
        except StopIteration as stop:
            return stop.value

    def server_round(self, server: dict[str, Any], round: int, clients: list[int]) -> ServerRound:
        """The train exchange (each reply: a client's public keys, its update masked in its state),
        stages 1-3 as further exchanges, then the inner server step on the one aggregated reply."""
        messages = dict(zip(clients, self.broadcast_many(server, clients), strict=True))
        replies = yield Exchange(TRAIN, messages)
        t0 = time.perf_counter()
        base = self.inner.broadcast(server, next(iter(self.data.train_clients)))
        length = self.layout(base).size + 1
        graph_seed = int(derived_rng(self.seed, GRAPH, round).integers(2**31))
        srv = SecAggServer(self.codec, length, self.threshold, round, self.sa.neighbors, graph_seed)
        clipped = sum(int(r.scalars.get("secagg_clipped", 0)) for r in replies.values())
        info: dict[str, Any] = {
            "secagg_threshold": self.threshold,
            "secagg_ring_bytes": self.codec.ring_bytes,
        }
        traffic = Traffic()
        new = server
        try:
            total = yield from self._stages(srv, replies, traffic)
            mean, weight = self.codec.decode_sum(total)
            agg = self.aggregated(server, mean, weight)
            new = self.inner.server_step(server, {AGGREGATE: agg}, round)
            info["secagg_status"] = "ok"
        except ProtocolError as exc:
            info.update(secagg_status="aborted", secagg_error=str(exc))
            print(f"fedmtl: {exc}", file=sys.stderr)
        summary = srv.summary()
        up, down = traffic.totals()  # beyond the train exchange, which the round counts
        for cid, r in replies.items():
            traffic.add(ADVERTISE, cid, None, r)
        info.update(
            secagg_survivors=summary["survivors"],
            secagg_recovered=summary["recovered"],
            secagg_dropped=summary["dropped"],
            secagg_clipped_fraction=clipped / max(1, len(replies) * (length - 1)),
            secagg_server_seconds=sum(summary["server_seconds"].values()),
            secagg_round_seconds=time.perf_counter() - t0,
            secagg_bytes_up=up,
            secagg_bytes_down=down,
            secagg_stages=traffic.summary(),
        )
        return {**new, "secagg": info}, replies


def _ended(state: dict[str, Any]) -> dict[str, Any]:
    """The client state once its protocol session is over (its secrets die with the round)."""
    return {k: v for k, v in state.items() if k != "secagg"}


__all__ = ["SecAggWrapper", "SecureUpdates"]
