"""One round, owned here: the plan, the exchanges with the clients, and the finish.

- **Plan** (``Planner``): which clients are sampled (seeded per round), each one's work fraction and
  whether it drops (seeded per round and client), the round's learning rate, and each client's
  random stream. Every runtime plans with this code, so a seed gives the same round everywhere.
- **Exchanges**: the algorithm's ``server_round`` yields ``Exchange``s (one ``train`` exchange for
  most methods; more for split learning and secure aggregation); a ``Transport`` delivers each one
  (in-process through an executor, or over Flower's Grid) and the round counts every message's
  bytes and every client's compute time, whatever the exchange.
- **Checks**: every reply of every exchange is checked against what the algorithm declared it
  expects (``Exchange.expect``) before the algorithm sees it: a diverged client's NaN or a
  malformed reply never reaches an average; that client is out of the round, its new state dropped.
- **Reduction**: the algorithm's ``Reduce`` requests are carried out here, by the run's reducer
  (``fedmtl.runtime.reduction``: the features' and the user's aggregation chain, or secure
  aggregation's exchanges), never by the algorithm.
- **Finish**: one row per sampled client and the round's facts (``RoundResult``).

All randomness is derived from (seed, purpose, round, client), never from a shared stream, so a
resumed run draws exactly what an uninterrupted one would, on any runtime."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fedmtl.algorithms.base import TRAIN, Algorithm, ClientWork, Exchange, Message
from fedmtl.algorithms.reduce import Aggregate, Reduce
from fedmtl.errors import ProtocolError
from fedmtl.runtime.reduction import CHAIN_STATE, Reducer
from fedmtl.runtime.seeds import derived_rng, derived_rngs
from fedmtl.runtime.validation import check_replies
from fedmtl.training.shuffle import streams

if TYPE_CHECKING:
    from fedmtl.config import Config
    from fedmtl.data.federated import FederatedData

# Purposes for derived random streams (stable small ints; never reorder).
SAMPLE, SYSTEMS, TRAIN_STREAM = 1, 2, 3


def round_lr(cfg: Config, round: int) -> float:
    t = cfg.train
    if t.lr_schedule == "exponential":
        return t.lr * t.lr_decay ** (round - 1)
    if t.lr_schedule == "cosine":
        return t.lr * 0.5 * (1 + math.cos(math.pi * (round - 1) / t.rounds))
    return t.lr


@dataclass
class RoundPlan:
    """Who takes part in a round and what each client is granted."""

    round: int
    lr: float
    sampled: list[int]
    fractions: list[float]
    dropped: list[bool]
    #: ClientWork of every sampled client that does not drop, in sampled order
    work: dict[int, ClientWork] = field(default_factory=dict)

    @property
    def live(self) -> list[int]:
        return list(self.work)


def sample_size(cfg: Config, population: int) -> int:
    """Clients sampled per round from ``population`` training clients (``clients.per_round``, or
    ``clients.fraction`` of them, at least one)."""
    c = cfg.clients
    k = c.per_round if c.per_round is not None else max(1, round(c.fraction * population))
    return min(k, population)


class Planner:
    """Client sampling, systems draws (stragglers, drops) and learning rate, from the config."""

    def __init__(self, cfg: Config, train_clients: list[int]) -> None:
        self.cfg = cfg
        self.pool = list(train_clients)

    def num_sampled(self) -> int:
        return sample_size(self.cfg, len(self.pool))

    @property
    def poisson(self) -> bool:
        return self.cfg.clients.sampling == "poisson"

    def rate(self) -> float:
        """Poisson sampling's q: each client's chance to take part in a round."""
        return self.num_sampled() / len(self.pool)

    def sample(self, round: int) -> list[int]:
        """Seeded per round, from the clients that train (held-out clients never do): exactly
        ``num_sampled`` of them (fixed), or each with probability ``rate`` (Poisson: a round may
        have any size, none included)."""
        pool = self.pool
        k = self.num_sampled()
        if k == len(pool):
            return list(pool)
        rng = derived_rng(self.cfg.seed, SAMPLE, round)
        if self.poisson:
            return [c for c, u in zip(pool, rng.random(len(pool)).tolist(), strict=True) if u < k / len(pool)]
        return sorted(pool[int(i)] for i in rng.choice(len(pool), size=k, replace=False))

    def systems(self, round: int, cids: list[int]) -> list[tuple[float, bool]]:
        """(work fraction, dropped) for each client, each from its own (seed, round, client) stream."""
        rt = self.cfg.runtime
        lo, hi = rt.work_fraction
        always = set(rt.always_drop)
        if hi <= lo and rt.drop_prob == 0:  # nothing to draw: skip building the rngs (same result)
            return [(float(hi), cid in always) for cid in cids]
        out = []
        for cid, rng in zip(cids, derived_rngs(self.cfg.seed, SYSTEMS, round, cids), strict=True):
            frac = float(rng.uniform(lo, hi)) if hi > lo else float(hi)
            out.append((frac, bool(rng.random() < rt.drop_prob) or cid in always))
        return out

    def plan(self, round: int) -> RoundPlan:
        lr = round_lr(self.cfg, round)
        sampled = self.sample(round)
        draws = self.systems(round, sampled)
        live = [cid for cid, (_, dropped) in zip(sampled, draws, strict=True) if not dropped]
        rngs = streams(self.cfg.seed, TRAIN_STREAM, round, live)
        frac_of = dict(zip(sampled, (f for f, _ in draws), strict=True))
        work = {cid: ClientWork(round, frac_of[cid], rng, lr) for cid, rng in zip(live, rngs, strict=True)}
        return RoundPlan(round, lr, sampled, [f for f, _ in draws], [d for _, d in draws], work)


@dataclass
class Delivered:
    """What came back from one exchange: replies, why the others did not answer, and each
    answering client's compute seconds."""

    replies: dict[int, Message]
    missing: dict[int, str] = field(default_factory=dict)
    wall: dict[int, float] = field(default_factory=dict)


