"""The direct MOCHA engine: all tasks in one process, one compiled kernel call per round.

This is the fast path behind the benchmarks and the reproduction table (the fedmtl Algorithm in
``fedmtl.algorithms.mocha`` runs the same kernel one client at a time through a runtime). One
driver alternates W-phases and Omega-steps for MOCHA and for the baselines (CoCoA, Mb-SDCA,
Mb-SGD); a method only says what one communication round does.

Randomness: round r draws from ``default_rng([seed, STREAM, r])``: first the work fractions, then
the drop coins, then the uniforms that drive the per-task permutations, so a seed fixes a run.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Literal

import numpy as np

from fedmtl.errors import ConfigError
from fedmtl.mocha.data import Tasks
from fedmtl.mocha.objectives import primal_dual
from fedmtl.mocha.omega import Structure, initial_structure
from fedmtl.mocha.server import DEFAULT_LAMBDA, apply_update, relearn_omega
from fedmtl.mocha.solver import Loss, get_loss, local_sdca

STREAM = 61  # purpose key of the per-round random streams


@dataclass(frozen=True)
class Systems:
    """Systems heterogeneity: per-round per-node work fraction range, drop probability, dead nodes."""

    work: tuple[float, float] = (1.0, 1.0)
    drop_prob: float | tuple[float, ...] = 0.0
    always_drop: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        lo, hi = self.work
        if not 0 < lo <= hi <= 1:
            raise ConfigError(
                f"mocha: systems.work = {self.work!r}: must be [low, high] with 0 < low <= high <= 1"
            )
        p = np.asarray(self.drop_prob, dtype=np.float64)
        if np.any((p < 0) | (p > 1)):
            raise ConfigError(f"mocha: systems.drop_prob = {self.drop_prob!r}: must lie in [0, 1]")

    @property
    def top(self) -> float:
        """The largest work fraction: the per-round time budget in the time model."""
        return self.work[1]

    def draw(self, rng: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray]:
        """(work fraction, dropped) per node for one round; always drawn, so streams stay aligned."""
        lo, hi = self.work
        frac = lo + (hi - lo) * rng.random(m)
        dropped = rng.random(m) < np.asarray(self.drop_prob, dtype=np.float64)
        if self.always_drop:
            dropped[list(self.always_drop)] = True
        return frac, dropped


@dataclass(frozen=True)
class Quirks:
    """Behaviours of the reference MATLAB code (spec section 3); all off = fixed (the default).

    ``Quirks.reference()`` turns them all on (``reference_compat``). Q4 (always clip the Gram
    eigenvalues), Q8 (floor K, skip zero rows) and Q9 (seed everything) hold in both modes."""

    last_fold_cv: bool = False  # Q1: lambda chosen from the last CV fold only
    eval_before_last_phase: bool = False  # Q2: MTL error read before the final W-phase
    keep_w_after_omega: bool = False  # Q3: W not recomputed from alpha after an Omega-step
    baseline_frac_from_mocha: bool = False  # Q5: Mb-SDCA/Mb-SGD batch size from MOCHA's sdca_frac
    sgd_reference_step: bool = False  # Q6: Mb-SGD Omega term without lambda, data step without 1/h
    split_ceil_minus_one: bool = False  # Q7: ceil(0.75 n) - 1 training points per task
    reseed_each_inner_round: bool = False  # rng(hh*1000): every outer iteration reuses permutations

    @classmethod
    def reference(cls) -> Quirks:
        return cls(**{f.name: True for f in fields(cls)})

    @classmethod
    def from_flag(cls, reference_compat: bool) -> Quirks:
        return cls.reference() if reference_compat else cls()

    @property
    def mode(self) -> str:
        on = [f.name for f in fields(self) if getattr(self, f.name)]
        if not on:
            return "fixed"
        if len(on) == len(fields(self)):
            return "reference_compat"
        return "custom(" + ",".join(on) + ")"


@dataclass(frozen=True)
class MochaOptions:
    """One run of the alternating method; defaults are the reference error-table protocol."""

    lam: float = DEFAULT_LAMBDA
    loss: str = "hinge"
    gamma: float = 1.0
    omega: str = "learned"
    omega_weight: float = 1.0
    clusters: tuple[int, ...] | None = None
    outer: int = 10
    inner: int = 100
    sdca_frac: float = 0.5
    systems: Systems = Systems()
    seed: int = 0
    quirks: Quirks = Quirks()
    record: Literal["round", "outer", "none"] = "outer"
    stale_after: int = 20

    def __post_init__(self) -> None:
        if not self.lam > 0:
            raise ConfigError(f"mocha: lam = {self.lam!r}: must be > 0")
        if self.outer < 1 or self.inner < 1:
            raise ConfigError(f"mocha: outer/inner = {self.outer}/{self.inner}: must be >= 1")
        if not self.sdca_frac > 0:
            raise ConfigError(f"mocha: sdca_frac = {self.sdca_frac!r}: must be > 0")

    def with_(self, **changes: object) -> MochaOptions:
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass
class State:
    """Server and node variables of the alternating method (W rows are tasks)."""

    W: np.ndarray
    B: np.ndarray
    alpha: np.ndarray
    struct: Structure
    lam: float

    def apply(self, dB: np.ndarray) -> None:
        """Server step (``fedmtl.mocha.server.apply_update``)."""
        self.W, self.B = apply_update(self.W, self.B, self.struct.sigma, dB, self.lam)


@dataclass
class RoundContext:
    round: int  # global round number, from 1
    inner: int  # round within the current W-phase, from 1
    rng: np.random.Generator
    frac: np.ndarray
    dropped: np.ndarray


@dataclass
class History:
    """Objectives at recorded rounds, and what every node did in every round."""

    rounds: list[int] = field(default_factory=list)
    primal: list[float] = field(default_factory=list)
    dual: list[float] = field(default_factory=list)
    steps: list[np.ndarray] = field(default_factory=list)
    frac: list[np.ndarray] = field(default_factory=list)
    dropped: list[np.ndarray] = field(default_factory=list)
    omega_rounds: list[int] = field(default_factory=list)

    def as_arrays(self) -> dict[str, np.ndarray]:
        primal, dual = np.asarray(self.primal), np.asarray(self.dual)
        return {
            "rounds": np.asarray(self.rounds, dtype=np.int64),
            "primal": primal,
            "dual": dual,
            "gap": primal - dual,
            "steps": np.asarray(self.steps, dtype=np.int64),
            "frac": np.asarray(self.frac),
            "dropped": np.asarray(self.dropped, dtype=bool),
        }


@dataclass
class RunResult:
    W: np.ndarray
    alpha: np.ndarray | None
    struct: Structure
    history: History
    evals: list[tuple[int, float]]
    stale: list[int]
    metric: float | None
    rounds: int


RoundStep = Callable[[State, RoundContext], np.ndarray]


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """The matrices here are tiny (m x m); threaded BLAS only adds contention, worst on 2 cores."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings threadpoolctl
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def work_steps(frac: np.ndarray, scale: float, sizes: np.ndarray, dropped: np.ndarray) -> np.ndarray:
    """K_t = floor(frac_t * scale * n_t) (quirk Q8: floored), 0 for dropped nodes."""
    k = np.floor(frac * scale * sizes + 1e-9).astype(np.int64)
    k[dropped] = 0
    return k


