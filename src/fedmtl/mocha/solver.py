"""Losses and the compiled SDCA kernels of MOCHA's local subproblem.

Everything is in the reference code's normalisation: per-task *averaged* loss plus
(lambda/2) tr(W Omega W^T), dual variables alpha with b_t = X_t^T alpha_t / n_t. Rows of ``W`` are
tasks here (``W[t] = w_t``; the spec writes W as d x m), so one task's weights are contiguous.

A loss enters the kernels through four scalar functions: its value, its slope, its negated
conjugate -l*(-a) (the dual term) and the maximiser of the one-coordinate dual subproblem. Adding
another convex loss is one more ``code`` branch in each of them plus an entry in ``losses.py``; the
kernels themselves are loss-agnostic.
"""

from __future__ import annotations

import math

import numpy as np

from fedmtl.mocha._jit import jit
from fedmtl.mocha.losses import LOSS_NAMES, MARGIN, SQUARED, Loss, get_loss

__all__ = [
    "LOSS_NAMES",
    "MARGIN",
    "SQUARED",
    "Loss",
    "coordinate_step",
    "get_loss",
    "local_sdca",
    "local_sdca_until",
    "minibatch_gradient",
    "sdca_solve",
    "task_terms",
]


# ------------------------------------------------------------------------------ scalar pieces


@jit
def loss_value(code: int, z: float, y: float, gamma: float) -> float:
    """l(z; y) for prediction z."""
    if code == SQUARED:
        r = z - y
        return 0.5 * r * r
    slack = 1.0 - y * z
    if slack <= 0.0:
        return 0.0
    if slack >= gamma:
        return slack - 0.5 * gamma
    return slack * slack / (2.0 * gamma)


@jit
def loss_slope(code: int, z: float, y: float, gamma: float) -> float:
    """A (sub)gradient dl/dz, for the mini-batch SGD baseline."""
    if code == SQUARED:
        return z - y
    slack = 1.0 - y * z
    if slack <= 0.0:
        return 0.0
    if slack >= gamma:
        return -y
    return -y * slack / gamma


@jit
def dual_value(code: int, a: float, y: float, gamma: float) -> float:
    """-l*(-a): the per-sample dual term (feasibility is kept by the step, not checked here)."""
    if code == SQUARED:
        return y * a - 0.5 * a * a
    b = y * a
    return b - 0.5 * gamma * b * b


@jit
def coordinate_step(code: int, y: float, a: float, z: float, curv: float, gamma: float) -> float:
    """The new alpha_i maximising the one-coordinate dual with the rest held fixed.

    The one-coordinate problem is  max_d  -l*(-(a + d)) - z d - (curv / 2) d^2  where z is the
    current (local) margin x^T v and curv = sigma' Sigma_tt ||x||^2 / (lambda n_t).
    """
    if code == SQUARED:
        return a + (y - a - z) / (1.0 + curv)
    beta = (1.0 - y * z + curv * y * a) / (gamma + curv)  # beta = y * alpha_new, boxed to [0, 1]
    return y * min(1.0, max(0.0, beta))


@jit
def permutation(u: np.ndarray) -> np.ndarray:
    """Fisher-Yates permutation of range(len(u)) driven by the given uniforms in [0, 1).

    Uniforms come from NumPy generators outside the kernel, so compiled and interpreted runs (and
    the simulator and the direct engine) draw the same permutations from the same seed."""
    n = u.shape[0]
    p = np.arange(n)
    for i in range(n - 1, 0, -1):
        j = int(u[i] * (i + 1))
        if j > i:
            j = i
        tmp = p[i]
        p[i] = p[j]
        p[j] = tmp
    return p


# ------------------------------------------------------------------------------ kernels