class Transport(Protocol):
    """Moves a round's messages to the clients and back; it holds no round logic."""

    #: what the round row records as ``execution`` ("sequential", "batched", "flower")
    execution: str
    #: whether clients can fail to answer (then every round row lists ``missing_clients``)
    reports_missing: bool

    def exchange(self, action: str, messages: dict[int, Message], plan: RoundPlan) -> Delivered:
        """Deliver ``messages`` for ``action`` (``TRAIN``: the client step) and collect replies."""
        ...

    def finish(self, plan: RoundPlan, rejected: set[int]) -> dict[str, Any]:
        """The round is over: keep the new client states (but those of ``rejected`` clients,
        whose replies were refused); returns transport facts for the round row."""
        ...


@dataclass
class RoundResult:
    server: dict[str, Any]
    replies: dict[int, Message]
    train_rows: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Ledger:
    """What one round's exchanges leave behind: bytes and compute seconds per client, who left the
    round (no reply, or a refused one) and why, every train reply (refused ones included)."""

    down: dict[int, int]
    up: dict[int, int]
    wall: dict[int, float]
    gone: dict[int, str] = field(default_factory=dict)  # live clients that missed an exchange
    rejected: dict[int, str] = field(default_factory=dict)  # clients whose reply was refused
    trained: dict[int, Message] = field(default_factory=dict)
    reduced: bool = False  # whether the train replies went through a "mean" reduction
    facts: dict[str, Any] = field(default_factory=dict)  # the reductions' facts for the round row


