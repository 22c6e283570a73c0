"""The in-process simulator: client sampling, stragglers, dropouts, byte and time accounting.

All randomness is derived from (seed, round, client, purpose), never from a shared stream, so a
resumed run draws exactly what an uninterrupted one would."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmtl.algorithms.base import Algorithm, ClientWork, Message
from fedmtl.config import Config
from fedmtl.data.federated import FederatedData

# Purposes for derived random streams (stable small ints; never reorder).
SAMPLE, SYSTEMS, TRAIN = 1, 2, 3


def derived_rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def round_lr(cfg: Config, round: int) -> float:
    t = cfg.train
    if t.lr_schedule == "exponential":
        return t.lr * t.lr_decay ** (round - 1)
    if t.lr_schedule == "cosine":
        return t.lr * 0.5 * (1 + math.cos(math.pi * (round - 1) / t.rounds))
    return t.lr


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

    def num_sampled(self) -> int:
        n = self.data.num_clients
        c = self.cfg.clients
        k = c.per_round if c.per_round is not None else max(1, round(c.fraction * n))
        return min(k, n)

    def sample(self, round: int) -> list[int]:
        k = self.num_sampled()
        n = self.data.num_clients
        if k == n:
            return list(range(n))
        rng = derived_rng(self.cfg.seed, SAMPLE, round)
        return sorted(int(i) for i in rng.choice(n, size=k, replace=False))

    def systems(self, round: int, cid: int) -> tuple[float, bool]:
        """(work fraction, dropped) for a client this round."""
        rt = self.cfg.runtime
        rng = derived_rng(self.cfg.seed, SYSTEMS, round, cid)
        lo, hi = rt.work_fraction
        frac = float(rng.uniform(lo, hi)) if hi > lo else float(hi)
        dropped = bool(rng.random() < rt.drop_prob)
        return frac, dropped

    def comm_seconds(self, up: int, down: int) -> float:
        rt = self.cfg.runtime
        return up * 8 / (rt.uplink_mbps * 1e6) + down * 8 / (rt.downlink_mbps * 1e6)

    def run_round(self, round: int, server: dict[str, Any], states: dict[int, dict[str, Any]]) -> RoundResult:
        """One synchronous round; ``states`` (client id -> client state) is updated in place."""
        lr = round_lr(self.cfg, round)
        replies: dict[int, Message] = {}
        rows: list[dict[str, Any]] = []
        losses, weights = [], []
        for cid in self.sample(round):
            frac, dropped = self.systems(round, cid)
            msg = self.algo.broadcast(server, cid)
            row: dict[str, Any] = {
                "round": round,
                "kind": "train",
                "client": cid,
                "work": frac,
                "dropped": dropped,
                "bytes_down": msg.nbytes,
                "bytes_up": 0,
            }
            if dropped:
                row["sim_time"] = self.comm_seconds(0, msg.nbytes)
                rows.append(row)
                continue
            state = states.get(cid)
            if state is None:
                state = self.algo.init_client(cid)
            work = ClientWork(
                round=round, fraction=frac, rng=derived_rng(self.cfg.seed, TRAIN, round, cid), lr=lr
            )
            t0 = time.perf_counter()
            new_state, reply = self.algo.client_step(state, self.data.clients[cid], msg, work)
            row["compute_wall"] = time.perf_counter() - t0
            states[cid] = new_state
            replies[cid] = reply
            samples = float(reply.scalars.get("samples", 0))
            row.update(
                bytes_up=reply.nbytes,
                steps=int(reply.scalars.get("steps", 0)),
                train_loss=float(reply.scalars.get("train_loss", float("nan"))),
                sim_time=samples * self.flops / (self.cfg.runtime.client_gflops * 1e9)
                + self.comm_seconds(reply.nbytes, msg.nbytes),
            )
            rows.append(row)
            if "train_loss" in reply.scalars:
                losses.append(row["train_loss"])
                weights.append(samples)
        server = self.algo.server_step(server, replies, round)
        info = {
            "sampled": len(rows),
            "dropped": sum(r["dropped"] for r in rows),
            "dropped_clients": [r["client"] for r in rows if r["dropped"]],
            "bytes_up": int(sum(r["bytes_up"] for r in rows)),
            "bytes_down": int(sum(r["bytes_down"] for r in rows)),
            "sim_time": max((r["sim_time"] for r in rows), default=0.0),
            "lr": lr,
        }
        if losses and sum(weights) > 0:
            info["train_loss"] = float(np.average(losses, weights=weights))
        return RoundResult(server=server, replies=replies, train_rows=rows, info=info)
