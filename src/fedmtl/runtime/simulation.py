"""The in-process simulator: client sampling, stragglers, dropouts, byte and time accounting.

Clients of a round train one after another (``runtime.execution: sequential``) or all at once,
their declared local work stacked on a client axis (``batched``; ``auto`` picks batched when the
algorithm and model allow it): ``fedmtl.training.executors``. Sampling, systems draws and
per-client rngs are the same in both, so they give the same updates to float tolerance.

All randomness is derived from (seed, round, client, purpose), never from a shared stream, so a
resumed run draws exactly what an uninterrupted one would."""

from __future__ import annotations

import gc
import math
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmtl.algorithms.base import Algorithm, ClientWork, Message
from fedmtl.config import Config
from fedmtl.data.federated import FederatedData
from fedmtl.errors import ConfigError, ProtocolError
from fedmtl.runtime.seeds import derived_rng, derived_rngs
from fedmtl.runtime.threads import torch_owns_the_cores
from fedmtl.runtime.validation import reply_problems
from fedmtl.training import onednn
from fedmtl.training.batched import batch_support
from fedmtl.training.executors import BatchedExecutor, SequentialExecutor
from fedmtl.training.shuffle import Stream, streams

# Purposes for derived random streams (stable small ints; never reorder).
SAMPLE, SYSTEMS, TRAIN = 1, 2, 3


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside a round. A round allocates a few small acyclic objects
    per client; with thousands of clients, that allocation count triggers full collections that
    walk every object of the federation (measured: a quarter of a 10,000-client batched round).
    Whatever cycles a round creates are collected after it."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def round_lr(cfg: Config, round: int) -> float:
    t = cfg.train
    if t.lr_schedule == "exponential":
        return t.lr * t.lr_decay ** (round - 1)
    if t.lr_schedule == "cosine":
        return t.lr * 0.5 * (1 + math.cos(math.pi * (round - 1) / t.rounds))
    return t.lr


def round_driver(algo: Algorithm) -> Any:
    """The algorithm's ``drive_round`` when it runs a multi-step protocol, else None.

    A wrapper (selection, attacks, privacy, secure aggregation) changes ``client_step`` or
    ``server_step``, which a driven round never calls; rather than silently skip the feature, such a
    stack is refused."""
    drive = getattr(algo, "drive_round", None)
    if drive is not None and hasattr(algo, "inner"):
        raise ConfigError(
            f"config: algorithm.name = {algo.name!r}: drives a multi-step protocol, which "
            f"{type(algo).__name__} cannot wrap yet; disable that feature for this algorithm"
        )
    return drive


class LocalTransport:
    """The simulator's side of a multi-step protocol: an algorithm with ``drive_round(server,
    transport, round) -> (server, replies)`` drives its round itself, calling ``exchange`` once per
    protocol step; each exchange runs the named ``client_actions`` method of every addressed client
    in-process, with the client's state and a fresh work rng per message (exactly what a Flower node
    builds from its message), and counts the bytes each way."""

    def __init__(
        self,
        algo: Algorithm,
        data: FederatedData,
        seed: int,
        jobs: list[tuple[int, dict[str, Any], Message, ClientWork]],
    ) -> None:
        self.algo = algo
        self.data = data
        self.seed = seed
        self.clients = [cid for cid, _, _, _ in jobs]
        self.states = {cid: state for cid, state, _, _ in jobs}
        self.works = {cid: work for cid, _, _, work in jobs}
        self.bytes_up = dict.fromkeys(self.clients, 0)
        self.bytes_down = dict.fromkeys(self.clients, 0)
        self.wall = dict.fromkeys(self.clients, 0.0)

    def exchange(self, action: str, msgs: Mapping[int, Message]) -> dict[int, Message]:
        methods: dict[str, str] = getattr(self.algo, "client_actions", {})
        if action not in methods:
            raise ProtocolError(f"algorithm {self.algo.name!r} has no client action {action!r}")
        method = getattr(self.algo, methods[action])
        out: dict[int, Message] = {}
        for cid, msg in msgs.items():
            if cid not in self.states:
                raise ProtocolError(f"client {cid} does not take part in this round")
            w = self.works[cid]
            work = ClientWork(w.round, w.fraction, Stream(self.seed, TRAIN, w.round, cid), w.lr)
            t0 = time.perf_counter()
            self.states[cid], out[cid] = method(self.states[cid], self.data.clients[cid], msg, work)
            self.wall[cid] += time.perf_counter() - t0
            self.bytes_down[cid] += msg.nbytes
            self.bytes_up[cid] += out[cid].nbytes
        return out


