"""MOCHA benchmark: speed, the Global/Local/MTL error table, and convergence figures.

Run with ``fedmtl bench mocha`` (full: several minutes on 2 cores) or ``fedmtl bench mocha --quick``
(a smoke version on the toy file). Writes ``mocha.md`` and ``mocha_*.png`` into ``--out``
(default ``benchmarks/results``). Every number comes from the direct engine in ``fedmtl.mocha``
(the same kernels the fedmtl algorithm runs per client), seeded, so a rerun reproduces it.
"""

# No ``from __future__ import annotations``: ``fedmtl bench`` executes this file without registering
# it in sys.modules, and dataclasses cannot resolve string annotations of such a module.
import argparse
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from _provenance import stamp  # benchmarks/ is on sys.path under fedmtl bench
from fedmtl.mocha import _jit
from fedmtl.mocha.baselines import CocoaOptions, MinibatchOptions, run_cocoa, run_mbsdca, run_mbsgd
from fedmtl.mocha.data import Tasks, load_tasks
from fedmtl.mocha.engine import MochaOptions, Quirks, RunResult, Systems, run_mocha
from fedmtl.mocha.protocol import LAMBDAS, ProtocolOptions, ProtocolResult, describe, run_protocol
from fedmtl.mocha.solver import sdca_solve
from fedmtl.mocha.timing import COMM, elapsed, round_costs

RESULTS = Path(__file__).resolve().parent / "results"
METHOD_LABEL = {"mocha": "MOCHA", "cocoa": "CoCoA", "mbsdca": "Mb-SDCA", "mbsgd": "Mb-SGD"}


@dataclass(frozen=True)
class Plan:
    """Sizes of every experiment; ``quick`` shrinks them to a smoke test."""

    quick: bool
    splits: int = 10
    folds: int = 5
    lambdas: tuple[float, ...] = LAMBDAS
    outer: int = 10
    inner: int = 100
    table_datasets: tuple[str, ...] = ("landmine", "landmine_small", "vehicle", "school")
    compat_datasets: tuple[str, ...] = ("landmine_small", "landmine")
    stat_dataset: str = "landmine"
    sys_dataset: str = "vehicle"
    fault_dataset: str = "landmine"
    speed_dataset: str = "landmine"
    conv_lam: float = 1e-4
    mocha_rounds: int = 2000
    cocoa_rounds: int = 500
    mb_rounds: int = 5000
    mbsdca_scalings: tuple[float, ...] = (1.0, 10.0, 100.0)
    mbsgd_scalings: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0)
    speed_repeats: int = 3

    @classmethod
    def make(cls, quick: bool) -> "Plan":
        if not quick:
            return cls(quick=False)
        return cls(
            quick=True,
            splits=2,
            folds=2,
            lambdas=(1e-4, 1e-2),
            outer=3,
            inner=20,
            table_datasets=("landmine_small",),
            compat_datasets=("landmine_small",),
            stat_dataset="landmine_small",
            sys_dataset="landmine_small",
            fault_dataset="landmine_small",
            speed_dataset="landmine_small",
            mocha_rounds=120,
            cocoa_rounds=30,
            mb_rounds=150,
            mbsdca_scalings=(100.0,),
            mbsgd_scalings=(10.0,),
            speed_repeats=1,
        )


# ------------------------------------------------------------------------------ speed


def speed(tasks: Tasks, repeats: int) -> dict[str, Any]:
    """The issue's target: reference protocol (10 x 100 rounds, floor(0.5 n_t) steps) on all the data."""
    t0 = time.perf_counter()
    run_mocha(tasks.take([np.arange(min(5, n)) for n in tasks.sizes]), MochaOptions(outer=1, inner=1))
    compile_s = time.perf_counter() - t0
    opts = MochaOptions(lam=1e-4, outer=10, inner=100, sdca_frac=0.5, record="none")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = run_mocha(tasks, opts)
        times.append(time.perf_counter() - t0)
    steps = int(np.asarray(res.history.steps).sum())
    return {
        "samples": tasks.N,
        "tasks": tasks.m,
        "rounds": res.rounds,
        "steps": steps,
        "compile_s": compile_s,
        "best_s": min(times),
        "median_s": statistics.median(times),
        "steps_per_s": steps / min(times),
    }