class RoundRunner:
    """Runs rounds of one algorithm over one transport; carries out its reductions with
    ``reducer`` (``fedmtl.runtime.reduction``; default: the run's, from its features and its
    ``aggregation:`` list)."""

    def __init__(
        self,
        algo: Algorithm,
        cfg: Config,
        planner: Planner,
        flops_per_sample: float,
        data: FederatedData,
        reducer: Reducer | None = None,
    ) -> None:
        self.algo = algo
        self.cfg = cfg
        self.planner = planner
        self.flops = flops_per_sample
        if reducer is None:
            from fedmtl.features import round_reducer  # features build on the round: imported late

            reducer = round_reducer(algo, cfg, data)
        self.reducer = reducer

    def comm_seconds(self, up: int, down: int) -> float:
        rt = self.cfg.runtime
        return up * 8 / (rt.uplink_mbps * 1e6) + down * 8 / (rt.downlink_mbps * 1e6)

    def run(self, round: int, server: dict[str, Any], transport: Transport) -> RoundResult:
        plan = self.planner.plan(round)
        live = plan.live
        dropped = [c for c, d in zip(plan.sampled, plan.dropped, strict=True) if d]
        ledger = _Ledger(dict.fromkeys(plan.sampled, 0), dict.fromkeys(live, 0), dict.fromkeys(live, 0.0))
        if dropped:  # a dropped client received the broadcast, then vanished
            for cid, msg in zip(dropped, self.algo.broadcast_many(server, dropped), strict=True):
                ledger.down[cid] = msg.nbytes
        chain_state = server.get(CHAIN_STATE)
        steps = self.algo.server_round(server, round, live)
        records: dict[int, Message] = {}
        try:
            item = next(steps)
            while True:
                if isinstance(item, Reduce):
                    aggregate, chain_state = self._reduce(item, chain_state, plan, transport, ledger)
                    item = steps.send(aggregate)
                else:
                    item = steps.send(self._deliver(item, plan, transport, ledger))
        except StopIteration as stop:
            server, records = stop.value
        guarantees = self.reducer.guarantees
        if guarantees and not ledger.reduced and any(m.arrays for m in ledger.trained.values()):
            raise ProtocolError(
                f"algorithm {self.algo.name!r}: its server round used the train replies without handing "
                f"them to the round's reduction, so {guarantees} would not apply to it; return them "
                "through Algorithm.reduction (docs/architecture.md)"
            )
        if chain_state is not None:
            server = {**server, CHAIN_STATE: chain_state}
        extra = transport.finish(plan, set(ledger.rejected))
        return self._finish(plan, server, records, ledger, transport, extra)

    def _deliver(
        self, exchange: Exchange, plan: RoundPlan, transport: Transport, ledger: _Ledger
    ) -> dict[int, Message]:
        """One exchange: its messages to the clients still in the round, bytes and seconds counted,
        every reply checked against what the exchange expects. A client that does not answer, or
        whose reply is refused, is out of the rest of the round."""
        messages = exchange.messages
        gone = ledger.gone
        if gone:
            messages = {c: m for c, m in messages.items() if c not in gone}
        down = ledger.down
        last = None  # consecutive clients usually get the very same message
        for cid, msg in messages.items():
            if msg is not last:
                last, size = msg, msg.nbytes
            down[cid] += size
        got = transport.exchange(exchange.action, messages, plan)
        up, wall = ledger.up, ledger.wall
        for cid, reply in got.replies.items():
            up[cid] += reply.nbytes
            wall[cid] += got.wall.get(cid, 0.0)
        for cid, why in got.missing.items():
            gone.setdefault(cid, why)
        if exchange.action == TRAIN:
            ledger.trained.update(got.replies)
        ok, refused = check_replies(got.replies, exchange.expect)
        for cid, problem in refused.items():
            ledger.rejected[cid] = problem
            gone.setdefault(cid, f"reply refused: {problem}")
        return ok

    def _reduce(
        self,
        request: Reduce,
        state: dict[str, Any] | None,
        plan: RoundPlan,
        transport: Transport,
        ledger: _Ledger,
    ) -> tuple[Aggregate, dict[str, Any] | None]:
        """Carry out a reduction, delivering any exchanges of its own (secure aggregation's stages)."""
        if request.kind == "mean" and set(request.replies) <= set(ledger.trained):
            ledger.reduced = True
        work = self.reducer.reduce(request, state, plan.round)
        try:
            exchange = next(work)
            while True:
                exchange = work.send(self._deliver(exchange, plan, transport, ledger))
        except StopIteration as stop:
            aggregate, state = stop.value
        aggregate.reported = {c: m.scalars for c, m in ledger.trained.items()}
        ledger.facts.update(aggregate.info)
        return aggregate, state

    def _finish(
        self,
        plan: RoundPlan,
        server: dict[str, Any],
        records: dict[int, Message],
        ledger: _Ledger,
        transport: Transport,
        extra: dict[str, Any],
    ) -> RoundResult:
        # The loop below runs once per client: its constants are read once (``comm_seconds``'s
        # arithmetic, written out in the same order, so the same numbers).
        rt = self.cfg.runtime
        flop_rate = rt.client_gflops * 1e9
        per_flop = self.flops
        up_bps, down_bps = rt.uplink_mbps * 1e6, rt.downlink_mbps * 1e6
        nan = float("nan")
        empty = Message()
        rows: list[dict[str, Any]] = []
        losses, weights = [], []
        rnd = plan.round
        down, up, wall, trained = ledger.down, ledger.up, ledger.wall, ledger.trained
        rejected = ledger.rejected
        gone = {c: why for c, why in ledger.gone.items() if c not in rejected}
        for cid, frac, is_dropped in zip(plan.sampled, plan.fractions, plan.dropped, strict=True):
            d = down[cid]
            u = 0 if is_dropped else up[cid]
            # what every train row holds; the rest depends on how the client's round went
            row = {
                "round": rnd,
                "kind": "train",
                "client": cid,
                "work": frac,
                "dropped": is_dropped,
                "bytes_down": d,
                "bytes_up": u,
            }
            rows.append(row)
            reply = None if is_dropped else records.get(cid) or trained.get(cid)
            if is_dropped or (reply is None and cid in gone):
                if not is_dropped:
                    row.update(missing=True, reason=gone[cid])
                row["sim_time"] = self.comm_seconds(u, d)
                continue
            # what the client reported of its training (under client-level DP: nothing)
            scalars = (reply or empty).scalars
            samples = float(scalars.get("samples", 0))
            loss = float(scalars.get("train_loss", nan))
            flops = float(scalars.get("client_flops", samples * per_flop))
            row["compute_wall"] = wall[cid]
            if "steps" in scalars:
                row["steps"] = int(scalars["steps"])
            if "train_loss" in scalars:
                row["train_loss"] = loss
            row["sim_time"] = flops / flop_rate + (u * 8 / up_bps + d * 8 / down_bps)
            if cid in rejected:  # update and new state discarded, as for a malformed message
                row["rejected"] = rejected[cid]
                continue
            if "train_loss" in scalars:
                losses.append(loss)
                weights.append(samples)
        dropped_clients = [r["client"] for r in rows if r["dropped"]]
        info: dict[str, Any] = {
            "sampled": len(rows),
            "dropped": len(dropped_clients),
            "dropped_clients": dropped_clients,
            "bytes_up": int(sum([r["bytes_up"] for r in rows])),
            "bytes_down": int(sum([r["bytes_down"] for r in rows])),
            "sim_time": max([r["sim_time"] for r in rows], default=0.0),
            "lr": plan.lr,
            "execution": transport.execution,
            "rejected_clients": sorted(rejected),
        }
        if rejected:
            info["rejected_reasons"] = {str(c): rejected[c] for c in sorted(rejected)}
        if losses and sum(weights) > 0:
            info["train_loss"] = float(np.average(losses, weights=weights))
        if transport.reports_missing:
            lost = sorted(gone)
            info["missing_clients"] = lost
            if lost:
                info["missing_reasons"] = {str(c): gone[c] for c in lost}
        info.update(ledger.facts)
        info.update(extra)
        replies = {c: r for c, r in records.items() if c not in rejected}
        return RoundResult(server=server, replies=replies, train_rows=rows, info=info)


