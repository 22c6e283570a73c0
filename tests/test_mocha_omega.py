"""Closed-form checks of the Omega-step and of the fixed task structures."""

from __future__ import annotations

import numpy as np
import pytest

from fedmtl.errors import ConfigError
from fedmtl.mocha.omega import (
    EIG_FLOOR,
    clustered,
    identity,
    initial_structure,
    learned_init,
    mean_regularised,
    omega_step,
    quad,
    sigma_prime,
)


def test_omega_step_on_orthogonal_tasks():
    # w_1 = (1, 0), w_2 = (0, 2): A = W^T W = diag(1, 4), A^(1/2) = diag(1, 2), trace 3.
    s = omega_step(np.array([[1.0, 0.0], [0.0, 2.0]]))
    np.testing.assert_allclose(s.sigma, np.diag([1 / 3, 2 / 3]), atol=1e-12)
    np.testing.assert_allclose(s.omega, np.diag([3.0, 1.5]), atol=1e-12)
    assert s.sigma_p == pytest.approx(1.0)


def test_omega_step_on_correlated_tasks():
    # A = [[2, 1], [1, 2]] has eigenpairs 3 on (1,1)/sqrt2 and 1 on (1,-1)/sqrt2.
    W = np.linalg.cholesky(np.array([[2.0, 1.0], [1.0, 2.0]]))  # rows w_t with <w_s, w_t> = A_st
    s = omega_step(W)
    r3 = np.sqrt(3.0)
    root = np.array([[r3 + 1, r3 - 1], [r3 - 1, r3 + 1]]) / 2
    np.testing.assert_allclose(s.sigma, root / (r3 + 1), atol=1e-12)
    np.testing.assert_allclose(s.sigma @ s.omega, np.eye(2), atol=1e-12)
    assert s.sigma_p == pytest.approx(1 + (r3 - 1) / (r3 + 1))  # = 3 - sqrt(3)
    assert np.trace(s.sigma) == pytest.approx(1.0)


def test_omega_step_minimises_the_regulariser_over_the_trace_constraint():
    """Sigma* = argmin tr(Sigma^-1 A) s.t. tr Sigma = 1, with minimum (tr A^(1/2))^2."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((5, 8))
    s = omega_step(W)
    best = quad(s.omega, W)
    evals = np.linalg.eigvalsh(W @ W.T)
    assert best == pytest.approx(np.sqrt(evals).sum() ** 2, rel=1e-9)
    for _ in range(20):
        M = rng.standard_normal((5, 5))
        sig = M @ M.T + 0.1 * np.eye(5)
        sig /= np.trace(sig)
        assert quad(np.linalg.inv(sig), W) >= best - 1e-9


def test_rank_deficient_gram_is_clipped_always():
    """Q4: d < m makes W^T W singular; eigenvalues are clipped at 1e-7, so Omega stays finite."""
    W = np.random.default_rng(1).standard_normal((6, 2))  # m = 6 tasks, d = 2 features
    s = omega_step(W)
    assert np.all(np.isfinite(s.omega)) and np.trace(s.sigma) == pytest.approx(1.0)
    assert np.linalg.eigvalsh(s.sigma).min() > 0
    np.testing.assert_allclose(s.sigma @ s.omega, np.eye(6), atol=1e-6)
    roots = np.sqrt(np.maximum(np.linalg.eigvalsh(W @ W.T), EIG_FLOOR))
    assert np.linalg.eigvalsh(s.omega).max() == pytest.approx(roots.sum() / roots.min(), rel=1e-6)
    assert s.sigma_p > 1.0
    z = omega_step(np.zeros((4, 3)))  # W = 0 (first Omega-step of a dead run): back to I/m
    np.testing.assert_allclose(z.sigma, np.eye(4) / 4, atol=1e-12)


def test_fixed_structures_are_inverse_pairs_with_the_documented_penalty():
    m = 5
    for s in (identity(m), learned_init(m), mean_regularised(m, 2.0), clustered([0, 0, 1, 1, 1], 3.0)):
        np.testing.assert_allclose(s.sigma @ s.omega, np.eye(m), atol=1e-12)
        assert s.sigma_p == pytest.approx(sigma_prime(s.sigma))
    W = np.random.default_rng(2).standard_normal((m, 3))
    mean = W.mean(axis=0)
    penalty = (W**2).sum() + 2.0 * ((W - mean) ** 2).sum()
    assert quad(mean_regularised(m, 2.0).omega, W) == pytest.approx(penalty)
    labels = np.array([0, 0, 1, 1, 1])
    cm = np.stack([W[labels == c].mean(axis=0) for c in labels])
    assert quad(clustered(labels, 3.0).omega, W) == pytest.approx((W**2).sum() + 3.0 * ((W - cm) ** 2).sum())
    assert learned_init(m).sigma_p == 1.0 and identity(m).sigma_p == 1.0


def test_structure_errors_name_the_key():
    with pytest.raises(ConfigError, match="algorithm.clusters"):
        initial_structure("clusters", 4, 1.0, [0, 1])
    with pytest.raises(ConfigError, match="algorithm.omega = 'graph'"):
        initial_structure("graph", 4)
