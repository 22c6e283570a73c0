"""MOCHA's math on real data: weak duality, gap to zero, Omega = I equals Local, dropped nodes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from fedmtl.mocha import _jit
from fedmtl.mocha.baselines import (
    CocoaOptions,
    MinibatchOptions,
    SolveOptions,
    fit_global,
    fit_local,
    run_cocoa,
    run_mbsdca,
    run_mbsgd,
)
from fedmtl.mocha.data import Tasks, load_tasks
from fedmtl.mocha.engine import MochaOptions, Quirks, Systems, run_mocha
from fedmtl.mocha.objectives import b_matrix, classification_error, primal_dual
from fedmtl.mocha.solver import coordinate_step, dual_value, get_loss, local_sdca, task_terms


@pytest.fixture(scope="module")
def toy(shared_data_dir) -> Tasks:
    return load_tasks("landmine_small", shared_data_dir)


@pytest.fixture(scope="module")
def shared_data_dir():
    from fedmtl.data import resolve_data_dir

    path = resolve_data_dir(None)
    if path is None:
        pytest.skip("../shared/data not present")
    return path


def _regression_tasks(m: int = 4, d: int = 5, seed: int = 0) -> Tasks:
    """Related linear tasks: w_t = w_shared + small task noise."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal(d)
    xs, ys = [], []
    for t in range(m):
        n = 30 + 7 * t
        X = rng.standard_normal((n, d))
        xs.append(X)
        ys.append(X @ (shared + 0.3 * rng.standard_normal(d)) + 0.1 * rng.standard_normal(n))
    return Tasks.from_lists(xs, ys)


@pytest.mark.parametrize("name", ["hinge", "smooth_hinge", "squared"])
def test_coordinate_step_maximises_the_one_coordinate_dual(name):
    loss = get_loss(name, gamma=0.7)
    rng = np.random.default_rng(1)
    for _ in range(50):
        y = float(rng.choice([-1.0, 1.0])) if loss.kind == "classification" else float(rng.normal())
        a = y * float(rng.uniform(0, 1)) if loss.kind == "classification" else float(rng.normal())
        z, curv = float(rng.normal(scale=2)), float(rng.uniform(0.05, 5))

        def obj(new: np.ndarray, a: float = a, y: float = y, z: float = z, curv: float = curv) -> np.ndarray:
            d = new - a
            return (
                np.array([dual_value(loss.code, v, y, loss.gamma) for v in new]) - z * d - 0.5 * curv * d**2
            )

        best = coordinate_step(loss.code, y, a, z, curv, loss.gamma)
        grid = (
            y * np.linspace(0, 1, 2001)
            if loss.kind == "classification"
            else np.linspace(a - 10, a + 10, 4001)
        )
        if loss.kind == "classification":
            assert 0 <= y * best <= 1
        assert obj(np.array([best]))[0] >= obj(grid).max() - 1e-9


