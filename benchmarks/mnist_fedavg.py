"""FedAvg, FedProx and Local on MNIST (100 clients, Dirichlet alpha=0.5, 10 per round).

Run with ``fedmtl bench mnist_fedavg [--rounds N] [--quick]``. Writes
``benchmarks/results/mnist_fedavg.md`` and ``mnist_fedavg.png``. All three algorithms use the same
partition, model, initialisation and local hyper-parameters; only the algorithm differs. Every seed
re-draws the partition and the initialisation; columns are mean ± std over seeds."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

import fedmtl
from _provenance import write_table  # benchmarks/ is on sys.path under fedmtl bench
from fedmtl.experiment.records import RunDir

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 0.97


def base_config(rounds: int, eval_every: int, seed: int) -> dict[str, Any]:
    return {
        "seed": seed,
        "data": {
            "dataset": "mnist",
            "partition": {"kind": "dirichlet", "alpha": 0.5, "num_clients": 100},
            "normalize": "scale",  # pixels to [0, 1], as the FedAvg paper
        },
        "model": {"name": "mlp", "hidden": [200, 200]},
        "train": {"rounds": rounds, "local_epochs": 5, "batch_size": 32, "lr": 0.1},
        "clients": {"per_round": 10},
        "runtime": {"execution": "auto"},
        "eval": {"every": eval_every},
        "output": {"progress": True, "checkpoint_every": 25},
    }


ALGORITHMS: list[tuple[str, dict[str, Any]]] = [
    ("FedAvg", {"name": "fedavg"}),
    ("FedProx (mu=0.01)", {"name": "fedprox", "mu": 0.01}),
    ("Local", {"name": "local"}),
]


def _row(label: str, res: fedmtl.experiment.run.RunResult, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    evaluated = [r for r in rounds if "accuracy_mean" in r]
    has_global = "global_accuracy" in res.final
    key = "global_accuracy" if has_global else "accuracy_mean"
    reach = next((r["round"] for r in evaluated if r.get(key, 0) >= TARGET), None)
    mb = sum(r["bytes_up"] + r["bytes_down"] for r in rounds) / 1e6
    return {
        "label": label,
        "key": key,
        "curve": [(r["round"], r[key]) for r in evaluated],
        "final": res.final[key],
        "reach": reach,
        "client_mean": res.final["accuracy_mean"],
        "client_worst": res.final["accuracy_worst10"],
        "mb": mb,
        "wall": res.final["wall_time"],
    }


def _ms(values: list[float], digits: int = 4) -> str:
    arr = np.asarray(values, dtype=float)
    if arr.size == 1:
        return f"{arr[0]:.{digits}f}"
    return f"{arr.mean():.{digits}f} ± {arr.std():.{digits}f}"


def _plot(rows: dict[str, list[dict[str, Any]]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, per_seed in rows.items():
        xs = [x for x, _ in per_seed[0]["curve"]]
        ys = np.mean([[y for _, y in r["curve"]] for r in per_seed], axis=0)
        what = (
            "global test" if per_seed[0]["key"] == "global_accuracy" else "mean of clients' own test splits"
        )
        ax.plot(xs, ys, label=f"{label} ({what})")
    ax.axhline(TARGET, color="grey", ls=":", lw=1)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (mean over seeds)")
    ax.set_ylim(0.8, 1.0)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> Path:
    started = time.perf_counter()
    ap = argparse.ArgumentParser(prog="fedmtl bench mnist_fedavg")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true", help="10 rounds, one seed: a smoke test of the benchmark")
    ap.add_argument("--runs", default="runs/bench/mnist_fedavg", help="where the run directories go")
    ap.add_argument("--out", default=str(RESULTS / "mnist_fedavg.md"))
    a = ap.parse_args(argv)
    rounds, seeds = (10, [0]) if a.quick else (a.rounds, a.seeds)
    eval_every = 5 if a.quick else a.eval_every
    folder = Path(a.runs) / time.strftime("%Y%m%d-%H%M%S")
    rows: dict[str, list[dict[str, Any]]] = {}
    for seed in seeds:
        for label, algo in ALGORITHMS:
            cfg = {
                **base_config(rounds, eval_every, seed),
                "name": f"mnist-{algo['name']}",
                "algorithm": algo,
            }
            res = fedmtl.run(cfg, out=folder / f"{algo['name']}-s{seed}")
            metrics = [r for r in RunDir(res.run_dir).read_metrics() if r["kind"] == "round"]
            rows.setdefault(label, []).append(_row(label, res, metrics))
            last = rows[label][-1]
            print(f"{label} seed {seed}: final {last['final']:.4f} in {last['wall']:.0f} s")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    _plot(rows, png)
    cfg = base_config(rounds, eval_every, seeds[0])
    checkpoints = sorted({r for r in (10, 50, 100, 200, 300) if r <= rounds} | {rounds})
    lines = [
        "# MNIST: FedAvg, FedProx and Local",
        "",
        f"100 clients, Dirichlet label skew alpha=0.5, 10 clients sampled per round, {rounds} rounds; MLP "
        f"784-200-200-10; local SGD lr {cfg['train']['lr']}, {cfg['train']['local_epochs']} local epochs, "
        f"batch {cfg['train']['batch_size']}; seeds {seeds} (each re-draws the partition and the "
        "initialisation), mean ± std over seeds. FedAvg/FedProx accuracy is on the official 10,000-image "
        "MNIST test set (global model); Local has no global model, so its accuracy is the mean over "
        "clients of each client's own model on its own 25% test split. Target: FedAvg >= 97% within 300 "
        "rounds. The hyper-parameters are the classic FedAvg paper's (McMahan et al. 2017, E = 5, B = 32), "
        "not tuned here.",
        "",
        "| Algorithm | "
        + " | ".join(f"acc @ {c}" for c in checkpoints)
        + " | First round >= 97% | Client mean (final) | Client worst-10% (final) | MB sent | Wall s |",
        "|---|" + "---|" * (len(checkpoints) + 5),
    ]
    for label, per_seed in rows.items():
        accs = " | ".join(_ms([dict(r["curve"]).get(c, float("nan")) for r in per_seed]) for c in checkpoints)
        reach = [r["reach"] for r in per_seed]
        reached = "not reached" if None in reach else _ms([float(x) for x in reach], 0)
        lines.append(
            f"| {label} | {accs} | {reached} | {_ms([r['client_mean'] for r in per_seed])} | "
            f"{_ms([r['client_worst'] for r in per_seed])} | {_ms([r['mb'] for r in per_seed], 1)} | "
            f"{_ms([r['wall'] for r in per_seed], 0)} |"
        )
    lines += [
        "",
        f"![accuracy vs round, mean over seeds]({png.name})",
        "",
        f"Reproduce: `fedmtl bench mnist_fedavg --rounds {rounds} --seeds {' '.join(map(str, seeds))}` "
        "(wall times on a shared 2-core CPU machine).",
        "",
    ]
    return write_table(out, lines, "mnist_fedavg", argv, started)