def server_step(
    algo: Algorithm,
    server: dict[str, Any],
    replies: dict[int, Message],
    round: int,
    reducer: Reducer | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The server half of a one-exchange round on given train ``replies``: the round's checks,
    its reduction (``reducer``, default: the plain weighted mean) and the algorithm's update.
    Returns (new server state, the round's facts: refused replies, the reduction's facts). What a
    round does once its clients have answered; for tests and offline analysis."""
    from fedmtl.runtime.reduction import ChainReducer

    reducer = reducer or ChainReducer(None, algo.ctx.seed)
    facts: dict[str, Any] = {}
    rejected: dict[int, str] = {}
    chain_state = server.get(CHAIN_STATE)
    steps = algo.server_round(server, round, sorted(replies))
    try:
        item = next(steps)
        while True:
            if isinstance(item, Reduce):
                work = reducer.reduce(item, chain_state, round)
                try:
                    next(work)
                    raise ProtocolError("server_step: this reduction runs exchanges of its own; use a round")
                except StopIteration as stop:
                    aggregate, chain_state = stop.value
                aggregate.reported = {c: m.scalars for c, m in replies.items()}
                facts.update(aggregate.info)
                item = steps.send(aggregate)
                continue
            if item.action != TRAIN:
                raise ProtocolError(
                    f"server_step: the round asks for a {item.action!r} exchange; use a round"
                )
            ok, refused = check_replies({c: replies[c] for c in item.messages if c in replies}, item.expect)
            rejected.update(refused)
            item = steps.send(ok)
    except StopIteration as stop:
        server = stop.value[0]
    if chain_state is not None:
        server = {**server, CHAIN_STATE: chain_state}
    if rejected:
        facts["rejected_clients"] = sorted(rejected)
        facts["rejected_reasons"] = {str(c): rejected[c] for c in sorted(rejected)}
    return server, facts
