"""The prediction-error protocol: repeated 75/25 splits per task, lambda by 5-fold CV, per model.

For each split: Global, Local and MTL (MOCHA) each pick lambda by cross-validation on the training
part only, are refit on the whole training part with it, and are scored on the test part. Results
are the mean and standard error over splits. Quirks Q1 (CV reads the last fold only), Q2 (MTL
error read before the last W-phase), Q3 (W not recomputed after Omega-steps) and Q7 (split sizes)
are fixed by default and reproduced with ``Quirks.reference()``.

Regression (School): features are standardised with the fitting part's statistics (constant
columns, e.g. School's bias column of ones, are left alone) and targets are standardised the same
way; RMSE is reported in the original units.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fedmtl.mocha.baselines import SolveOptions, fit_global, fit_local
from fedmtl.mocha.data import DATASETS, Tasks
from fedmtl.mocha.engine import MochaOptions, Quirks, run_mocha
from fedmtl.mocha.objectives import classification_error, regression_scores
from fedmtl.mocha.solver import get_loss

LAMBDAS = (1e-5, 1e-4, 1e-3, 1e-2, 0.1, 10.0)  # the reference grid (1 is missing there, kept as is)
METHODS = ("global", "local", "mtl")
RNG_SPLIT, RNG_FOLD = 71, 72


@dataclass(frozen=True)
class ProtocolOptions:
    splits: int = 10
    train_frac: float = 0.75
    folds: int = 5
    lambdas: tuple[float, ...] = LAMBDAS
    outer: int = 10
    inner: int = 100
    sdca_frac: float = 0.5
    seed: int = 0
    quirks: Quirks = Quirks()
    solve: SolveOptions = SolveOptions()
    jobs: int = 1


# ------------------------------------------------------------------------------ splits and folds


def n_train(n: int, frac: float, quirks: Quirks) -> int:
    """Training points of a task with n points: round(frac n), or MATLAB's randperm(n) < frac n (Q7)."""
    if quirks.split_ceil_minus_one:
        return max(math.ceil(frac * n) - 1, 0)
    return min(max(math.floor(frac * n + 0.5), 1), n - 1) if n > 1 else n