@jit
def local_sdca(
    X: np.ndarray,
    y: np.ndarray,
    sqnorm: np.ndarray,
    offsets: np.ndarray,
    alpha: np.ndarray,
    W: np.ndarray,
    sig_diag: np.ndarray,
    sigma_p: float,
    lam: float,
    uniforms: np.ndarray,
    steps: np.ndarray,
    code: int,
    gamma: float,
    couple: float,
) -> np.ndarray:
    """Run ``steps[t]`` SDCA steps on each task's local subproblem; return Delta B (rows = tasks).

    ``alpha`` is updated in place. Coordinates follow a fresh random permutation per task (wrapping
    when steps > n_t). With ``couple = 1`` this is MOCHA's step: the local iterate
    v = w_t + sigma' u_t moves with every step. With ``couple = 0`` (and sigma_p = 1) w_t stays
    frozen, which is the mini-batch SDCA baseline. Zero-norm rows are skipped (quirk Q8).
    """
    m = offsets.shape[0] - 1
    d = X.shape[1]
    dB = np.zeros((m, d))
    v = np.empty(d)
    for t in range(m):
        k_steps = steps[t]
        lo = offsets[t]
        n = offsets[t + 1] - lo
        if k_steps <= 0 or n == 0:
            continue
        perm = permutation(uniforms[lo : lo + n])
        for k in range(d):
            v[k] = W[t, k]
        curv_unit = sigma_p * sig_diag[t] / (lam * n)
        move = couple * curv_unit
        for s in range(k_steps):
            i = lo + perm[s % n]
            q = sqnorm[i]
            if q == 0.0:
                continue
            z = 0.0
            for k in range(d):
                z += X[i, k] * v[k]
            a_old = alpha[i]
            a_new = coordinate_step(code, y[i], a_old, z, curv_unit * q, gamma)
            delta = a_new - a_old
            if delta != 0.0:
                alpha[i] = a_new
                mv = move * delta
                bd = delta / n
                for k in range(d):
                    v[k] += mv * X[i, k]
                    dB[t, k] += bd * X[i, k]
    return dB


@jit
def _local_gap(
    X: np.ndarray, y: np.ndarray, alpha: np.ndarray, lo: int, n: int, v: np.ndarray, code: int, gamma: float
) -> float:
    """Fenchel-Young duality gap of one task's local subproblem at local iterate v.

    (1/n) sum_i [ l(x_i^T v) + l*(-alpha_i) + alpha_i x_i^T v ] >= the subproblem's sub-optimality."""
    d = X.shape[1]
    total = 0.0
    for i in range(lo, lo + n):
        z = 0.0
        for k in range(d):
            z += X[i, k] * v[k]
        total += loss_value(code, z, y[i], gamma) - dual_value(code, alpha[i], y[i], gamma) + alpha[i] * z
    return total / n


@jit
def local_sdca_until(
    X: np.ndarray,
    y: np.ndarray,
    sqnorm: np.ndarray,
    offsets: np.ndarray,
    alpha: np.ndarray,
    W: np.ndarray,
    sig_diag: np.ndarray,
    sigma_p: float,
    lam: float,
    uniforms: np.ndarray,
    active: np.ndarray,
    theta: float,
    check_every: int,
    max_steps: int,
    code: int,
    gamma: float,
) -> tuple[np.ndarray, np.ndarray]:
    """CoCoA's local solver: SDCA steps until the local gap falls to ``theta`` times its start value.

    A fixed quality theta for every node means slow nodes decide the round time; returns
    (Delta B, steps taken per task)."""
    m = offsets.shape[0] - 1
    d = X.shape[1]
    dB = np.zeros((m, d))
    taken = np.zeros(m, dtype=np.int64)
    v = np.empty(d)
    for t in range(m):
        lo = offsets[t]
        n = offsets[t + 1] - lo
        if not active[t] or n == 0:
            continue
        perm = permutation(uniforms[lo : lo + n])
        for k in range(d):
            v[k] = W[t, k]
        target = theta * _local_gap(X, y, alpha, lo, n, v, code, gamma)
        curv_unit = sigma_p * sig_diag[t] / (lam * n)
        s = 0
        while s < max_steps:
            i = lo + perm[s % n]
            s += 1
            q = sqnorm[i]
            if q != 0.0:
                z = 0.0
                for k in range(d):
                    z += X[i, k] * v[k]
                a_old = alpha[i]
                a_new = coordinate_step(code, y[i], a_old, z, curv_unit * q, gamma)
                delta = a_new - a_old
                if delta != 0.0:
                    alpha[i] = a_new
                    mv = curv_unit * delta
                    bd = delta / n
                    for k in range(d):
                        v[k] += mv * X[i, k]
                        dB[t, k] += bd * X[i, k]
            if s % check_every == 0 and _local_gap(X, y, alpha, lo, n, v, code, gamma) <= target:
                break
        taken[t] = s
    return dB, taken