def runtime_speed() -> dict[str, Any]:
    """The same algorithm through the fedmtl simulator: examples/mocha_landmine.yaml as it is."""
    import tempfile

    import fedmtl

    example = Path(__file__).resolve().parents[1] / "examples" / "mocha_landmine.yaml"
    cfg = fedmtl.load_config(example, ["output.progress=false"])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = fedmtl.run(cfg, out=Path(tmp) / "run")
        wall = time.perf_counter() - t0
    fin = res.summary["final"]
    return {
        "wall_s": wall,
        "rounds": cfg.train.rounds,
        "accuracy": fin["accuracy_mean"],
        "bytes": res.summary["bytes_total"],
    }


# ------------------------------------------------------------------------------ convergence runs


@dataclass
class Curve:
    label: str
    method: str
    rounds: np.ndarray
    primal: np.ndarray
    time: dict[str, np.ndarray]
    note: str = ""


def _curve(method: str, res: RunResult, tasks: Tasks, frac: float, label: str = "", note: str = "") -> Curve:
    """Attach the estimated-time axis (for each network) to a run's primal history."""
    h = res.history.as_arrays()
    rounds = h["rounds"]
    times = {}
    for net in COMM:
        if method == "cocoa":
            costs = round_costs(
                "cocoa",
                res.rounds,
                total_n=tasks.N,
                m=tasks.m,
                network=net,
                steps=h["steps"],
                speeds=h["frac"],
            )
        else:
            costs = round_costs(method, res.rounds, total_n=tasks.N, m=tasks.m, network=net, frac=frac)
        times[net] = elapsed(costs, rounds)
    return Curve(label or METHOD_LABEL[method], method, rounds, h["primal"], times, note)


def _best_of(runs: dict[float, RunResult]) -> tuple[float, RunResult]:
    """The step scaling with the lowest final primal (the reference leaves these to be tuned)."""
    finite = {s: r for s, r in runs.items() if np.isfinite(r.history.primal[-1])}
    best = min(finite, key=lambda s: finite[s].history.primal[-1])
    return best, finite[best]


def wstep_optimum(tasks: Tasks, lam: float) -> float:
    """P* of the W-step with Omega = m I, which decouples into one SVM per task with lambda m.

    Solved by cyclic SDCA to a duality gap of 1e-10 per task (or 20000 epochs), so sub-optimality
    curves do not bottom out at whichever method happened to get lowest."""
    total = 0.0
    for t in range(tasks.m):
        X, y = tasks.task(t)
        w, _, _, _ = sdca_solve(X, y, lam * tasks.m, 0, 0.0, 20000, 1e-10)
        total += float(np.maximum(0.0, 1.0 - y * (X @ w)).mean() + 0.5 * lam * tasks.m * (w @ w))
    return total


def compare_solvers(
    tasks: Tasks, plan: Plan, systems: Systems, seed: int = 0
) -> tuple[list[Curve], dict[str, Any]]:
    """W-step only (Omega = m I fixed, as optimization_driver with outer = 1): the four solvers."""
    base = MochaOptions(lam=plan.conv_lam, outer=1, record="round", systems=systems, seed=seed)
    info: dict[str, Any] = {}
    mocha = run_mocha(tasks, base.with_(inner=plan.mocha_rounds, sdca_frac=1.0))
    cocoa = run_cocoa(tasks, base.with_(inner=plan.cocoa_rounds), CocoaOptions(theta=0.5))
    sd = {
        s: run_mbsdca(tasks, base.with_(inner=plan.mb_rounds), MinibatchOptions(0.5, s))
        for s in plan.mbsdca_scalings
    }
    sg = {
        s: run_mbsgd(tasks, base.with_(inner=plan.mb_rounds), MinibatchOptions(0.5, s))
        for s in plan.mbsgd_scalings
    }
    info["mbsdca_scaling"], mbsdca = _best_of(sd)
    info["mbsgd_scaling"], mbsgd = _best_of(sg)
    steps = np.asarray(cocoa.history.steps)
    info["cocoa_steps"] = (int(steps.min()), float(steps.mean()), int(steps.max()))
    info["mocha_gap"] = float(mocha.history.primal[-1] - mocha.history.dual[-1])
    info["p_star"] = wstep_optimum(tasks, plan.conv_lam)
    top = systems.top
    curves = [
        _curve("mocha", mocha, tasks, top * 1.0),
        _curve("cocoa", cocoa, tasks, 1.0),
        _curve("mbsdca", mbsdca, tasks, top * 0.5, note=f"scaling {info['mbsdca_scaling']:g}"),
        _curve("mbsgd", mbsgd, tasks, top * 0.5, note=f"scaling {info['mbsgd_scaling']:g}"),
    ]
    return curves, info