def split_rows(
    sizes: Sequence[int], frac: float, rng: np.random.Generator, quirks: Quirks
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Random per-task train/test rows (each sorted, as MATLAB's logical indexing keeps file order)."""
    train, test = [], []
    for n in sizes:
        perm = rng.permutation(int(n))
        k = n_train(int(n), frac, quirks)
        train.append(np.sort(perm[:k]))
        test.append(np.sort(perm[k:]))
    return train, test


def fold_rows(
    sizes: Sequence[int], folds: int, rng: np.random.Generator, quirks: Quirks
) -> list[tuple[list[np.ndarray], list[np.ndarray]]]:
    """(fit rows, validation rows) per fold. Fixed: random folds, all used. Q1: only the last strided fold."""
    out = []
    chosen = [folds - 1] if quirks.last_fold_cv else range(folds)
    perms = [rng.permutation(int(n)) for n in sizes]
    for f in chosen:
        fit, val = [], []
        for n, perm in zip(sizes, perms, strict=True):
            idx = np.arange(int(n)) if quirks.last_fold_cv else perm
            v = np.sort(idx[f::folds])
            val.append(v)
            fit.append(np.setdiff1d(np.arange(int(n)), v))
        out.append((fit, val))
    return out


# ------------------------------------------------------------------------------ scoring


@dataclass
class Prepared:
    fit: Tasks
    test: Tasks
    scale: float = 1.0


def prepare(fit: Tasks, test: Tasks, kind: str) -> Prepared:
    """Standardise regression data with the fitting part's statistics; classification stays raw."""
    if kind != "regression":
        return Prepared(fit, test)
    mean, std = fit.X.mean(axis=0), fit.X.std(axis=0)
    const = std == 0
    mean[const], std[const] = 0.0, 1.0
    ym, ys = float(fit.y.mean()), float(fit.y.std()) or 1.0
    return Prepared(
        fit.with_features((fit.X - mean) / std).with_targets((fit.y - ym) / ys),
        test.with_features((test.X - mean) / std).with_targets((test.y - ym) / ys),
        ys,
    )


def scores(kind: str, test: Tasks, W: np.ndarray, scale: float) -> dict[str, float]:
    """Test metrics of one model: error in %, or RMSE (original units) and explained variance."""
    if kind == "regression":
        return regression_scores(test, W, scale)
    return {"error": 100.0 * classification_error(test, W)}


PRIMARY = {"classification": "error", "regression": "rmse"}  # the CV criterion, lower is better


def test_scores(
    method: str, fit: Tasks, test: Tasks, lam: float, kind: str, opts: ProtocolOptions, seed: int
) -> dict[str, float]:
    """Train ``method`` on ``fit`` with ``lam`` and score it on ``test``.

    For MTL the scores are taken at every W-phase boundary by MOCHA's ``evaluate`` hook, and Q2
    decides which one counts (after the last W-phase, or before it as the reference does)."""
    data = prepare(fit, test, kind)
    loss = get_loss("squared" if kind == "regression" else "hinge")
    if method == "global":
        return scores(kind, data.test, fit_global(data.fit, lam, loss, opts.solve), data.scale)
    if method == "local":
        return scores(kind, data.test, fit_local(data.fit, lam, loss, opts.solve), data.scale)
    captured: list[dict[str, float]] = []

    def evaluate(W: np.ndarray) -> float:
        captured.append(scores(kind, data.test, W, data.scale))
        return captured[-1][PRIMARY[kind]]

    mopts = MochaOptions(
        lam=lam,
        loss=loss.name,
        outer=opts.outer,
        inner=opts.inner,
        sdca_frac=opts.sdca_frac,
        seed=seed,
        quirks=opts.quirks,
        record="none",
    )
    run_mocha(data.fit, mopts, evaluate=evaluate)
    return captured[opts.outer - 1] if opts.quirks.eval_before_last_phase else captured[-1]


def select_lambda(
    method: str, train: Tasks, kind: str, opts: ProtocolOptions, rng: np.random.Generator, seed: int
) -> tuple[float, list[float]]:
    """Lambda with the lowest mean validation metric (ties: the smallest lambda) and the CV curve."""
    folds = fold_rows(train.sizes, opts.folds, rng, opts.quirks)
    curve = []
    for lam in opts.lambdas:
        vals = [
            test_scores(method, train.take(f), train.take(v), lam, kind, opts, seed)[PRIMARY[kind]]
            for f, v in folds
        ]
        curve.append(float(np.mean(vals)))
    return float(opts.lambdas[int(np.argmin(curve))]), curve


# ------------------------------------------------------------------------------ protocol


@dataclass
class SplitResult:
    split: int
    lam: dict[str, float]
    test: dict[str, dict[str, float]]
    cv: dict[str, list[float]]
    n_train: int
    n_test: int


def run_split(tasks: Tasks, kind: str, split: int, opts: ProtocolOptions) -> SplitResult:
    """One random split: CV per method, refit, test metrics (error % or RMSE / explained variance)."""
    rng = np.random.default_rng([opts.seed, RNG_SPLIT, split])
    tr_rows, te_rows = split_rows(tasks.sizes, opts.train_frac, rng, opts.quirks)
    train, test = tasks.take(tr_rows), tasks.take(te_rows)
    seed = opts.seed * 1000 + split
    lam, cv, out = {}, {}, {}
    for method in METHODS:
        fold_rng = np.random.default_rng([opts.seed, RNG_FOLD, split])  # same folds for every method
        lam[method], cv[method] = select_lambda(method, train, kind, opts, fold_rng, seed)
        out[method] = test_scores(method, train, test, lam[method], kind, opts, seed)
    return SplitResult(split, lam, out, cv, train.N, test.N)


@dataclass
class ProtocolResult:
    dataset: str
    kind: str
    options: ProtocolOptions
    splits: list[SplitResult] = field(default_factory=list)

    def summary(self) -> dict[str, dict[str, tuple[float, float]]]:
        """method -> metric -> (mean, standard error over splits)."""
        out: dict[str, dict[str, tuple[float, float]]] = {}
        for method in METHODS:
            metrics = self.splits[0].test[method].keys()
            out[method] = {}
            for key in metrics:
                vals = np.array([s.test[method][key] for s in self.splits])
                se = float(vals.std(ddof=1) / np.sqrt(len(vals))) if len(vals) > 1 else float("nan")
                out[method][key] = (float(vals.mean()), se)
        return out

    def lambdas(self) -> dict[str, list[float]]:
        return {m: [s.lam[m] for s in self.splits] for m in METHODS}


def _split_job(args: tuple[Tasks, str, int, ProtocolOptions]) -> SplitResult:
    return run_split(*args)


def run_protocol(tasks: Tasks, dataset: str, opts: ProtocolOptions = ProtocolOptions()) -> ProtocolResult:
    """All splits of one dataset, in ``opts.jobs`` processes (each split is independent)."""
    kind = DATASETS.get(dataset, "classification")
    jobs = [(tasks, kind, s, opts) for s in range(opts.splits)]
    workers = max(1, min(opts.jobs, opts.splits, os.cpu_count() or 1))
    if workers == 1:
        results = [_split_job(j) for j in jobs]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_split_job, jobs))
    return ProtocolResult(dataset, kind, opts, sorted(results, key=lambda r: r.split))


def with_quirks(opts: ProtocolOptions, reference_compat: bool) -> ProtocolOptions:
    return replace(opts, quirks=Quirks.from_flag(reference_compat))


def describe(opts: ProtocolOptions) -> dict[str, Any]:
    return {
        "splits": opts.splits,
        "train_frac": opts.train_frac,
        "folds": opts.folds,
        "lambdas": list(opts.lambdas),
        "outer": opts.outer,
        "inner": opts.inner,
        "sdca_frac": opts.sdca_frac,
        "quirks": opts.quirks.mode,
        "seed": opts.seed,
    }
