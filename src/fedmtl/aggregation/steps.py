"""The non-robust steps of the aggregation chain: clipping, the weighted mean, Gaussian noise, and
wrappers around FedBone's gradient projection and FDRMFL's retention blend."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedmtl.aggregation.pipeline import Batch, Step, register_step

#: Reply scalar a client may send with its update: 1.0 when its raw update norm was within the
#: clip bound it was given (adaptive clipping with client-side clipping, where the server only
#: ever sees clipped updates).
CLIP_BIT = "clip_bit"


def clip_factors(norms: np.ndarray, bound: float) -> np.ndarray:
    """Per-update scale ``min(1, bound / norm)``; 0 for a non-finite norm (nothing usable in it)."""
    safe = np.where(np.isfinite(norms) & (norms > 0), norms, 1.0)
    f = np.minimum(1.0, bound / safe)
    return np.where(np.isfinite(norms), f, 0.0)


def adapt_bound(bound: float, unclipped: float, count: int, cfg: Any, rng: np.random.Generator) -> float:
    """Andrew et al. (2021): ``C <- C * exp(-lr * (b - target))`` with ``b`` the fraction of updates
    whose norm was within ``C``: the bound tracks the ``target`` quantile of update norms.

    Private (``cfg.expected_count`` set, as client-level DP sets it): ``b`` is estimated from the sum
    of centred bits (each ``bit - 1/2``, so one client moves it by at most 1/2, the sensitivity the
    accountant charges), noised, over the expected count (public), plus 1/2; it is updated every
    round, an empty one included, so neither the count of replies nor an empty round shows in the
    released bound. Otherwise ``b`` is the (optionally noised) count over the updates of the round."""
    if cfg.expected_count is None and count == 0:
        return bound
    noise = rng.normal(0.0, cfg.count_noise_std) if cfg.count_noise_std > 0 else 0.0
    if cfg.expected_count is not None:
        frac = (unclipped - count / 2.0 + noise) / cfg.expected_count + 0.5
    else:
        frac = (unclipped + noise) / count
    return float(bound * np.exp(-cfg.lr * (frac - cfg.target_quantile)))


@register_step("clip")
class Clip(Step):
    def init(self) -> dict[str, Any]:
        return {"bound": float(self.cfg.max_norm)}

    def apply(self, batch: Batch, state: dict[str, Any]) -> dict[str, Any]:
        bound = float(state.get("bound", self.cfg.max_norm))
        norms = batch.norms()
        factors = clip_factors(norms, bound)
        for u, f in zip(batch.updates, factors, strict=True):
            if f < 1.0:
                for k in u:
                    u[k] = np.zeros_like(u[k]) if f == 0.0 else u[k] * f
        batch.clip_norm = bound
        batch.info.update(clip_norm=bound, clipped=int((factors < 1.0).sum()))
        if not self.cfg.adaptive:
            return state
        if batch.scalars and all(CLIP_BIT in s for s in batch.scalars):
            within = float(sum(float(s[CLIP_BIT]) for s in batch.scalars))
        else:
            within = float((norms <= bound).sum())
        return {"bound": adapt_bound(bound, within, len(norms), self.cfg, batch.rng)}


def weighted_update_mean(batch: Batch, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Per key, the ``weights``-weighted mean over the updates that carry it; records each key's
    sensitivity (largest weight share of one client)."""
    out: dict[str, np.ndarray] = {}
    for keys, idx in batch.groups():
        w = weights[idx]
        total = float(w.sum())
        if total <= 0:
            continue
        share = w / total
        for k in keys:
            acc = np.zeros(batch.reference[k].shape, dtype=np.float64)
            for s, i in zip(share, idx, strict=True):
                acc += s * batch.updates[i][k]
            out[k] = acc
            batch.sensitivity[k] = float(share.max())
    return out