def fault_runs(tasks: Tasks, plan: Plan, full: bool) -> tuple[list[Curve], dict[str, Any]]:
    """MOCHA with drop probability 0, 0.1, 0.5, and with one node that drops every round."""
    if full:
        base = MochaOptions(
            lam=plan.conv_lam, outer=plan.outer, inner=plan.inner, sdca_frac=0.5, record="round"
        )
    else:
        base = MochaOptions(
            lam=plan.conv_lam, outer=1, inner=plan.mocha_rounds, sdca_frac=1.0, record="round"
        )
    settings = [
        ("p = 0", Systems()),
        ("p = 0.1", Systems(drop_prob=0.1)),
        ("p = 0.5", Systems(drop_prob=0.5)),
        ("node 0 always drops", Systems(always_drop=(0,))),
    ]
    curves, info = [], {}
    for label, systems in settings:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = run_mocha(tasks, base.with_(systems=systems))
        info[label] = {
            "stale": res.stale,
            "warned": any("sent nothing" in str(w.message) for w in caught),
            "final_primal": float(res.history.primal[-1]),
            "final_gap": float(res.history.primal[-1] - res.history.dual[-1]),
        }
        curves.append(_curve("mocha", res, tasks, base.sdca_frac, label=label))
    return curves, info


# ------------------------------------------------------------------------------ figures


def _suboptimality_panel(ax: Any, curves: list[Curve], net: str | None, title: str, best: float) -> None:
    for c in curves:
        x = c.rounds if net is None else c.time[net]
        y = c.primal - best
        y = np.where(y > 0, y, np.nan)  # the point that defines P* has no log value
        ax.semilogy(x, y, label=c.label + (f" ({c.note})" if c.note else ""), linewidth=1.6)
    ax.set_title(title)
    ax.set_xlabel("rounds" if net is None else "estimated time")
    ax.set_ylabel("primal sub-optimality")
    ax.grid(True, which="both", alpha=0.3)


Panel = tuple[list[Curve], str | None, str, float | None]


