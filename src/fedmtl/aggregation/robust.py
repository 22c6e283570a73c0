"""Byzantine-robust reduce steps: coordinate-wise median, trimmed mean, Krum and Multi-Krum.

Each tolerates a stated number ``f`` of arbitrary updates among ``n`` (huge, inf or NaN values
included): median ``f < n/2``; trimmed mean ``f <= floor(trim * n)``; Krum/Multi-Krum with their
``f`` as long as ``n >= 2f + 3``. A NaN coordinate counts as +inf (an extreme value), so sorting
based rules trim it away; in Krum a non-finite update is infinitely far from every other one. In a
multi-task federation every rule runs separately on each group of keys carried by the same clients
(the shared body; each task's head), so heads are still aggregated only over their task."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedmtl.aggregation.pipeline import Batch, Step, register_step


def _stack(batch: Batch, key: str, idx: list[int]) -> np.ndarray:
    s = np.stack([batch.updates[i][key] for i in idx])
    return np.where(np.isnan(s), np.inf, s)


def coordinate_median(stacked: np.ndarray) -> np.ndarray:
    return np.median(stacked, axis=0)


def trimmed_mean(stacked: np.ndarray, trim: float) -> np.ndarray:
    """Mean of each coordinate after dropping its ``floor(trim * n)`` largest and smallest values."""
    n = len(stacked)
    t = int(np.floor(trim * n))
    if n - 2 * t <= 0:
        return coordinate_median(stacked)
    s = np.sort(stacked, axis=0)
    return s[t : n - t].mean(axis=0)


def pairwise_sq_distances(vecs: np.ndarray) -> np.ndarray:
    """Squared L2 distances between rows; inf for any pair involving a non-finite row."""
    finite = np.isfinite(vecs).all(axis=1)
    v = np.where(finite[:, None], vecs, 0.0)
    sq = np.einsum("ij,ij->i", v, v)
    d = sq[:, None] + sq[None, :] - 2.0 * (v @ v.T)
    d = np.maximum(d, 0.0)
    d[~finite, :] = np.inf
    d[:, ~finite] = np.inf
    np.fill_diagonal(d, 0.0)
    return d


def krum_scores(vecs: np.ndarray, f: int) -> np.ndarray:
    """Krum score of each row: the sum of squared distances to its ``n - f - 2`` nearest others."""
    n = len(vecs)
    if n == 1:
        return np.zeros(1)
    k = min(n - 1, max(1, n - f - 2))
    d = pairwise_sq_distances(vecs)
    np.fill_diagonal(d, np.inf)
    with np.errstate(invalid="ignore"):
        return np.sort(d, axis=1)[:, :k].sum(axis=1)


@register_step("median")
class Median(Step):
    stage = "reduce"

    def apply(self, batch: Batch, state: dict[str, Any]) -> dict[str, Any]:
        batch.aggregate = {
            k: coordinate_median(_stack(batch, k, idx)) for keys, idx in batch.groups() for k in keys
        }
        return state


@register_step("trimmed_mean")
class TrimmedMean(Step):
    stage = "reduce"

    def apply(self, batch: Batch, state: dict[str, Any]) -> dict[str, Any]:
        batch.aggregate = {
            k: trimmed_mean(_stack(batch, k, idx), self.cfg.trim)
            for keys, idx in batch.groups()
            for k in keys
        }
        return state


@register_step("krum")
class Krum(Step):
    """Krum picks one update; Multi-Krum (``multi_krum``) averages the ``m`` best-scored ones."""

    stage = "reduce"

    def how_many(self, n: int) -> int:
        return 1

    def apply(self, batch: Batch, state: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, np.ndarray] = {}
        chosen: set[int] = set()
        for keys, idx in batch.groups():
            vecs = np.stack([np.concatenate([batch.updates[i][k].ravel() for k in keys]) for i in idx])
            scores = krum_scores(vecs, self.cfg.f)
            pick = [idx[j] for j in np.argsort(scores, kind="stable")[: self.how_many(len(idx))]]
            chosen.update(batch.cids[i] for i in pick)
            w = batch.weights[pick]
            w = w / w.sum() if w.sum() > 0 else np.full(len(pick), 1.0 / len(pick))
            for k in keys:
                out[k] = sum(wi * batch.updates[i][k] for wi, i in zip(w, pick, strict=True))
        batch.aggregate = out
        batch.info["krum_selected"] = sorted(chosen)
        return state


@register_step("multi_krum")
class MultiKrum(Krum):
    def how_many(self, n: int) -> int:
        m = self.cfg.m if self.cfg.m is not None else n - self.cfg.f
        return int(min(n, max(1, m)))