@jit
def task_terms(
    X: np.ndarray,
    y: np.ndarray,
    offsets: np.ndarray,
    W: np.ndarray,
    alpha: np.ndarray,
    code: int,
    gamma: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-task mean loss at W and mean dual term at alpha: the data parts of P and D."""
    m = offsets.shape[0] - 1
    d = X.shape[1]
    loss = np.zeros(m)
    conj = np.zeros(m)
    for t in range(m):
        lo = offsets[t]
        n = offsets[t + 1] - lo
        if n == 0:
            continue
        for i in range(lo, lo + n):
            z = 0.0
            for k in range(d):
                z += X[i, k] * W[t, k]
            loss[t] += loss_value(code, z, y[i], gamma)
            conj[t] += dual_value(code, alpha[i], y[i], gamma)
        loss[t] /= n
        conj[t] /= n
    return loss, conj


@jit
def minibatch_gradient(
    X: np.ndarray,
    y: np.ndarray,
    offsets: np.ndarray,
    W: np.ndarray,
    uniforms: np.ndarray,
    steps: np.ndarray,
    code: int,
    gamma: float,
) -> np.ndarray:
    """Sum over ``steps[t]`` sampled points of -dl/dz x_i (rows = tasks); Mb-SGD's G."""
    m = offsets.shape[0] - 1
    d = X.shape[1]
    G = np.zeros((m, d))
    for t in range(m):
        lo = offsets[t]
        n = offsets[t + 1] - lo
        if steps[t] <= 0 or n == 0:
            continue
        perm = permutation(uniforms[lo : lo + n])
        for s in range(steps[t]):
            i = lo + perm[s % n]
            z = 0.0
            for k in range(d):
                z += X[i, k] * W[t, k]
            g = loss_slope(code, z, y[i], gamma)
            if g != 0.0:
                for k in range(d):
                    G[t, k] -= g * X[i, k]
    return G


@jit
def _single_gap(
    X: np.ndarray, y: np.ndarray, alpha: np.ndarray, w: np.ndarray, lam: float, code: int, gamma: float
) -> float:
    """P(w) - D(alpha) of the single-task problem at w = X^T alpha / (lambda n)."""
    n, d = X.shape
    total = 0.0
    for i in range(n):
        z = 0.0
        for k in range(d):
            z += X[i, k] * w[k]
        total += loss_value(code, z, y[i], gamma) - dual_value(code, alpha[i], y[i], gamma)
    sq = 0.0
    for k in range(d):
        sq += w[k] * w[k]
    return total / n + lam * sq


@jit
def sdca_solve(
    X: np.ndarray, y: np.ndarray, lam: float, code: int, gamma: float, max_epochs: int, tol: float
) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Single-task SDCA with cyclic order (as the reference's Global/Local SVM) to duality gap ``tol``.

    Solves min_w (1/n) sum_i l(x_i^T w; y_i) + (lambda/2) ||w||^2; returns (w, alpha, epochs, gap).
    The gap costs as much as an epoch, so it is checked every 5 epochs (and after the last)."""
    n, d = X.shape
    w = np.zeros(d)
    alpha = np.zeros(n)
    gap = math.inf
    epochs = 0
    if n == 0:
        return w, alpha, 0, 0.0
    scale = 1.0 / (lam * n)
    sqn = np.zeros(n)
    for i in range(n):
        for k in range(d):
            sqn[i] += X[i, k] * X[i, k]
    for epoch in range(max_epochs):
        epochs = epoch + 1
        for i in range(n):
            q = sqn[i]
            if q == 0.0:
                continue
            z = 0.0
            for k in range(d):
                z += X[i, k] * w[k]
            a_old = alpha[i]
            a_new = coordinate_step(code, y[i], a_old, z, q * scale, gamma)
            delta = a_new - a_old
            if delta != 0.0:
                alpha[i] = a_new
                for k in range(d):
                    w[k] += delta * scale * X[i, k]
        if epochs % 5 == 0 or epochs == max_epochs:
            gap = _single_gap(X, y, alpha, w, lam, code, gamma)
            if gap <= tol:
                break
    return w, alpha, epochs, gap