def plot_panels(path: Path, panels: list[Panel], suptitle: str) -> None:
    """One row of sub-optimality panels against P* = min(known optimum, lowest primal reached)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (curves, net, title, known) in zip(axes[0], panels, strict=True):
        best = min([float(np.nanmin(c.primal)) for c in curves] + ([known] if known is not None else []))
        _suboptimality_panel(ax, curves, net, title, best)
        if net is not None:  # the slowest method would stretch the axis: show until the others converge
            ends = sorted(float(c.time[net][-1]) for c in curves)
            ax.set_xlim(0, ends[min(1, len(ends) - 1)] * 1.05)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(suptitle)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gap(path: Path, res: RunResult, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = res.history.as_arrays()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10.4, 4.2))
    a.plot(h["rounds"], h["primal"], label="primal P(W)")
    a.plot(h["rounds"], h["dual"], label="dual D(alpha)")
    for r in res.history.omega_rounds:
        a.axvline(r, color="grey", alpha=0.25, linewidth=0.8)
    a.set_ylim(min(0.0, float(np.nanmin(h["dual"]))), float(np.nanmax(h["primal"])) * 1.05)
    a.set_xlabel("round")
    a.legend()
    a.set_title("primal and dual (grey: Omega-steps)")
    b.semilogy(h["rounds"], np.maximum(h["gap"], 1e-10))
    b.set_xlabel("round")
    b.set_title("duality gap")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ report


def _pm(v: tuple[float, float], digits: int = 2) -> str:
    return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"


def _lams(vals: list[float]) -> str:
    counts: dict[float, int] = {}
    for v in vals:
        counts[v] = counts.get(v, 0) + 1
    return ", ".join(f"{k:g}×{n}" for k, n in sorted(counts.items()))


#: Smith et al. 2017 (NeurIPS), Table 1: test error %, mean (standard error) over 10 shuffles, for
#: the two of its four data sets that are available here (Human Activity and Google Glass are not)
PAPER_TABLE1: dict[str, dict[str, tuple[float, float]]] = {
    "landmine": {"global": (27.72, 1.08), "local": (23.43, 0.77), "mtl": (20.09, 1.04)},
    "vehicle": {"global": (13.4, 0.26), "local": (7.81, 0.13), "mtl": (6.59, 0.21)},
}


def _paper(dataset: str) -> str:
    p = PAPER_TABLE1.get(dataset)
    return "—" if p is None else " / ".join(f"{p[m][0]:g} ± {p[m][1]:g}" for m in ("global", "local", "mtl"))


def paper_sentence(results: list[ProtocolResult]) -> str:
    """How our errors relate to the paper's, written from the numbers (fixed-quirk rows)."""
    parts = []
    for res in results:
        if res.dataset not in PAPER_TABLE1 or res.options.quirks.mode != "fixed":
            continue
        s = res.summary()
        diff = ", ".join(
            f"{m} {s[m]['error'][0] - PAPER_TABLE1[res.dataset][m][0]:+.2f}"
            for m in ("global", "local", "mtl")
        )
        order = s["mtl"]["error"][0] < min(s["global"]["error"][0], s["local"]["error"][0])
        parts.append(f"{res.dataset}: ours minus paper {diff} points; MTL best: {'yes' if order else 'no'}")
    if not parts:
        return ""
    return (
        "Paper column: Smith et al. 2017, Table 1 (Global / Local / MTL error %, mean ± standard error over "
        "10 shuffles), quoted for the data sets available here. "
        + "; ".join(parts)
        + ". The paper's claim to test is the ordering (MTL below both baselines), not the absolute values: "
        "Land Mine is the same data (differences come from the split draws and the lambda grid), while "
        "our Vehicle file is only the training part of a public re-split (1,860 samples, log-normal "
        "per-sensor sizes, standardised per sensor), so its absolute errors are not comparable with the "
        "paper's."
    )


