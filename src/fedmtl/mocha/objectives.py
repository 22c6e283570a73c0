"""Primal, dual and duality gap of the MOCHA objective, and the reference test metrics.

    P(W)     = sum_t mean_i l(w_t^T x_ti; y_ti) + (lambda/2) tr(W Omega W^T)
    D(alpha) = sum_t mean_i -l*(-alpha_ti)      - (1/(2 lambda)) tr(B Sigma B^T),  b_t = X_t^T alpha_t / n_t

Weak duality P(W) >= D(alpha) holds for any W and feasible alpha; at W = W(alpha) = B Sigma / lambda
the gap certifies sub-optimality. The dual is computed from B, never from W, so it stays a true dual
even when W drifted from W(alpha) (reference quirk Q3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmtl.mocha.data import Tasks
from fedmtl.mocha.omega import quad
from fedmtl.mocha.solver import Loss, task_terms


@dataclass(frozen=True)
class Objectives:
    primal: float
    dual: float

    @property
    def gap(self) -> float:
        return self.primal - self.dual


def b_matrix(tasks: Tasks, alpha: np.ndarray) -> np.ndarray:
    """B with rows b_t = X_t^T alpha_t / n_t."""
    weighted = tasks.X * (alpha / np.repeat(np.maximum(tasks.sizes, 1), tasks.sizes))[:, None]
    B = np.zeros((tasks.m, tasks.d))
    np.add.at(B, tasks.task_index, weighted)
    return B


def primal_dual(
    tasks: Tasks,
    W: np.ndarray,
    alpha: np.ndarray | None,
    B: np.ndarray | None,
    sigma: np.ndarray,
    omega: np.ndarray,
    lam: float,
    loss: Loss,
) -> Objectives:
    """P(W) and D(alpha); without ``alpha`` (SGD has no dual) the dual is NaN."""
    a = alpha if alpha is not None else np.zeros(tasks.N)
    losses, conj = task_terms(tasks.X, tasks.y, tasks.offsets, W, a, loss.code, loss.gamma)
    primal = float(losses.sum()) + 0.5 * lam * quad(omega, W)
    if alpha is None:
        return Objectives(primal, float("nan"))
    if B is None:
        B = b_matrix(tasks, alpha)
    return Objectives(primal, float(conj.sum()) - quad(sigma, B) / (2.0 * lam))


def predictions(tasks: Tasks, W: np.ndarray) -> np.ndarray:
    """x_ti^T w_t for every stacked row."""
    return np.einsum("ij,ij->i", tasks.X, W[tasks.task_index])


def per_task_mean(tasks: Tasks, values: np.ndarray) -> np.ndarray:
    """Mean of a per-row quantity within each task (NaN for an empty task)."""
    sums = np.bincount(tasks.task_index, weights=values, minlength=tasks.m)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / tasks.sizes


def classification_error(tasks: Tasks, W: np.ndarray) -> float:
    """Reference metric: per-task fraction of sign(x^T w_t) != y, averaged over tasks, unweighted.

    sign(0) = 0 counts as an error, so W = 0 scores 1.0 (the fedmtl runner's argmax instead maps a
    zero margin to the negative class)."""
    wrong = (np.sign(predictions(tasks, W)) != tasks.y).astype(np.float64)
    return float(np.nanmean(per_task_mean(tasks, wrong)))


def regression_scores(tasks: Tasks, W: np.ndarray, scale: float = 1.0) -> dict[str, float]:
    """RMSE averaged over tasks (reference ``avg = 1``) and pooled explained variance.

    Explained variance = 1 - sum of squared errors / total sum of squares around the pooled test
    mean (Argyriou et al. 2008's School metric). ``scale`` maps standardised targets back."""
    resid = (predictions(tasks, W) - tasks.y) * scale
    rmse = np.sqrt(per_task_mean(tasks, resid**2))
    yc = (tasks.y - tasks.y.mean()) * scale
    return {
        "rmse": float(np.nanmean(rmse)),
        "explained_variance": float(1 - np.sum(resid**2) / np.sum(yc**2)),
    }
