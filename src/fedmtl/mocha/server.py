"""MOCHA's server-side math, written once: the fast engine (``fedmtl.mocha.engine``) and the fedmtl
algorithm (``fedmtl.algorithms.mocha``) both call it.

After a round the server adds the clients' dual steps, B += Delta B, and moves the primal model
with them, W += Sigma Delta B / lambda (so W stays W(alpha) = Sigma B / lambda). An Omega-step
re-learns the task relationship in closed form from W (``fedmtl.mocha.omega.omega_step``) and
recomputes W(alpha) under the new Sigma; the reference MATLAB code keeps the old W instead (quirk
Q3, docs/mocha.md)."""

from __future__ import annotations

import numpy as np

from fedmtl.mocha.omega import Structure, omega_step

#: lambda of (lambda/2) tr(W Omega W^T) unless a run sets it: the value of the paper's error tables
#: and of this project's MOCHA benchmark and example.
DEFAULT_LAMBDA = 1e-4


def apply_update(
    W: np.ndarray, B: np.ndarray, sigma: np.ndarray, dB: np.ndarray, lam: float
) -> tuple[np.ndarray, np.ndarray]:
    """(W + Sigma Delta B / lambda, B + Delta B): row t of W gets sum_t' Sigma_tt' db_t' / lambda."""
    return W + sigma @ dB / lam, B + dB


def relearn_omega(
    W: np.ndarray, B: np.ndarray, lam: float, keep_w: bool = False
) -> tuple[Structure, np.ndarray]:
    """The Omega-step on W and the primal model under it: Sigma B / lambda, or W itself when
    ``keep_w`` (quirk Q3, or a method without dual variables)."""
    struct = omega_step(W)
    return struct, (W if keep_w else struct.sigma @ B / lam)