def fixed_denominator_sum(batch: Batch, expected: float, by_task: dict[str, float]) -> dict[str, np.ndarray]:
    """Per reference key, the sum of the updates that carry it over the expected number of clients
    carrying it (a task head's: its task's), zero where none did; each key's sensitivity is one
    client's share, 1 / that number."""
    out: dict[str, np.ndarray] = {}
    for k, ref in batch.reference.items():
        task, sep, _ = k.partition(":")
        n = by_task.get(task, expected) if sep else expected
        acc = np.zeros(ref.shape, dtype=np.float64)
        for u in batch.updates:
            if k in u:
                acc += u[k]
        out[k] = acc / n
        batch.sensitivity[k] = 1.0 / n
    return out


@register_step("mean")
class Mean(Step):
    stage = "reduce"

    def apply(self, batch: Batch, state: dict[str, Any]) -> dict[str, Any]:
        if self.cfg.expected is not None:
            batch.aggregate = fixed_denominator_sum(batch, self.cfg.expected, self.cfg.expected_by_task)
            return state
        w = batch.weights if self.cfg.weighting == "samples" else np.ones_like(batch.weights)
        batch.aggregate = weighted_update_mean(batch, w)
        return state


@register_step("gaussian_noise")
class GaussianNoise(Step):
    stage = "aggregate"

    def std_for(self, batch: Batch, key: str) -> float:
        if self.cfg.std is not None:
            return float(self.cfg.std)
        if batch.clip_norm is None or key not in batch.sensitivity:
            raise RuntimeError("gaussian_noise: noise_multiplier needs clip and mean before it")
        return float(self.cfg.noise_multiplier) * batch.clip_norm * batch.sensitivity[key]

    def apply(self, batch: Batch, state: dict[str, Any]) -> dict[str, Any]:
        assert batch.aggregate is not None
        stds = {}
        for k in batch.reference:  # reference order: the same draws whatever the dict order
            if k in batch.aggregate:
                std = self.std_for(batch, k)
                stds[k] = std
                if std > 0:
                    batch.aggregate[k] = batch.aggregate[k] + batch.rng.normal(
                        0.0, std, batch.aggregate[k].shape
                    )
        if stds:
            batch.info["noise_std"] = max(stds.values())
        return state


@register_step("retention")
class Retention(Step):
    """``new = r * previous + (1 - r) * aggregated`` through FDRMFL's ``retain``."""

    stage = "aggregate"

    def apply(self, batch: Batch, state: dict[str, Any]) -> dict[str, Any]:
        from fedmtl.aggregation.retention import retain

        assert batch.aggregate is not None
        prev = {k: batch.reference[k].astype(np.float64) for k in batch.aggregate}
        new = retain(prev, {k: prev[k] + d for k, d in batch.aggregate.items()}, self.cfg.retention)
        batch.aggregate = {k: new[k] - prev[k] for k in new}
        return state


@register_step("gradient_projection")
class GradientProjection(Step):
    """FedBone's GPAggregation on the updates: the history is the previous round's aggregate.
    Client updates point along minus their gradients, which leaves cosines, conflicts and
    projections unchanged, so the updates go in as they are. Applied per group of keys carried
    by the same clients (the body; each task's head)."""

    stage = "reduce"

    def init(self) -> dict[str, Any]:
        return {"history": {}}

    def apply(self, batch: Batch, state: dict[str, Any]) -> dict[str, Any]:
        from fedmtl.aggregation.gradient_projection import GPOptions, gp_aggregate

        history = state.get("history", {})
        out: dict[str, np.ndarray] = {}
        rates = []
        for keys, idx in batch.groups():
            w = batch.weights[idx] if self.cfg.weighting == "samples" else None
            opts = GPOptions(rescale=self.cfg.rescale, project=self.cfg.project, weights=w)
            hist = {k: history[k] for k in keys if k in history}
            res = gp_aggregate(
                [{k: batch.updates[i][k] for k in keys} for i in idx],
                hist if len(hist) == len(keys) else None,
                opts,
                batch.rng,
            )
            out.update({k: np.asarray(v, dtype=np.float64) for k, v in res.aggregate.items()})
            if res.pairs:
                rates.append(res.conflict_rate)
        batch.aggregate = out
        if rates:
            batch.info["conflict_rate"] = float(np.mean(rates))
        return {"history": {k: v.astype(np.float32) for k, v in out.items()}}
