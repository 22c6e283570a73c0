"""The task-relationship matrix Omega (and Sigma = Omega^-1): learned or fixed structures.

MOCHA's W-step only needs Sigma and the safety factor sigma'. The learned structure is MTRL's
closed form under tr(Sigma) = 1; the fixed ones encode a prior about how tasks relate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from fedmtl.errors import ConfigError

EIG_FLOOR = 1e-7  # reference clip for eigenvalues of W^T W (quirk Q4: applied always)

OMEGA_KINDS = ("learned", "identity", "independent", "mean", "clusters")


@dataclass(frozen=True)
class Structure:
    """Sigma, Omega and sigma' for one phase of W-steps."""

    sigma: np.ndarray
    omega: np.ndarray
    sigma_p: float

    @cached_property
    def diag(self) -> np.ndarray:
        """Sigma_tt for every task, contiguous (what the kernels take)."""
        return np.ascontiguousarray(np.diag(self.sigma))


def quad(M: np.ndarray, rows: np.ndarray) -> float:
    """tr(R^T M R) for R with one row per task: sum_tt' M_tt' <r_t, r_t'> (e.g. tr(W Omega W^T))."""
    return float(np.sum(M * (rows @ rows.T)))


def sigma_prime(sigma: np.ndarray) -> float:
    """Gershgorin-type safety factor max_t sum_t' |Sigma_tt'| / Sigma_tt (>= 1).

    Inflating each node's quadratic by it makes it safe to add all m local updates at once."""
    return float(np.max(np.abs(sigma).sum(axis=1) / np.diag(sigma)))


def structure(sigma: np.ndarray, omega: np.ndarray) -> Structure:
    return Structure(sigma, omega, sigma_prime(sigma))


def learned_init(m: int) -> Structure:
    """The reference start: Sigma = I/m, Omega = m I, sigma' = 1."""
    return Structure(np.eye(m) / m, m * np.eye(m), 1.0)


def omega_step(W: np.ndarray, floor: float = EIG_FLOOR) -> Structure:
    """Closed-form Omega-step: Sigma = (W^T W)^(1/2) / tr((W^T W)^(1/2)), Omega = Sigma^-1.

    ``W`` has one row per task. Eigenvalues of the Gram matrix are always clipped to ``floor``
    (quirk Q4): with d < m the Gram matrix is singular and NumPy's eigh may return tiny positive
    values where MATLAB's eig returns negative ones, so clipping only on negatives would not be
    reproducible. Omega comes from the same eigendecomposition instead of a matrix inverse."""
    gram = W @ W.T
    evals, vecs = np.linalg.eigh((gram + gram.T) / 2)
    roots = np.sqrt(np.maximum(evals, floor))
    trace = roots.sum()
    sigma = (vecs * (roots / trace)) @ vecs.T
    omega = (vecs * (trace / roots)) @ vecs.T
    sigma = (sigma + sigma.T) / 2
    omega = (omega + omega.T) / 2
    return structure(sigma, omega)


def mean_regularised(m: int, weight: float) -> Structure:
    """Omega = I + mu (I - 11^T/m): sum_t ||w_t||^2 + mu sum_t ||w_t - mean w||^2 (Evgeniou-Pontil).

    The ridge part keeps Omega invertible (the pure centring matrix is singular)."""
    return clustered(np.zeros(m, dtype=np.int64), weight)


def clustered(labels: Sequence[int] | np.ndarray, weight: float) -> Structure:
    """Omega = I + mu (I - E), E averaging within clusters: pulls each w_t towards its cluster mean."""
    labels = np.asarray(labels)
    m = len(labels)
    same = (labels[:, None] == labels[None, :]).astype(np.float64)
    E = same / same.sum(axis=1, keepdims=True)
    eye = np.eye(m)
    omega = eye + weight * (eye - E)
    sigma = E + (eye - E) / (1.0 + weight)  # E is an orthogonal projection, so this inverts omega
    return structure(sigma, omega)


def identity(m: int) -> Structure:
    """Omega = I: independent tasks; with the same lambda MOCHA then solves Local exactly."""
    return Structure(np.eye(m), np.eye(m), 1.0)


def initial_structure(
    kind: str, m: int, weight: float = 1.0, clusters: Sequence[int] | None = None
) -> Structure:
    """The Structure a run starts from (and keeps, for every kind except ``learned``)."""
    if kind == "learned":
        return learned_init(m)
    if kind in ("identity", "independent"):
        return identity(m)
    if kind == "mean":
        return mean_regularised(m, weight)
    if kind == "clusters":
        if clusters is None or len(clusters) != m:
            got = "none" if clusters is None else f"{len(clusters)} labels"
            raise ConfigError(
                f"config: algorithm.clusters: omega 'clusters' needs one label per task ({m}), got {got}"
            )
        return clustered(clusters, weight)
    raise ConfigError(
        f"config: algorithm.omega = {kind!r}: unknown structure; allowed: {', '.join(OMEGA_KINDS)}"
    )
