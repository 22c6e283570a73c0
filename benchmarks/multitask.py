"""Multi-task federations of this project's two kinds: several tasks per client, and one task per
client with different clients' tasks related.

- **MNIST, two tasks per client**: every client predicts the digit class and the ink mass (the mean
  pixel intensity, a regression) of the same images; 20 clients with Dirichlet(0.5) label skew (the
  first 20 of a 100-client partition, about 600 images each), an MLP body 784-64 with one head per
  task.
- **School** (ILEA exam scores): 139 schools, each a client with its own regression task, the
  federation MOCHA's paper benchmarks; an MLP 28-32 with the score head.

Methods: Local, FedAvg, FedPer, Ditto, hierarchical (grouping by task) and, with ``--fedbone``,
FedBone on the image tasks. Each method's learning rate is chosen from the same 4-point grid on
validation rows carved from the clients' training data (``data.val_fraction`` 0.1), by the
validation Δm against Local at the grid's second point (Δm: the mean over tasks of the relative
change of each task's metric, signed so that higher is better, ``fedmtl.metrics.delta_m``); a choice
at the edge of the grid extends that side (x3 a step, at most two steps), and a choice still at the
edge is marked. The chosen setting then runs on each seed and the table reports test metrics and Δm
against Local (tuned the same way) as mean ± std over seeds.

The timing row compares one two-task round of FedAvg trained batched across clients with the same
round trained one client after another (same numbers; ratio of seconds per round, best of repeats).

Run with ``fedmtl bench multitask [--quick]``; writes ``benchmarks/results/multitask.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

import fedmtl
from _provenance import write_table  # benchmarks/ is on sys.path under fedmtl bench
from fedmtl.metrics import delta_m, lower_is_better

RESULTS = Path(__file__).resolve().parent / "results"
LRS = {"default": [0.01, 0.03, 0.1, 0.3], "fedbone": [0.001, 0.003, 0.01, 0.03]}
REFERENCE = "local"
BRACKET = 2  # at most this many extra learning rates per method when its choice sits at a grid edge


def mnist_two_tasks(seed: int, rounds: int) -> dict[str, Any]:
    return {
        "seed": seed,
        "data": {
            "dataset": "mnist",
            "partition": {"kind": "dirichlet", "alpha": 0.5, "num_clients": 100},
            "max_clients": 20,
            "tasks": [["digit", "ink"]],
        },
        "model": {"name": "mlp", "hidden": [64]},
        "train": {"rounds": rounds, "local_steps": 10, "batch_size": 32},
        "clients": {"per_round": 20},
        "eval": {"every": max(1, rounds // 5)},
        "runtime": {"execution": "auto"},
        "output": {"progress": False, "checkpoint_every": 1000},
    }


def school(seed: int, rounds: int) -> dict[str, Any]:
    return {
        "seed": seed,
        "data": {"dataset": "school", "partition": {"kind": "natural"}},
        "model": {"name": "mlp", "hidden": [32]},
        "train": {"rounds": rounds, "local_epochs": 1, "batch_size": 16},
        "clients": {"per_round": 30},
        "eval": {"every": max(1, rounds // 5)},
        "runtime": {"execution": "auto"},
        "output": {"progress": False, "checkpoint_every": 1000},
    }


#: setting -> (config builder, the metrics Δm is over, the methods that apply)
SETTINGS: dict[str, tuple[Any, list[str], list[str]]] = {
    "MNIST, digit class + ink regression on every client": (
        mnist_two_tasks,
        ["digit.accuracy", "ink.rmse"],
        ["local", "fedavg", "fedper", "ditto", "hierarchical"],
    ),
    "School, one exam-score regression per school": (
        school,
        ["rmse"],
        ["local", "fedavg", "fedper", "ditto", "hierarchical"],
    ),
}


def config(builder: Any, method: str, seed: int, rounds: int, lr: float, val: bool) -> dict[str, Any]:
    cfg = builder(seed, rounds)
    cfg["algorithm"] = {"name": method}
    if method == "fedbone":
        cfg["model"] = {"name": "fedbone_net"}
        cfg["data"]["input_shape"] = [1, 28, 28]
    cfg["train"]["lr"] = lr
    if val:
        cfg["data"]["val_fraction"] = 0.1
    return cfg


class _Finished:
    """A completed run read back from its summary (``--reuse``): what the table needs of a result."""

    def __init__(self, summary: dict[str, Any]) -> None:
        self.summary, self.final = summary, summary["final"]


def _finished(path: Path) -> _Finished | None:
    summary = path / "summary.json"
    if not summary.is_file():
        return None
    doc = json.loads(summary.read_text())
    return _Finished(doc) if doc.get("complete") else None


def values(row: dict[str, Any], keys: list[str], prefix: str = "") -> dict[str, float]:
    return {k: float(row[f"{prefix}{k}_mean"]) for k in keys}


def main(argv: list[str]) -> Path:
    started = time.perf_counter()
    ap = argparse.ArgumentParser(prog="fedmtl bench multitask")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true", help="3 rounds, one seed, two grid points")
    ap.add_argument("--runs", default="runs/bench/multitask")
    ap.add_argument("--out", default=str(RESULTS / "multitask.md"))
    ap.add_argument(
        "--fedbone",
        action="store_true",
        help="add FedBone to the MNIST setting (its server-side model makes a round ~20x a FedAvg round)",
    )
    ap.add_argument(
        "--reuse", default=None, help="an earlier cut run's folder: its finished runs are read back"
    )
    a = ap.parse_args(argv)
    rounds, seeds = (3, [0]) if a.quick else (a.rounds, a.seeds)
    runs = Path(a.reuse) if a.reuse else Path(a.runs) / time.strftime("%Y%m%d-%H%M%S")
    sections: list[str] = []
    done: dict[str, Any] = {}
    for label, (builder, keys, methods) in SETTINGS.items():
        if a.fedbone and builder is mnist_two_tasks:
            methods = [*methods, "fedbone"]
        higher = {k: not lower_is_better(k) for k in keys}
        tag = label.split(",")[0].lower()

        def run(method: str, seed: int, lr: float, val: bool, tag: str = tag, builder: Any = builder) -> Any:
            name = f"{tag}-{method}-lr{lr}-s{seed}{'-val' if val else ''}"
            if name not in done:  # the reference's run is also a tuning trial of Local
                done[name] = _finished(runs / name) or fedmtl.run(
                    config(builder, method, seed, rounds, lr, val), out=runs / name
                )
            return done[name]

        def grid_of(method: str) -> list[float]:
            grid = LRS.get(method, LRS["default"])
            return grid[1:3] if a.quick else grid

        ref_lr = grid_of(REFERENCE)[1 if not a.quick else 0]
        reference = values(run(REFERENCE, seeds[0], ref_lr, True).summary["best"], keys, "val_")
        chosen: dict[str, tuple[float, bool]] = {}
        for method in methods:
            grid = grid_of(method)
            scores = {}
            for lr in grid:
                best = run(method, seeds[0], lr, True).summary["best"]
                scores[lr] = delta_m(values(best, keys, "val_"), reference, higher)
            lr = max(scores, key=lambda k: scores[k])
            for _ in range(0 if a.quick else BRACKET):  # an edge choice: extend that side, x3 a step
                if lr not in (min(scores), max(scores)):
                    break
                step = float(f"{(lr / 3 if lr == min(scores) else lr * 3):.3g}")
                best = run(method, seeds[0], step, True).summary["best"]
                scores[step] = delta_m(values(best, keys, "val_"), reference, higher)
                lr = max(scores, key=lambda k: scores[k])
            chosen[method] = (lr, lr in (min(scores), max(scores)))
            print(f"{tag} {method}: val Δm by lr {scores} -> {lr}", flush=True)
        finals: dict[str, list[dict[str, float]]] = {}
        for method in methods:
            finals[method] = [values(run(method, s, chosen[method][0], False).final, keys) for s in seeds]
        rows = []
        for method in methods:
            lr, edge = chosen[method]
            cells = [_ms([f[k] for f in finals[method]]) for k in keys]
            dm = [delta_m(f, r, higher) for f, r in zip(finals[method], finals[REFERENCE], strict=True)]
            rows.append(
                f"| {method} | {lr:g}{' (edge)' if edge else ''} | "
                + " | ".join(cells)
                + f" | {_ms(dm, 1)} |"
            )
        cols = " | ".join(f"{k} (test)" for k in keys)
        sections += [
            f"## {label}",
            "",
            f"| method | lr (validation) | {cols} | Δm vs Local % |",
            "|---|---|" + "---|" * len(keys) + "---|",
            *rows,
            "",
        ]
    speed = _speed(2 if a.quick else 5)
    lines = [
        "# Multi-task federations",
        "",
        (__doc__ or "").split("\n\n", 1)[1].split("Run with")[0].strip(),
        "",
        f"{rounds} rounds; seeds {' '.join(map(str, seeds))}; lr grid {LRS['default']} "
        f"(FedBone {LRS['fedbone']}), chosen on seed {seeds[0]}'s validation rows. "
        + (
            ""
            if a.fedbone
            else "FedBone is left out of this run (`--fedbone` adds it; a FedBone round with its server-side "
            "model costs about 20 FedAvg rounds here); its multi-task Δm is in fedbone.md. "
        )
        + "MOCHA's School numbers (linear models, the same 75/25 per-school split) are in mocha.md.",
        "",
        *sections,
        "## Two-task client step: batched vs sequential",
        "",
        "| execution | s / round (best of repeats) | ratio |",
        "|---|---|---|",
        f"| sequential | {speed['sequential']:.3f} | 1.0x |",
        f"| batched | {speed['batched']:.3f} | {speed['sequential'] / speed['batched']:.1f}x faster |",
        "",
        f"Reproduce: `fedmtl bench multitask --rounds {rounds} --seeds {' '.join(map(str, seeds))}"
        f"{' --fedbone' if a.fedbone else ''}`.",
        "",
    ]
    return write_table(a.out, lines, "multitask", argv, started)


def _speed(repeats: int) -> dict[str, float]:
    """Seconds per two-task FedAvg round on the MNIST federation, each execution on its own."""
    from fedmtl.config import parse_config
    from fedmtl.experiment.run import build

    out = {}
    for execution in ("sequential", "batched"):
        cfg = mnist_two_tasks(0, 1)
        cfg["algorithm"] = {"name": "fedavg"}
        cfg["train"]["lr"] = 0.1
        cfg["runtime"]["execution"] = execution
        _, algo, sim = build(parse_config(cfg))
        server, states, times = algo.init_server(), {}, []
        for r in range(1, repeats + 2):
            t0 = time.perf_counter()
            server = sim.run_round(r, server, states).server
            if r > 1:  # the first round warms caches up
                times.append(time.perf_counter() - t0)
        out[execution] = min(times)
    return out


def _ms(xs: list[float], digits: int = 3) -> str:
    arr = np.asarray([v for v in xs if not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return "—"
    return f"{arr.mean():.{digits}f} ± {arr.std():.{digits}f}" if arr.size > 1 else f"{arr[0]:.{digits}f}"


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
