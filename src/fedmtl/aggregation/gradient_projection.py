"""GPAggregation (FedBone): history-rescaled, conflict-projected averaging of client gradients.

Pure functions over plain arrays, so any server (FedBone's split learning, a PCGrad-style
aggregation of client deltas) can call them: per-client gradient dicts and the previous aggregate
in, the aggregate and what happened (conflict rate, attention weights) out.

The procedure, as the FedBone spec reads its sources (several parts are unverified; see
docs/fedbone.md):

1. *Rescaling* against the history: ``a = K * softmax_k(cos(g_k, g_hist))``, ``g~_k = a_k g_k``
   (``a_k = 1`` when there is no history yet). Heterogeneous losses (cross-entropy vs. pixel MSE)
   give gradients of very different scales; weighting by agreement with the last aggregate lets the
   consistent direction lead instead of the loudest loss.
2. *Projection* (PCGrad's rule, Yu et al. 2020): for each client i, in a seeded random order of the
   others, whenever ``g'_i . g~_j < 0`` remove the component along ``g~_j``:
   ``g'_i <- g'_i - (g'_i . g~_j / |g~_j|^2) g~_j``.
3. *Mean* of the projected gradients (uniform, or weighted by data size); PCGrad sums instead.

Two gradients conflict iff their cosine is negative; the conflict rate is the fraction of client
pairs that do, measured on the raw gradients (positive rescaling does not change any sign)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

Grads = dict[str, np.ndarray]


@dataclass(frozen=True)
class GPOptions:
    rescale: bool = True
    project: bool = True
    weights: Sequence[float] | None = None  # None: uniform mean


@dataclass
class GPResult:
    aggregate: Grads
    conflict_rate: float  # fraction of client pairs with negative cosine (nan with < 2 clients)
    conflicts: int
    pairs: int
    attention: list[float] = field(default_factory=list)
    projections: int = 0  # projections applied (at most K*(K-1))


def flatten(grads: Grads, keys: Sequence[str]) -> np.ndarray:
    return np.concatenate([np.asarray(grads[k], dtype=np.float64).ravel() for k in keys])


def unflatten(vec: np.ndarray, like: Grads, keys: Sequence[str]) -> Grads:
    out: Grads = {}
    start = 0
    for k in keys:
        ref = like[k]
        out[k] = vec[start : start + ref.size].reshape(ref.shape).astype(ref.dtype)
        start += ref.size
    return out


def cosine_matrix(g: np.ndarray) -> np.ndarray:
    """Pairwise cosines of the rows of ``g`` (0 where a row is zero)."""
    norms = np.linalg.norm(g, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    unit = g / safe[:, None]
    cos = unit @ unit.T
    cos[norms == 0] = 0.0
    cos[:, norms == 0] = 0.0
    return cos


def conflict_stats(g: np.ndarray) -> tuple[int, int]:
    """(conflicting pairs, pairs) among the rows of ``g``."""
    k = len(g)
    if k < 2:
        return 0, 0
    cos = cosine_matrix(g)
    iu = np.triu_indices(k, 1)
    return int((cos[iu] < 0).sum()), len(iu[0])


def attention_weights(g: np.ndarray, hist: np.ndarray | None) -> np.ndarray:
    """``K * softmax_k(cos(g_k, g_hist))``; all ones without a (non-zero) history."""
    k = len(g)
    hn = 0.0 if hist is None else float(np.linalg.norm(hist))
    if hist is None or hn == 0:
        return np.ones(k)
    norms = np.linalg.norm(g, axis=1)
    cos = np.where(norms > 0, g @ hist / (np.where(norms > 0, norms, 1.0) * hn), 0.0)
    e = np.exp(cos - cos.max())
    return k * e / e.sum()


def project_pair(gi: np.ndarray, gj: np.ndarray) -> tuple[np.ndarray, bool]:
    """``gi`` without its component against ``gj`` if they conflict (PCGrad's rule)."""
    dot = float(gi @ gj)
    nn = float(gj @ gj)
    if dot < 0 and nn > 0:
        return gi - (dot / nn) * gj, True
    return gi, False


def project_conflicts(g: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Each row projected against every other row it conflicts with, in a random order per row.

    Projections use the *unprojected* other rows (PCGrad), so the result does not depend on which
    row is processed first; only the order of each row's own projections is random."""
    k = len(g)
    out = g.copy()
    done = 0
    for i in range(k):
        gi = g[i].copy()
        for j in rng.permutation([j for j in range(k) if j != i]):
            gi, hit = project_pair(gi, g[j])
            done += hit
        out[i] = gi
    return out, done


def gp_aggregate(
    grads: Sequence[Grads],
    history: Grads | None,
    options: GPOptions = GPOptions(),
    rng: np.random.Generator | None = None,
) -> GPResult:
    """Aggregate per-client gradients of the same parameters (GPAggregation).

    ``history`` is the previous aggregate (None at the first step). With ``rescale`` and
    ``project`` both off this is the plain (weighted) mean: the split-learning baseline."""
    if not grads:
        raise ValueError("gp_aggregate: no client gradients")
    keys = sorted(grads[0])
    g = np.stack([flatten(d, keys) for d in grads])
    conflicts, pairs = conflict_stats(g)
    hist = flatten(history, keys) if history is not None and set(history) == set(keys) else None
    att = attention_weights(g, hist) if options.rescale else np.ones(len(g))
    scaled = g * att[:, None]
    projected, n_proj = (
        project_conflicts(scaled, rng if rng is not None else np.random.default_rng(0))
        if options.project
        else (scaled, 0)
    )
    w = np.ones(len(g)) if options.weights is None else np.asarray(options.weights, dtype=np.float64)
    if len(w) != len(g) or w.sum() <= 0:
        raise ValueError(f"gp_aggregate: {len(w)} weights for {len(g)} gradients (need a positive sum)")
    mean = (w[:, None] * projected).sum(0) / w.sum()
    return GPResult(
        aggregate=unflatten(mean, grads[0], keys),
        conflict_rate=conflicts / pairs if pairs else float("nan"),
        conflicts=conflicts,
        pairs=pairs,
        attention=[float(a) for a in att],
        projections=n_proj,
    )