def alternate(
    train: Tasks,
    opts: MochaOptions,
    step: RoundStep,
    *,
    has_dual: bool = True,
    evaluate: Callable[[np.ndarray], float] | None = None,
) -> RunResult:
    """Alternate W-phases of ``opts.inner`` rounds with Omega-steps, ``opts.outer`` times.

    With the fix for Q2 (default) the last W-phase is not followed by an Omega-step, so the final
    model is the W of the final W-phase; ``evaluate`` is called at the start of every W-phase and
    at the end, and ``metric`` is the end value (or, under Q2, the start of the last phase)."""
    with single_threaded_blas():
        return _alternate(train, opts, step, has_dual, evaluate)


def _alternate(
    train: Tasks,
    opts: MochaOptions,
    step: RoundStep,
    has_dual: bool,
    evaluate: Callable[[np.ndarray], float] | None,
) -> RunResult:
    loss = get_loss(opts.loss, opts.gamma)
    m, d = train.m, train.d
    q = opts.quirks
    learned = opts.omega == "learned"
    state = State(
        W=np.zeros((m, d)),
        B=np.zeros((m, d)),
        alpha=np.zeros(train.N),
        struct=initial_structure(opts.omega, m, opts.omega_weight, opts.clusters),
        lam=opts.lam,
    )
    hist = History()
    evals: list[tuple[int, float]] = []
    last_seen = np.zeros(m, dtype=np.int64)
    r = 0

    def record() -> None:
        obj = primal_dual(
            train,
            state.W,
            state.alpha if has_dual else None,
            state.B,
            state.struct.sigma,
            state.struct.omega,
            opts.lam,
            loss,
        )
        hist.rounds.append(r)
        hist.primal.append(obj.primal)
        hist.dual.append(obj.dual)

    for h in range(opts.outer):
        if evaluate is not None:
            evals.append((r, evaluate(state.W)))
        if opts.record == "outer":
            record()
        for hh in range(1, opts.inner + 1):
            if opts.record == "round":
                record()
            r += 1
            rng = np.random.default_rng([opts.seed, STREAM, hh if q.reseed_each_inner_round else r])
            frac, dropped = opts.systems.draw(rng, m)
            steps = step(state, RoundContext(r, hh, rng, frac, dropped))
            last_seen[~dropped] = r
            hist.steps.append(steps)
            hist.frac.append(frac)
            hist.dropped.append(dropped)
        if learned and (h < opts.outer - 1 or q.eval_before_last_phase):
            keep_w = not has_dual or q.keep_w_after_omega
            state.struct, state.W = relearn_omega(state.W, state.B, opts.lam, keep_w)
            hist.omega_rounds.append(r)
    if evaluate is not None:
        evals.append((r, evaluate(state.W)))
    if opts.record != "none":
        record()
    stale = (
        [int(t) for t in np.flatnonzero(r - last_seen >= opts.stale_after)] if r >= opts.stale_after else []
    )
    if stale:
        warnings.warn(
            f"mocha: node(s) {stale} sent nothing in the last {opts.stale_after} or more rounds; "
            "the method cannot converge while a node never reports",
            RuntimeWarning,
            stacklevel=2,
        )
    metric = None
    if evals:
        metric = evals[opts.outer - 1][1] if q.eval_before_last_phase else evals[-1][1]
    return RunResult(
        W=state.W,
        alpha=state.alpha if has_dual else None,
        struct=state.struct,
        history=hist,
        evals=evals,
        stale=stale,
        metric=metric,
        rounds=r,
    )


def mocha_step(train: Tasks, opts: MochaOptions, loss: Loss) -> RoundStep:
    """One MOCHA round: every live node runs floor(frac_t * sdca_frac * n_t) SDCA steps, sends db_t."""

    def step(state: State, ctx: RoundContext) -> np.ndarray:
        k = work_steps(ctx.frac, opts.sdca_frac, train.sizes, ctx.dropped)
        u = ctx.rng.random(train.N)
        s = state.struct
        dB = local_sdca(
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
            k,
            loss.code,
            loss.gamma,
            1.0,
        )
        state.apply(dB)
        return k

    return step


def run_mocha(
    train: Tasks, opts: MochaOptions, evaluate: Callable[[np.ndarray], float] | None = None
) -> RunResult:
    """MOCHA on stacked tasks (see ``MochaOptions``); the reference protocol by default."""
    loss = get_loss(opts.loss, opts.gamma)
    return alternate(train, opts, mocha_step(train, opts, loss), evaluate=evaluate)
