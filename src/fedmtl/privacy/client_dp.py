"""Client-level differential privacy (DP-FedAvg) as a wrapper around any FedAvg-family algorithm.

Client side: the update (returned arrays minus the arrays received) is clipped to the bound the
server sent (``dp_clip`` in the broadcast scalars); the client also reports whether it was within
the bound (``clip_bit``, for adaptive clipping) and, with ``noise_at: client``, adds its share
N(0, sigma^2 / m) of the noise, so that the m shares sum to N(0, sigma^2) and nothing un-noised
leaves the client (``privatize_update``, which secure aggregation can call itself).

Server side: the aggregation chain becomes clip -> uniform mean -> Gaussian noise of std
``z * C / m`` on the mean (i.e. ``z * C`` on the sum); with ``noise_at: client`` it is only the
uniform mean. Adaptive clipping moves C toward the target quantile of update norms using the noisy
count of clip bits, and the update noise is raised as Andrew et al. prescribe so that both together
cost ``noise_multiplier``. The accountant composes one subsampled Gaussian per round; epsilon goes
into every round row, and ``max_epsilon`` stops the run before a round that would exceed it.

Everything crosses as message arrays and scalars, so the wrapper runs on Flower unchanged."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedmtl.aggregation.pipeline import Batch, Pipeline, Step
from fedmtl.aggregation.steps import CLIP_BIT, Clip, GaussianNoise, Mean, adapt_bound
from fedmtl.algorithms.base import Algorithm, ClientWork, Message
from fedmtl.algorithms.wrapper import ReplyWrapper
from fedmtl.data.federated import ClientData
from fedmtl.privacy.accountant import adaptive_update_noise, epsilon
from fedmtl.sections.privacy import PrivacyConfig
from fedmtl.sections.robustness import ClipStep, GaussianNoiseStep, MeanStep
from fedmtl.training.tensors import Arrays

DP_RNG = 13  # rng purpose of client-side noise: (seed, DP_RNG, round, cid)
DP_EVAL_RNG = 14  # rng purpose of the noise on released evaluation means: (seed, DP_EVAL_RNG, round)
CLIP_KEY = "dp_clip"


def update_norm(update: Arrays) -> float:
    return float(np.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in update.values())))


def privatize_update(
    update: Arrays, clip: float, noise_std: float, rng: np.random.Generator
) -> tuple[Arrays, bool]:
    """Clip ``update`` (a client's arrays minus what it received) to L2 norm ``clip`` and add
    N(0, noise_std^2) to every coordinate, in float64; returns (private update, was within clip).

    For distributed DP under secure aggregation call it on each client before masking with
    ``noise_std = noise_multiplier * clip / sqrt(m)`` (m clients summed): the masked sum then
    carries exactly the noise central DP would add. ``ClientDP`` does this with ``noise_at: client``."""
    norm = update_norm(update)
    within = bool(norm <= clip)
    factor = 1.0 if within or not np.isfinite(norm) else clip / norm
    out = {}
    for k, v in update.items():
        u = v.astype(np.float64) * factor if np.isfinite(norm) else np.zeros(v.shape)
        if noise_std > 0:
            u = u + rng.normal(0.0, noise_std, v.shape)
        out[k] = u
    return out, within


class BoundOnly(Step):
    """The adaptive clip bound without server-side clipping (clients clipped and noised already)."""

    def init(self) -> dict[str, Any]:
        return {"bound": float(self.cfg.max_norm)}

    def apply(self, batch: Batch, state: dict[str, Any]) -> dict[str, Any]:
        bound = float(state.get("bound", self.cfg.max_norm))
        batch.clip_norm = bound
        batch.info["clip_norm"] = bound
        if not self.cfg.adaptive:
            return state
        within = float(sum(float(s.get(CLIP_BIT, 0.0)) for s in batch.scalars))
        return {"bound": adapt_bound(bound, within, len(batch.updates), self.cfg, batch.rng)}


class ClientDP(ReplyWrapper):
    def __init__(
        self,
        inner: Algorithm,
        cfg: PrivacyConfig,
        per_round: int,
        population: int,
        eval_every: int = 1,
        rounds: int = 0,
    ) -> None:
        super().__init__(inner)
        self.cfg = cfg
        self.per_round = per_round
        self.population = population
        #: the evaluation schedule (``eval.every``, ``train.rounds``): which rounds release metrics
        self.eval_every = eval_every
        self.rounds = rounds
        z = cfg.noise_multiplier
        adaptive = cfg.clipping == "adaptive"
        self.count_noise_std = (cfg.count_noise_std or max(per_round / 20.0, z)) if adaptive else 0.0
        #: noise multiplier of the updates themselves (larger than z when the count is noised too)
        self.update_noise = adaptive_update_noise(z, self.count_noise_std) if adaptive and z > 0 else z
        clip = ClipStep(
            max_norm=cfg.clip_norm,
            adaptive=adaptive,
            target_quantile=cfg.target_quantile,
            lr=cfg.clip_lr,
            count_noise_std=self.count_noise_std if z > 0 else 0.0,
        )
        mean = Mean(MeanStep(weighting="uniform"))
        if cfg.noise_at == "server":
            steps: list[Step] = [
                Clip(clip),
                mean,
                GaussianNoise(GaussianNoiseStep(noise_multiplier=self.update_noise)),
            ]
        else:
            steps = [BoundOnly(clip), mean]
        self.chain = Pipeline(steps)
        self.ctx.aggregator = self.chain  # the context is shared with the wrapped algorithm

    # --- accounting ---------------------------------------------------------------------------
    def epsilon_after(self, releases: int, evaluations: int = 0) -> float:
        """Epsilon after ``releases`` training rounds and ``evaluations`` DP evaluation rounds."""
        c = self.cfg
        k = len(c.eval_metrics) if c.eval_noise_multiplier is not None else 0
        return epsilon(
            c.noise_multiplier,
            releases,
            c.delta,
            self.per_round,
            self.population,
            c.sampling,
            c.accountant,
            eval_noise=c.eval_noise_multiplier or 0.0,
            eval_releases=k * evaluations,
        )

    # --- DP-aggregated evaluation -----------------------------------------------------------
    def _scheduled(self, rnd: int) -> bool:
        return rnd % self.eval_every == 0 or rnd == self.rounds

    def _evaluations(self, server: dict[str, Any]) -> int:
        """DP evaluation rounds released up to the server's last round: the scheduled ones, plus
        that round itself when the run stops behind it (the runtimes then evaluate it too)."""
        if self.cfg.eval_noise_multiplier is None:
            return 0
        rnd = int(server["dp"].get("round", 0))
        n = sum(self._scheduled(i) for i in range(1, rnd + 1))
        if rnd > 0 and not self._scheduled(rnd) and self.stop_reason(server, rnd + 1) is not None:
            n += 1
        return n

    def release_eval(self, client_rows: list[dict[str, Any]], rnd: int) -> dict[str, Any] | None:
        """What an evaluation round releases under DP: per metric, the noisy mean of the clients'
        clipped values; None when evaluation is exact. The count of clients is public (the
        configured federation), the rows themselves are never written."""
        c = self.cfg
        if c.eval_noise_multiplier is None:
            return None
        rng = np.random.default_rng([self.ctx.seed, DP_EVAL_RNG, rnd])
        n = len(client_rows)
        out: dict[str, Any] = {"eval_private": True, "eval_clients": n}
        for metric in c.eval_metrics:
            total = sum(float(np.clip(r[metric], 0.0, c.eval_bound)) for r in client_rows if metric in r)
            noise = float(rng.normal(0.0, c.eval_noise_multiplier * c.eval_bound))
            if n:
                out[f"{metric}_mean"] = (total + noise) / n
        return out

    def clip_bound(self, server: dict[str, Any]) -> float:
        state = self.chain.state_of(server.get("agg"), "clip")
        return float(state.get("bound", self.cfg.clip_norm)) if state else self.cfg.clip_norm

    # --- server side --------------------------------------------------------------------------
    def init_server(self) -> dict[str, Any]:
        return {**self.inner.init_server(), "dp": {"releases": 0}}

    def broadcast(self, server: dict[str, Any], cid: int) -> Message:
        msg = self.inner.broadcast(server, cid)
        return Message(arrays=msg.arrays, scalars={**msg.scalars, CLIP_KEY: self.clip_bound(server)})

    def server_step(self, server: dict[str, Any], replies: dict[int, Message], round: int) -> dict[str, Any]:
        releases = server["dp"]["releases"]
        new = self.inner.server_step(server, replies, round)
        if replies:
            releases += 1
        return {**new, "dp": {"releases": releases, "round": round}}

    def round_info(self, server: dict[str, Any]) -> dict[str, Any]:
        releases = server["dp"]["releases"]
        evaluations = self._evaluations(server)
        info = {
            **self.inner.round_info(server),
            "epsilon": self.epsilon_after(releases, evaluations),
            "delta": self.cfg.delta,
            "dp_releases": releases,
            "dp_clip": self.clip_bound(server),
        }
        if self.cfg.eval_noise_multiplier is not None:
            info["dp_eval_releases"] = evaluations
        return info

    def stop_reason(self, server: dict[str, Any], round: int) -> str | None:
        reason = self.inner.stop_reason(server, round)
        if reason is not None or self.cfg.max_epsilon is None:
            return reason
        # the next round, and its evaluation whether scheduled or because the run stops behind it
        evaluations = 0
        if self.cfg.eval_noise_multiplier is not None:
            evaluations = sum(self._scheduled(i) for i in range(1, round + 1)) + (not self._scheduled(round))
        nxt = self.epsilon_after(server["dp"]["releases"] + 1, evaluations)
        if nxt > self.cfg.max_epsilon:
            return (
                f"privacy budget: round {round} would raise epsilon to {nxt:.4g} > privacy.max_epsilon = "
                f"{self.cfg.max_epsilon:g} (delta = {self.cfg.delta:g})"
            )
        return None

    # --- client side --------------------------------------------------------------------------
    def after_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork, reply: Message
    ) -> tuple[dict[str, Any], Message]:
        return state, self.privatize(reply, data, msg, work)

    def privatize(self, reply: Message, data: ClientData, msg: Message, work: ClientWork) -> Message:
        """The reply with its update clipped (and noised with ``noise_at: client``) and the clip bit."""
        clip = float(msg.scalars.get(CLIP_KEY, self.cfg.clip_norm))
        sent = msg.arrays
        update = {
            k: v.astype(np.float64) - sent[k].astype(np.float64) for k, v in reply.arrays.items() if k in sent
        }
        std = 0.0
        if self.cfg.noise_at == "client":
            std = self.update_noise * clip / np.sqrt(self.per_round)
        rng = np.random.default_rng([self.ctx.seed, DP_RNG, work.round, data.cid])
        private, within = privatize_update(update, clip, std, rng)
        arrays = dict(reply.arrays)
        for k, u in private.items():
            arrays[k] = (sent[k].astype(np.float64) + u).astype(reply.arrays[k].dtype)
        return Message(arrays=arrays, scalars={**reply.scalars, CLIP_BIT: float(within)})
