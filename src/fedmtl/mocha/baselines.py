"""Baselines: Global and Local models, and the distributed solvers MOCHA is compared with.

CoCoA, Mb-SDCA and Mb-SGD reuse MOCHA's driver (``engine.alternate``): same rounds, same Omega-steps,
same systems simulation; only the per-round node work differs, as in the reference code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmtl.mocha.data import Tasks
from fedmtl.mocha.engine import MochaOptions, RoundContext, RunResult, State, alternate, work_steps
from fedmtl.mocha.solver import (
    SQUARED,
    Loss,
    get_loss,
    local_sdca,
    local_sdca_until,
    minibatch_gradient,
    sdca_solve,
)

# ------------------------------------------------------------------------------ Global / Local


@dataclass(frozen=True)
class SolveOptions:
    """Stopping rule of the single-model solver used by Global and Local."""

    max_epochs: int = 500  # reference max_sdca_iters
    tol: float = 1e-5  # duality gap (the reference stops on |Delta P| < 1e-5 instead)


def fit_single(
    X: np.ndarray, y: np.ndarray, lam: float, loss: Loss, opts: SolveOptions = SolveOptions()
) -> np.ndarray:
    """min_w mean_i l(x_i^T w; y_i) + (lambda/2)||w||^2: closed form for squared loss, SDCA otherwise."""
    if loss.code == SQUARED:
        n, d = X.shape
        return np.linalg.solve(X.T @ X / max(n, 1) + lam * np.eye(d), X.T @ y / max(n, 1))
    w, _, _, _ = sdca_solve(X, y, lam, loss.code, loss.gamma, opts.max_epochs, opts.tol)
    return w


def fit_global(train: Tasks, lam: float, loss: Loss, opts: SolveOptions = SolveOptions()) -> np.ndarray:
    """One model on the pooled data (loss averaged over all points), copied to every task's row."""
    w = fit_single(train.X, train.y, lam, loss, opts)
    return np.tile(w, (train.m, 1))


def fit_local(train: Tasks, lam: float, loss: Loss, opts: SolveOptions = SolveOptions()) -> np.ndarray:
    """One independent model per task: MOCHA's problem with Omega = I."""
    W = np.zeros((train.m, train.d))
    for t in range(train.m):
        X, y = train.task(t)
        W[t] = fit_single(X, y, lam, loss, opts)
    return W


# ------------------------------------------------------------------------------ distributed solvers


@dataclass(frozen=True)
class CocoaOptions:
    """CoCoA: every node solves its subproblem to the same quality theta, however long that takes."""

    theta: float = 0.5
    check_every: int = 5
    max_steps: int = 999


def run_cocoa(train: Tasks, opts: MochaOptions, cocoa: CocoaOptions = CocoaOptions()) -> RunResult:
    """MOCHA's method with a fixed theta for every node (the reference's 'CoCoA' generalisation).

    A node stops when its local Fenchel-Young gap is at most theta times the gap it started the
    round with (a computable stand-in for Definition 1's theta; the reference code uses an ad-hoc
    local gap). The steps taken are recorded: the slowest node sets the round time."""
    loss = get_loss(opts.loss, opts.gamma)

    def step(state: State, ctx: RoundContext) -> np.ndarray:
        u = ctx.rng.random(train.N)
        s = state.struct
        dB, taken = local_sdca_until(
            train.X,
            train.y,
            train.sqnorm,
            train.offsets,
            state.alpha,
            state.W,
            s.diag,
            s.sigma_p,
            opts.lam,
            u,
            ~ctx.dropped,
            cocoa.theta,
            cocoa.check_every,
            cocoa.max_steps,
            loss.code,
            loss.gamma,
        )
        state.apply(dB)
        return taken

    return alternate(train, opts, step)


@dataclass(frozen=True)
class MinibatchOptions:
    """Mini-batch size (fraction of n_t per round) and step scaling of Mb-SDCA / Mb-SGD."""

    frac: float = 0.5
    scaling: float = 10.0


def _batch_steps(train: Tasks, opts: MochaOptions, mb: MinibatchOptions, ctx: RoundContext) -> np.ndarray:
    """K_t from the node's work fraction times the method's own batch fraction (Q5 uses MOCHA's)."""
    scale = opts.sdca_frac if opts.quirks.baseline_frac_from_mocha else mb.frac
    return work_steps(ctx.frac, scale, train.sizes, ctx.dropped)


def run_mbsdca(train: Tasks, opts: MochaOptions, mb: MinibatchOptions = MinibatchOptions()) -> RunResult:
    """Mini-batch SDCA: K_t SDCA steps against a frozen w_t, then a damped step of size scaling / sum K.

    alpha <- alpha_prev + f (alpha - alpha_prev) and W += f Sigma Delta B / lambda keep W = W(alpha)."""
    loss = get_loss(opts.loss, opts.gamma)

    def step(state: State, ctx: RoundContext) -> np.ndarray:
        k = _batch_steps(train, opts, mb, ctx)
        u = ctx.rng.random(train.N)
        before = state.alpha.copy()
        s = state.struct
        dB = local_sdca(
            train.X,
            train.y,
            train.sqnorm,
            train.offsets,
            state.alpha,
            state.W,
            s.diag,
            1.0,
            opts.lam,
            u,
            k,
            loss.code,
            loss.gamma,
            0.0,
        )
        total = int(k.sum())
        f = mb.scaling / total if total else 0.0
        state.alpha[:] = before + f * (state.alpha - before)
        state.apply(f * dB)
        return k

    return alternate(train, opts, step)


def run_mbsgd(
    train: Tasks, opts: MochaOptions, mb: MinibatchOptions = MinibatchOptions(scaling=0.1)
) -> RunResult:
    """Mini-batch SGD on the primal with step s/h (h: round within the W-phase) and a norm projection.

    Fixed (Q6): W <- W - (s/h) (lambda Omega W - G_hat), G_hat_t = G_t / K_t, an unbiased subgradient
    of P (the reference divides every task's G_t by sum_t K_t, which weights the data term 1/m
    against the regulariser). Reference: W <- W (I - (s/h) Omega) + (s / sum K) G, i.e. the Omega
    term lacks lambda and the data term lacks 1/h. Rows are then projected onto
    ||w_t|| <= 1/sqrt(lambda) (margin losses only: that ball holds the SVM optimum)."""
    loss = get_loss(opts.loss, opts.gamma)
    ref = opts.quirks.sgd_reference_step

    def step(state: State, ctx: RoundContext) -> np.ndarray:
        k = _batch_steps(train, opts, mb, ctx)
        u = ctx.rng.random(train.N)
        G = minibatch_gradient(train.X, train.y, train.offsets, state.W, u, k, loss.code, loss.gamma)
        s, h = mb.scaling, ctx.inner
        omega = state.struct.omega
        if ref:
            state.W = state.W - (s / h) * omega @ state.W + (s / max(int(k.sum()), 1)) * G
        else:
            g_hat = G / np.maximum(k, 1)[:, None]
            state.W = state.W - (s / h) * (opts.lam * omega @ state.W - g_hat)
        if loss.code != SQUARED:
            norms = np.linalg.norm(state.W, axis=1)
            radius = 1.0 / np.sqrt(opts.lam)
            state.W *= np.minimum(1.0, radius / np.maximum(norms, 1e-300))[:, None]
        return k

    return alternate(train, opts, step, has_dual=False)