@dataclass
class RoundResult:
    server: dict[str, Any]
    replies: dict[int, Message]
    train_rows: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


class Simulator:
    def __init__(
        self, algo: Algorithm, data: FederatedData, cfg: Config, train_flops_per_sample: float
    ) -> None:
        self.algo = algo
        self.data = data
        self.cfg = cfg
        self.flops = train_flops_per_sample
        round_driver(algo)  # a wrapped multi-step protocol fails before any run directory exists
        #: "sequential" or "batched": ``runtime.execution`` resolved once, before any round runs,
        #: so 'batched' on an unbatchable algorithm fails before a run directory exists.
        with onednn.enabled_as(cfg.runtime.onednn):  # the trial step probes products too
            self.execution = self._resolve_execution()
        #: Budget for what batched execution stacks at once (``runtime.batch_memory_gib``).
        gib = cfg.runtime.batch_memory_gib
        self.executor = (
            BatchedExecutor(int(gib * 2**30)) if self.execution == "batched" else SequentialExecutor()
        )

    def num_sampled(self) -> int:
        n = len(self.data.train_clients)
        c = self.cfg.clients
        k = c.per_round if c.per_round is not None else max(1, round(c.fraction * n))
        return min(k, n)

    def sample(self, round: int) -> list[int]:
        """Seeded per round, from the clients that train (held-out clients never do)."""
        pool = self.data.train_clients
        k = self.num_sampled()
        if k == len(pool):
            return list(pool)
        rng = derived_rng(self.cfg.seed, SAMPLE, round)
        return sorted(pool[int(i)] for i in rng.choice(len(pool), size=k, replace=False))

    def systems(self, round: int, cid: int) -> tuple[float, bool]:
        """(work fraction, dropped) for a client this round."""
        return self.systems_many(round, [cid])[0]

    def systems_many(self, round: int, cids: list[int]) -> list[tuple[float, bool]]:
        """``systems`` for each client, each from its own (seed, round, client) stream."""
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

    def comm_seconds(self, up: int, down: int) -> float:
        rt = self.cfg.runtime
        return up * 8 / (rt.uplink_mbps * 1e6) + down * 8 / (rt.downlink_mbps * 1e6)

    # --- execution backend ------------------------------------------------------------------
    def batched_unsupported(self) -> str | None:
        """Why this run's algorithm or model cannot train its clients batched (None if it can)."""
        if not self.algo.batchable:
            return f"algorithm {self.algo.name!r} trains with its own solver, not declared local work"
        client = next((c for c in self.data.clients if c.n_train > 0), None)
        if client is None:
            return "no client has training data"
        model = self.algo.ctx.model_for(client.task.name)
        return batch_support(model, client.task, client.x_train, client.y_train)

    def _resolve_execution(self) -> str:
        wanted = self.cfg.runtime.execution
        if wanted == "sequential":
            return "sequential"
        reason = self.batched_unsupported()
        if reason is None:
            return "batched"
        if wanted == "batched":
            raise ConfigError(f"config: runtime.execution = 'batched': {reason}; use 'auto' or 'sequential'")
        print(
            f"fedmtl: runtime.execution = 'auto': training clients sequentially ({reason})", file=sys.stderr
        )
        return "sequential"

    # --- one round ----------------------------------------------------------------------------
    def run_round(self, round: int, server: dict[str, Any], states: dict[int, dict[str, Any]]) -> RoundResult:
        """One synchronous round; ``states`` (client id -> client state) is updated in place."""
        with _gc_paused(), torch_owns_the_cores(), onednn.enabled_as(self.cfg.runtime.onednn):
            return self._run_round(round, server, states)

    def _run_round(
        self, round: int, server: dict[str, Any], states: dict[int, dict[str, Any]]
    ) -> RoundResult:
        lr = round_lr(self.cfg, round)
        jobs: list[tuple[int, dict[str, Any], Message, ClientWork]] = []
        sampled = self.sample(round)
        draws = self.systems_many(round, sampled)
        live = [cid for cid, (_, dropped) in zip(sampled, draws, strict=True) if not dropped]
        rngs = iter(streams(self.cfg.seed, TRAIN, round, live))
        last: Message | None = None  # consecutive clients usually get the very same arrays
        init_client = self.algo.init_client
        msgs = self.algo.broadcast_many(server, list(sampled))
        down_of: list[int] = []  # bytes each sampled client received, in sampled order
        for cid, (frac, dropped), msg in zip(sampled, draws, msgs, strict=True):
            if last is None or msg.arrays is not last.arrays:
                last, down = msg, msg.nbytes
            down_of.append(down)
            if dropped:
                continue
            state = states.get(cid)
            if state is None:
                state = init_client(cid)
            jobs.append((cid, state, msg, ClientWork(round, frac, next(rngs), lr)))
        replies: dict[int, Message] = {}
        losses, weights = [], []
        drive = round_driver(self.algo)
        transport: LocalTransport | None = None
        if drive is not None:  # a multi-step protocol: the algorithm drives the round's exchanges
            transport = LocalTransport(self.algo, self.data, self.cfg.seed, jobs)
            server, driven = drive(server, transport, round) if jobs else (server, {})
            outcomes = [
                (transport.states[c], driven.get(c, Message()), transport.wall[c]) for c, _, _, _ in jobs
            ]
        else:
            clients = self.data.clients
            work = [(state, clients[cid], msg, w) for cid, state, msg, w in jobs]
            outcomes = self.executor.run(self.algo.client_step, work) if jobs else []
        rejected: dict[int, str] = {}
        problems = reply_problems([reply for _, reply, _ in outcomes])
        # The loop below runs once per client: its constants are read once (``comm_seconds``'s
        # arithmetic, written out in the same order, so the same numbers); each row is built whole.
        flop_rate = self.cfg.runtime.client_gflops * 1e9
        per_flop = self.flops
        up_bps, down_bps = self.cfg.runtime.uplink_mbps * 1e6, self.cfg.runtime.downlink_mbps * 1e6
        nan = float("nan")
        rows: list[dict[str, Any]] = []
        results = iter(zip(jobs, outcomes, problems, strict=True))
        for cid, (frac, dropped), down in zip(sampled, draws, down_of, strict=True):
            if dropped:
                rows.append(
                    {
                        "round": round,
                        "kind": "train",
                        "client": cid,
                        "work": frac,
                        "dropped": True,
                        "bytes_down": down,
                        "bytes_up": 0,
                        "sim_time": self.comm_seconds(0, down),
                    }
                )
                continue
            _, (new_state, reply, wall), problem = next(results)
            scalars = reply.scalars
            samples = float(scalars.get("samples", 0))
            up = reply.nbytes
            flops = samples * per_flop
            if transport is not None:  # driven: bytes of every exchange; the client's own FLOPs
                up = transport.bytes_up[cid]
                down += transport.bytes_down[cid]
                flops = float(scalars.get("client_flops", flops))
            loss = float(scalars.get("train_loss", nan))
            row = {
                "round": round,
                "kind": "train",
                "client": cid,
                "work": frac,
                "dropped": False,
                "bytes_down": down,
                "bytes_up": up,
                "compute_wall": wall,
                "steps": int(scalars.get("steps", 0)),
                "train_loss": loss,
                "sim_time": flops / flop_rate + (up * 8 / up_bps + down * 8 / down_bps),
            }
            rows.append(row)
            if problem is not None:  # update and new state discarded, as for a malformed message
                rejected[cid] = problem
                row["rejected"] = problem
                continue
            states[cid] = new_state
            replies[cid] = reply
            if "train_loss" in scalars:
                losses.append(loss)
                weights.append(samples)
        if transport is None:
            server = self.algo.server_step(server, replies, round)
        dropped_clients = [r["client"] for r in rows if r["dropped"]]
        info = {
            "sampled": len(rows),
            "dropped": len(dropped_clients),
            "dropped_clients": dropped_clients,
            "bytes_up": int(sum([r["bytes_up"] for r in rows])),
            "bytes_down": int(sum([r["bytes_down"] for r in rows])),
            "sim_time": max([r["sim_time"] for r in rows], default=0.0),
            "lr": lr,
            "execution": self.execution,
            "rejected_clients": sorted(rejected),
        }
        if losses and sum(weights) > 0:
            info["train_loss"] = float(np.average(losses, weights=weights))
        return RoundResult(server=server, replies=replies, train_rows=rows, info=info)
