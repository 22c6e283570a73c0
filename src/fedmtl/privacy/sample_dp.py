"""Sample-level differential privacy: clients train with DP-SGD (``fedmtl.training.dp_sgd``).

Each client's own records are protected against everyone who sees its updates (the server
included), without trusting anyone. The accountant composes, per client, one Poisson-subsampled
Gaussian per local step (sampling rate batch_size / n_k: the usual approximation for shuffled
batches); the round row reports the largest epsilon over clients, and ``max_epsilon`` stops the
run before a round in which some client could exceed it."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import replace
from typing import Any

import numpy as np

from fedmtl.algorithms.base import Algorithm, ClientWork, Message
from fedmtl.algorithms.wrapper import AlgorithmWrapper
from fedmtl.data.federated import ClientData, FederatedData
from fedmtl.privacy.accountant import epsilon
from fedmtl.sections.privacy import PrivacyConfig
from fedmtl.training import num_local_steps
from fedmtl.training.work import DPSGD, Train, Trained, map_requests

DP_SGD_RNG = 14


class SampleDP(AlgorithmWrapper):
    def __init__(self, inner: Algorithm, cfg: PrivacyConfig, data: FederatedData) -> None:
        super().__init__(inner)
        self.cfg = cfg
        spec = self.ctx.local
        self.sizes = {c.cid: c.n_train for c in data.clients}
        self.batch = {c: min(spec.batch_size, n) for c, n in self.sizes.items()}
        self.full_steps = {c: num_local_steps(n, spec) for c, n in self.sizes.items()}

    def client_eps(self, cid: int, steps: int) -> float:
        c = self.cfg
        return epsilon(
            c.noise_multiplier, steps, c.delta, self.batch[cid], self.sizes[cid], "poisson", c.accountant
        )

    # --- server side --------------------------------------------------------------------------
    def init_server(self) -> dict[str, Any]:
        return {**self.inner.init_server(), "dp": {"steps": {}}}

    def server_step(self, server: dict[str, Any], replies: dict[int, Message], round: int) -> dict[str, Any]:
        steps = dict(server["dp"]["steps"])
        for cid, r in replies.items():  # what each client reports it did (its own accountant agrees)
            steps[cid] = steps.get(cid, 0) + int(r.scalars.get("steps", 0))
        return {**self.inner.server_step(server, replies, round), "dp": {"steps": steps}}

    def round_info(self, server: dict[str, Any]) -> dict[str, Any]:
        steps = server["dp"]["steps"]
        eps = [self.client_eps(c, s) for c, s in steps.items()]
        return {
            **self.inner.round_info(server),
            "epsilon": max(eps, default=0.0),
            "epsilon_mean": float(np.mean(eps)) if eps else 0.0,
            "delta": self.cfg.delta,
        }

    def stop_reason(self, server: dict[str, Any], round: int) -> str | None:
        reason = self.inner.stop_reason(server, round)
        if reason is not None or self.cfg.max_epsilon is None:
            return reason
        steps = server["dp"]["steps"]
        worst = max(self.client_eps(c, steps.get(c, 0) + self.full_steps[c]) for c in self.sizes)
        if worst > self.cfg.max_epsilon:
            return (
                f"privacy budget: round {round} could raise a client's epsilon to {worst:.4g} > "
                f"privacy.max_epsilon = {self.cfg.max_epsilon:g} (delta = {self.cfg.delta:g})"
            )
        return None

    # --- client side --------------------------------------------------------------------------
    def client_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> Generator[Train, Trained, tuple[dict[str, Any], Message]]:
        """The inner client step with every training request done by DP-SGD."""
        noise = np.random.default_rng([self.ctx.seed, DP_SGD_RNG, work.round, data.cid])
        dp = DPSGD(clip=self.cfg.clip_norm, noise_multiplier=self.cfg.noise_multiplier, noise_rng=noise)
        change = lambda request: replace(request, dp=dp)  # noqa: E731
        return (yield from map_requests(self.inner.client_step(state, data, msg, work), change))