@pytest.mark.skipif(not _jit.HAVE_NUMBA, reason="without numba both paths are the same code")
def test_compiled_and_interpreted_kernels_agree():
    tasks = _regression_tasks()
    tasks = tasks.with_targets(np.sign(tasks.y) + (tasks.y == 0))
    m = tasks.m
    W = np.random.default_rng(2).normal(size=(m, tasks.d)) * 0.1
    u = np.random.default_rng(3).random(tasks.N)
    steps = np.array([5, 40, 0, 100], dtype=np.int64)
    args = (tasks.X, tasks.y, tasks.sqnorm, tasks.offsets)
    tail = (W, np.full(m, 1 / m), 1.3, 1e-2, u, steps, 0, 0.0, 1.0)
    a1, a2 = np.zeros(tasks.N), np.zeros(tasks.N)
    dB1 = local_sdca(*args, a1, *tail)
    dB2 = _jit.interpreted(local_sdca)(*args, a2, *tail)
    np.testing.assert_allclose(dB1, dB2, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(a1, a2, rtol=1e-12, atol=1e-14)
    assert np.all(dB1[2] == 0) and np.all(a1[tasks.offsets[2] : tasks.offsets[3]] == 0)


def test_dual_never_exceeds_primal_with_learned_omega_stragglers_and_drops(toy):
    opts = MochaOptions(
        lam=1e-3, outer=4, inner=25, record="round", systems=Systems(work=(0.1, 1.0), drop_prob=0.3)
    )
    h = run_mocha(toy, opts).history.as_arrays()
    assert len(h["primal"]) == 101
    assert np.all(h["dual"] <= h["primal"] + 1e-10)
    assert h["gap"][-1] < 0.5 * h["gap"][0]
    reg = _regression_tasks()
    hr = run_mocha(reg, MochaOptions(lam=1e-2, loss="squared", outer=3, inner=20, record="round")).history
    assert np.all(np.asarray(hr.dual) <= np.asarray(hr.primal) + 1e-10)


@pytest.mark.parametrize("loss,factor", [("smooth_hinge", 1e-6), ("hinge", 2e-3)])
def test_gap_shrinks_to_zero_and_dual_only_rises_for_fixed_omega(toy, loss, factor):
    """Fixed Omega couples the tasks (mean-regularised); sigma' makes adding all updates safe."""
    opts = MochaOptions(
        lam=1e-2, loss=loss, omega="mean", omega_weight=2.0, outer=1, inner=300, sdca_frac=1.0, record="round"
    )
    res = run_mocha(toy, opts)
    h = res.history.as_arrays()
    assert res.struct.sigma_p > 1.5  # the tasks really are coupled
    assert h["gap"][-1] <= factor * h["gap"][0]
    assert np.all(np.diff(h["dual"]) >= -1e-12)  # safe aggregation: every round is a dual ascent step
    # the server's W is exactly the primal point of the nodes' alphas
    B = b_matrix(toy, res.alpha)
    np.testing.assert_allclose(res.W, res.struct.sigma @ B / opts.lam, rtol=1e-9, atol=1e-9)


def test_identity_omega_solves_local_exactly(toy):
    tight = SolveOptions(max_epochs=20000, tol=1e-12)
    for loss, tol in (("smooth_hinge", 1e-5), ("hinge", 1e-2)):
        W_local = fit_local(toy, 1e-2, get_loss(loss), tight)
        res = run_mocha(
            toy, MochaOptions(lam=1e-2, loss=loss, omega="identity", outer=1, inner=1000, sdca_frac=1.0)
        )
        assert np.abs(res.W - W_local).max() < tol
    reg = _regression_tasks()
    W_ridge = fit_local(reg, 1e-2, get_loss("squared"))
    res = run_mocha(
        reg, MochaOptions(lam=1e-2, loss="squared", omega="identity", outer=1, inner=1000, sdca_frac=1.0)
    )
    np.testing.assert_allclose(res.W, W_ridge, atol=1e-8)


def test_dropped_nodes_keep_their_variables_and_a_dead_node_is_reported(toy):
    W = np.zeros((toy.m, toy.d))
    alpha = np.zeros(toy.N)
    steps = (toy.sizes // 2).astype(np.int64)
    steps[[3, 7]] = 0  # dropped this round
    u = np.random.default_rng(0).random(toy.N)
    dB = local_sdca(
        toy.X,
        toy.y,
        toy.sqnorm,
        toy.offsets,
        alpha,
        W,
        np.full(toy.m, 1 / toy.m),
        1.0,
        1e-3,
        u,
        steps,
        0,
        0.0,
        1.0,
    )
    for t in (3, 7):
        assert np.all(alpha[toy.offsets[t] : toy.offsets[t + 1]] == 0) and np.all(dB[t] == 0)
    assert np.count_nonzero(alpha) > 0

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = run_mocha(toy, MochaOptions(lam=1e-3, outer=2, inner=30, systems=Systems(always_drop=(5,))))
    assert res.stale == [5]
    assert any("[5]" in str(w.message) and "never reports" in str(w.message) for w in caught)
    assert np.all(res.alpha[toy.offsets[5] : toy.offsets[6]] == 0)
    drops = np.asarray(res.history.dropped)
    assert drops[:, 5].all() and not drops[:, 4].any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (
            run_mocha(toy, MochaOptions(lam=1e-3, outer=1, inner=30, systems=Systems(drop_prob=0.2))).stale
            == []
        )


def test_stragglers_do_less_work_and_runs_are_seeded(toy):
    het = MochaOptions(lam=1e-3, outer=1, inner=20, sdca_frac=1.0, systems=Systems(work=(0.1, 1.0)))
    a, b = run_mocha(toy, het), run_mocha(toy, het)
    np.testing.assert_array_equal(a.W, b.W)
    steps, frac = np.asarray(a.history.steps), np.asarray(a.history.frac)
    np.testing.assert_array_equal(steps, np.floor(frac * toy.sizes + 1e-9).astype(int))
    assert steps.min() < 0.2 * toy.sizes.max() and not np.array_equal(
        run_mocha(toy, het.with_(seed=1)).W, a.W
    )


def test_reference_quirks_change_what_is_reported(toy):
    """Q2 reads the error before the last W-phase; Q3 keeps W after Omega-steps (then W != W(alpha))."""
    base = MochaOptions(lam=1e-3, outer=3, inner=20)
    seen: list[float] = []
    fixed = run_mocha(toy, base, evaluate=lambda W: seen.append(classification_error(toy, W)) or seen[-1])
    assert fixed.metric == seen[-1] and len(seen) == 4
    B = b_matrix(toy, fixed.alpha)
    np.testing.assert_allclose(fixed.W, fixed.struct.sigma @ B / base.lam, atol=1e-9)
    seen.clear()
    compat = run_mocha(
        toy, base.with_(quirks=Quirks.reference()), evaluate=lambda W: seen.append(1.0) or len(seen)
    )
    assert compat.metric == 3  # evaluation at the start of the third (last) outer iteration
    assert not np.allclose(compat.W, compat.struct.sigma @ b_matrix(toy, compat.alpha) / base.lam)
    assert Quirks().mode == "fixed" and Quirks.reference().mode == "reference_compat"


def test_baselines_make_progress_and_keep_their_invariants(toy):
    opts = MochaOptions(lam=1e-3, outer=1, inner=40, record="round")
    p0 = primal_dual(
        toy, np.zeros((toy.m, toy.d)), None, None, np.eye(toy.m), np.eye(toy.m), 1e-3, get_loss("hinge")
    ).primal
    cocoa = run_cocoa(toy, opts, CocoaOptions(theta=0.5))
    steps = np.asarray(cocoa.history.steps)
    assert cocoa.history.primal[-1] < 0.65 * p0 and steps.max() > 2 * steps.min()
    sdca = run_mbsdca(toy, opts, MinibatchOptions(0.5, 100.0))
    h = sdca.history.as_arrays()
    assert h["primal"][-1] < 0.8 * p0 and np.all(h["dual"] <= h["primal"] + 1e-10)
    sgd = run_mbsgd(toy, opts, MinibatchOptions(0.5, 10.0))
    assert sgd.history.primal[-1] < 0.8 * p0 and np.isnan(sgd.history.dual[-1])
    assert np.all(np.linalg.norm(sgd.W, axis=1) <= 1 / np.sqrt(1e-3) + 1e-9)
    ref = run_mbsgd(toy, opts.with_(quirks=Quirks.reference()), MinibatchOptions(0.5, 0.1))
    assert np.isfinite(ref.history.primal[-1])


def test_global_and_local_models_beat_the_zero_model(toy):
    loss = get_loss("hinge")
    assert classification_error(toy, np.zeros((toy.m, toy.d))) == 1.0  # sign(0) counts as an error
    for W in (fit_global(toy, 1e-3, loss), fit_local(toy, 1e-3, loss)):
        assert classification_error(toy, W) < 0.35
    losses, conj = task_terms(toy.X, toy.y, toy.offsets, np.zeros((toy.m, toy.d)), np.zeros(toy.N), 0, 0.0)
    assert np.allclose(losses, 1.0) and np.allclose(conj, 0.0)