def table_section(results: list[ProtocolResult]) -> list[str]:
    lines = [
        "| dataset | quirks | Global | Local | MTL (MOCHA) | MTL best? | train/test points "
        "| lambda chosen (Global; Local; MTL) | paper Table 1 (Global / Local / MTL) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    reg = []
    for res in results:
        if res.kind == "regression":
            reg.append(res)
            continue
        s = res.summary()
        errs = {m: s[m]["error"] for m in ("global", "local", "mtl")}
        best = errs["mtl"][0] < min(errs["global"][0], errs["local"][0])
        lam = res.lambdas()
        sizes = f"{res.splits[0].n_train}/{res.splits[0].n_test}"
        lines.append(
            f"| {res.dataset} | {res.options.quirks.mode} | {_pm(errs['global'])} | {_pm(errs['local'])} | "
            f"{_pm(errs['mtl'])} | {'yes' if best else 'no'} | {sizes} | "
            f"{_lams(lam['global'])}; {_lams(lam['local'])}; {_lams(lam['mtl'])} | {_paper(res.dataset)} |"
        )
    sentence = paper_sentence(results)
    if sentence:
        lines += ["", sentence]
    if reg:
        lines += [
            "",
            "| dataset | quirks | metric | Global | Local | MTL (MOCHA) "
            "| lambda chosen (Global; Local; MTL) |",
            "|---|---|---|---|---|---|---|",
        ]
        for res in reg:
            s = res.summary()
            lam = res.lambdas()
            for key, label, digits in (
                ("rmse", "RMSE (exam score)", 3),
                ("explained_variance", "explained variance", 4),
            ):
                lines.append(
                    f"| {res.dataset} | {res.options.quirks.mode} | {label} "
                    f"| {_pm(s['global'][key], digits)} | "
                    f"{_pm(s['local'][key], digits)} | {_pm(s['mtl'][key], digits)} | "
                    f"{_lams(lam['global'])}; {_lams(lam['local'])}; {_lams(lam['mtl'])} |"
                )
    return lines


def write_report(out: Path, plan: Plan, parts: dict[str, Any]) -> Path:
    sp = parts["speed"]
    speed_data = "the full Land Mine data" if plan.speed_dataset == "landmine" else plan.speed_dataset
    lines = [
        "# MOCHA: reproduction and systems benchmark",
        "",
        f"Generated by `fedmtl bench mocha{' --quick' if plan.quick else ''}` "
        f"({'QUICK smoke version: tiny sizes, not for quoting' if plan.quick else 'full'}). "
        f"Machine: {platform.machine()}, {parts['cpus']} CPU(s), Python {platform.python_version()}, "
        f"numba {'on' if _jit.HAVE_NUMBA else 'OFF (interpreted kernels)'}. "
        f"Total benchmark time: {parts['total_s']:.0f} s.",
        "",
        "Quirk mode of every number is stated next to it: **fixed** (default: Q1 true 5-fold CV, Q2 MTL "
        "evaluated after the final W-phase, Q3 W recomputed from alpha after each Omega-step, Q5/Q6 "
        "baseline fixes, Q7 round(0.75 n) training points) or **reference_compat** (all of the reference "
        "code's quirks reproduced). Q4 (always clip eigenvalues at 1e-7), Q8 and Q9 hold in both modes.",
        "",
        "## Speed",
        "",
        f"Reference protocol on {speed_data} ({sp['tasks']} tasks, {sp['samples']} samples, "
        f"{sp['rounds']} rounds = 10 Omega-updates x 100 rounds, floor(0.5 n_t) SDCA steps per task "
        "per round, "
        f"{sp['steps']:,} SDCA steps in all):",
        "",
        "| | seconds |",
        "|---|---|",
        f"| one run, best of {plan.speed_repeats} | **{sp['best_s']:.2f}** |",
        f"| one run, median | {sp['median_s']:.2f} |",
        f"| first call (numba compile or cache load + tiny run) | {sp['compile_s']:.2f} |",
        "",
        f"Target: under 10 s on 2 cores. Throughput {sp['steps_per_s'] / 1e6:.1f} M SDCA steps/s.",
        "",
        *_runtime_lines(parts.get("runtime")),
        "## Prediction error (Global / Local / MTL)",
        "",
        f"Test error in % (classification; the reference metric: per-task error with sign(0) counted wrong, "
        "unweighted mean over tasks) as mean ± standard error over "
        f"{plan.splits} random 75/25 per-task splits. "
        f"Lambda is chosen separately per model and per split by {plan.folds}-fold CV on the training "
        "part over "
        f"{', '.join(f'{v:g}' for v in plan.lambdas)} (the reference grid; ties go to the smaller lambda). "
        f"MTL = MOCHA with learned Omega, {plan.outer} W-phases x {plan.inner} rounds, sdca_frac 0.5. "
        "Global and Local are linear SVMs (hinge, no bias) solved by cyclic SDCA to duality gap 1e-5 "
        "(max 500 epochs). Land Mine and the toy file use the raw features (as the reference); Vehicle is "
        "z-scored per sensor in the file (training subset only, see data/README).",
        "",
        *table_section(parts["table"]),
        "",
        "School (regression, squared loss): features standardised with each fitting part's statistics "
        "(the constant bias column kept), targets standardised likewise; Global/Local are exact ridge "
        "solutions of the same per-task-averaged objective; RMSE (original exam-score units) is averaged "
        "over tasks as the reference does; explained variance is 1 - SSE/SST pooled over the test points "
        "of all schools.",
        "",
        f"Protocol settings: {describe(parts['protocol_opts'])}",
        "",
        "## Convergence",
        "",
        "Primal sub-optimality P(W) - P* against the reference's estimated time (per round: MOCHA "
        "8·frac·N + comm, Mb-SDCA 6·frac·N + comm, Mb-SGD 4·frac·N + comm, CoCoA 8·m·max steps + comm; "
        "N = all training points; comm 10 WiFi, 100 LTE, 1000 3G). P* is the lowest primal any method "
        "reached (for the W-step the exact optimum is computed per task). W-step only (Omega = m I, "
        "the reference optimisation driver with outer = 1), "
        f"lambda = {plan.conv_lam:g}, MOCHA sdca_frac 1.0, CoCoA theta 0.5, mini-batch fraction 0.5; "
        "the mini-batch step scalings (left to tuning in the reference) are the best of a small grid.",
        "",
        f"**Statistical heterogeneity** ({plan.stat_dataset}, all data): "
        "![statistical](mocha_statistical.png)",
        "",
        f"With this time model a round's compute (8·frac·N = {8 * parts['stat_n']:,.0f} for MOCHA here) "
        "dwarfs the communication constants (10-1000), so the three panels barely differ; the ordering "
        "of the methods is the finding.",
        "",
        _solver_notes(parts["stat_info"]),
        "",
        f"**Systems heterogeneity** ({plan.sys_dataset}, LTE): each node's work fraction per round is drawn "
        "from U[0.9, 1] (low variability) or U[0.1, 1] (high); MOCHA and the mini-batch methods do that "
        "fraction of their work within a fixed round budget, CoCoA must reach theta and waits for its "
        "slowest node (its time charges steps / fraction). ![systems](mocha_systems.png)",
        "",
        "low: " + _solver_notes(parts["sys_low_info"]),
        "",
        "high: " + _solver_notes(parts["sys_high_info"]),
        "",
        f"**Fault tolerance** ({plan.fault_dataset}): MOCHA when each node drops with probability p "
        "per round "
        "(a dropped node sends nothing; its dual variables stay as they were), and when node 0 drops in "
        "every round. Left: W-step only; right: the full method (Omega re-learned every W-phase, so P moves "
        "at each Omega-step). ![faults](mocha_faults.png)",
        "",
        *_fault_lines(parts["fault_w"], "W-step"),
        *_fault_lines(parts["fault_full"], "full method"),
        "",
        f"**Primal, dual and duality gap** of the full method on {plan.fault_dataset} "
        "(fixed mode: W = W(alpha) "
        "after every Omega-step, so the dual is a true dual and the gap is always >= 0): "
        "![gap](mocha_gap.png)",
        "",
        "## Deviations from the reference code (beyond the quirk list)",
        "",
        "- CoCoA's stopping rule: a node stops when its local Fenchel-Young duality gap is at most theta "
        "times its value at the start of the round (checked every 5 steps, at most 999 steps); the "
        "reference uses an ad-hoc local gap with mixed normalisations.",
        "- Mb-SGD (fixed mode) divides each task's summed subgradient by its own batch size K_t, so the "
        "iteration targets P itself; the reference divides by sum_t K_t. Its step scaling is tuned.",
        "- Under systems heterogeneity CoCoA's time charges each node steps / work fraction (the reference "
        "charges the same time with or without stragglers).",
        "- Permutations come from NumPy generators seeded per (seed, round); MATLAB's streams cannot be "
        "reproduced (Q9), so agreement with the reference is statistical.",
        "",
    ]
    path = out / "mocha.md"
    path.write_text("\n".join(lines))
    return path


def _runtime_lines(rt: dict[str, Any] | None) -> list[str]:
    if rt is None:
        return []
    return [
        f"Through the fedmtl simulator (`fedmtl run examples/mocha_landmine.yaml`: {rt['rounds']} rounds, "
        "one client per mine field, stragglers 50-100 %, 10 % drops, evaluation and checkpoint every "
        f"100 rounds) the run takes {rt['wall_s']:.1f} s, mostly the simulator's per-client bookkeeping; "
        f"final mean client accuracy {rt['accuracy']:.4f}, {rt['bytes']:,} bytes exchanged.",
        "",
    ]


def _solver_notes(info: dict[str, Any]) -> str:
    lo, mean, hi = info["cocoa_steps"]
    return (
        f"MOCHA final duality gap {info['mocha_gap']:.2e}; CoCoA steps per node-round min {lo} / mean "
        f"{mean:.0f} / max {hi}; Mb-SDCA scaling {info['mbsdca_scaling']:g}, "
        f"Mb-SGD scaling {info['mbsgd_scaling']:g}."
    )


def _fault_lines(info: dict[str, Any], label: str) -> list[str]:
    out = [f"- {label}:"]
    for setting, v in info.items():
        flag = f"; **detected**: node(s) {v['stale']} reported as never sending" if v["stale"] else ""
        out.append(f"  - {setting}: final primal {v['final_primal']:.4f}, gap {v['final_gap']:.2e}{flag}")
    return out


# ------------------------------------------------------------------------------ main


def _timed(label: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    out = fn()
    print(f"[mocha bench] {label}: {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def main(argv: list[str]) -> Path:
    started = time.perf_counter()
    ap = argparse.ArgumentParser(prog="fedmtl bench mocha", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny smoke version on the toy file")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for mocha.md and the figures")
    ap.add_argument("--data-dir", default=None, help="data folder (default: FEDMTL_DATA or ../shared/data)")
    ap.add_argument("--jobs", type=int, default=2, help="processes for the repeated splits")
    ap.add_argument("--splits", type=int, default=None, help="override the number of random splits")
    args = ap.parse_args(argv)
    plan = Plan.make(args.quick)
    if args.splits is not None:
        plan = replace(plan, splits=args.splits)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data = {
        name: load_tasks(name, args.data_dir)
        for name in {
            *plan.table_datasets,
            plan.stat_dataset,
            plan.sys_dataset,
            plan.fault_dataset,
            plan.speed_dataset,
        }
    }
    parts: dict[str, Any] = {"cpus": _cpus()}
    parts["speed"] = _timed("speed", lambda: speed(data[plan.speed_dataset], plan.speed_repeats))
    if not plan.quick:
        parts["runtime"] = _timed("simulator", runtime_speed)

    popts = ProtocolOptions(
        splits=plan.splits,
        folds=plan.folds,
        lambdas=plan.lambdas,
        outer=plan.outer,
        inner=plan.inner,
        jobs=args.jobs,
    )
    parts["protocol_opts"] = popts
    table = []
    for name in plan.table_datasets:
        table.append(_timed(f"table {name} (fixed)", lambda name=name: run_protocol(data[name], name, popts)))
    for name in plan.compat_datasets:
        compat = replace(popts, quirks=Quirks.reference())
        table.append(
            _timed(f"table {name} (compat)", lambda name=name, c=compat: run_protocol(data[name], name, c))
        )
    parts["table"] = table

    parts["stat_n"] = data[plan.stat_dataset].N
    stat, parts["stat_info"] = _timed(
        "statistical", lambda: compare_solvers(data[plan.stat_dataset], plan, Systems())
    )
    plot_panels(
        out / "mocha_statistical.png",
        [
            (stat, net, f"{name} (comm {COMM[net]:g})", parts["stat_info"]["p_star"])
            for net, name in (("wifi", "WiFi"), ("lte", "LTE"), ("3g", "3G"))
        ],
        f"Statistical heterogeneity: {plan.stat_dataset}, W-step",
    )
    low, parts["sys_low_info"] = _timed(
        "systems low", lambda: compare_solvers(data[plan.sys_dataset], plan, Systems(work=(0.9, 1.0)))
    )
    high, parts["sys_high_info"] = _timed(
        "systems high", lambda: compare_solvers(data[plan.sys_dataset], plan, Systems(work=(0.1, 1.0)))
    )
    plot_panels(
        out / "mocha_systems.png",
        [
            (low, "lte", "low variability (90-100%)", parts["sys_low_info"]["p_star"]),
            (high, "lte", "high variability (10-100%)", parts["sys_high_info"]["p_star"]),
        ],
        f"Systems heterogeneity: {plan.sys_dataset}, LTE",
    )
    fault_w, parts["fault_w"] = _timed(
        "faults W-step", lambda: fault_runs(data[plan.fault_dataset], plan, full=False)
    )
    fault_full, parts["fault_full"] = _timed(
        "faults full", lambda: fault_runs(data[plan.fault_dataset], plan, full=True)
    )
    plot_panels(
        out / "mocha_faults.png",
        [
            (fault_w, None, "W-step (Omega fixed)", wstep_optimum(data[plan.fault_dataset], plan.conv_lam)),
            (fault_full, None, "full method (Omega learned)", None),
        ],
        f"Fault tolerance: {plan.fault_dataset}, MOCHA",
    )
    gap_run = run_mocha(
        data[plan.fault_dataset],
        MochaOptions(lam=plan.conv_lam, outer=plan.outer, inner=plan.inner, sdca_frac=0.5, record="round"),
    )
    plot_gap(
        out / "mocha_gap.png", gap_run, f"MOCHA on {plan.fault_dataset}: {plan.outer} x {plan.inner} rounds"
    )
    parts["total_s"] = time.perf_counter() - t_start
    return stamp(write_report(out, plan, parts), "mocha", argv, started)


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


if __name__ == "__main__":
    import sys

    print(main(sys.argv[1:]))
