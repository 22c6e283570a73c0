"""Personalisation on MNIST: Local, FedAvg, FedAvg-FT, FedPer, FedRep, Ditto, APFL, LG-FedAvg (two
protocols), FedBABU, Hierarchical, and serving the better model (``eval.serve: better_on_val``).

Two federations, 3 seeds each, same partition/model/initialisation/local hyper-parameters for
every algorithm of a seed:
- ``label skew``: 100 clients, Dirichlet alpha=0.1, one 10-way task; 10 clients held out entirely
  for new-client evaluation (head fine-tuning);
- ``hetero tasks``: 40 clients in four groups learning different tasks on the same images (digit,
  parity, digit >= 5, ink-mass regression), so heads differ in size and loss.

Tuning, the same budget for every method: each algorithm's grid is the local lr
(``LR_GRID``) and, where it has them, its own key hyper-parameters (``PARAM_GRID``); at most
``BUDGET`` trials run on the first seed with ``data.val_fraction`` 0.1, bracketed (a choice at the
edge of a numeric axis extends that axis geometrically while the budget lasts), and the best round's
mean validation accuracy picks the point (``fedmtl.experiment.tune``); every seed then runs with it.

Serving the better model: each method with a personal and a shared model runs again at its tuned
point with ``data.val_fraction`` 0.1 and ``eval.serve: better_on_val``; the same runs give the
personal model's accuracy and the served model's, and the share of clients each did worse for than
the method's own shared model.

Run with ``fedmtl bench personalization [--quick]``; writes ``benchmarks/results/personalization.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

import fedmtl
from _provenance import write_table  # benchmarks/ is on sys.path under fedmtl bench
from fedmtl.config import apply_overrides
from fedmtl.experiment.records import RunDir
from fedmtl.experiment.tune import chosen_overrides, tune

RESULTS = Path(__file__).resolve().parent / "results"

ALGORITHMS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    # (label, algorithm for label skew, algorithm for hetero tasks)
    ("Local", {"name": "local"}, {"name": "local"}),
    ("FedAvg", {"name": "fedavg"}, {"name": "fedavg"}),
    ("FedAvg-FT", {"name": "fedavg_ft", "finetune_steps": 10}, {"name": "fedavg_ft", "finetune_steps": 10}),
    ("FedPer", {"name": "fedper"}, {"name": "fedper"}),
    ("FedRep", {"name": "fedrep", "head_epochs": 2}, {"name": "fedrep", "head_epochs": 2}),
    ("Ditto", {"name": "ditto", "lam": 0.1}, {"name": "ditto", "lam": 0.1}),
    ("APFL", {"name": "apfl"}, {"name": "apfl"}),
    ("LG-FedAvg (random start)", {"name": "lg_fedavg"}, {"name": "lg_fedavg"}),
    # the authors' protocol: FedAvg first (WARM_FRACTION of the rounds), then the split; with this
    # 2-layer MLP the top layer (the head) is global, the nearest to their 3 of 5
    ("LG-FedAvg (authors: FedAvg warm start)", {"name": "lg_fedavg"}, {"name": "lg_fedavg"}),
    ("FedBABU", {"name": "fedbabu"}, {"name": "fedbabu"}),
    (
        "Hierarchical",
        {"name": "hierarchical", "grouping": "cluster", "warmup_rounds": 10},
        {"name": "hierarchical", "grouping": "task", "body_weighting": "groups"},
    ),
]


LR_GRID = "train.lr=0.05,0.1"
#: each method's own hyper-parameters (2 values each); methods without one tune the lr only
PARAM_GRID: dict[str, list[str]] = {
    "FedAvg-FT": ["algorithm.finetune_steps=10,30"],
    "FedRep": ["algorithm.head_epochs=1,2"],
    "Ditto": ["algorithm.lam=0.1,1.0"],
    "APFL": ["algorithm.alpha=0.25,0.5"],
    # fine-tuning for epochs at its own learning rate, both tuned (issue 36)
    "FedBABU": ["algorithm.finetune_epochs=1,5", "algorithm.finetune_lr=0.01,0.1"],
}
HIER_GRID = {
    "label skew": "algorithm.split_ratio=0.6,0.8",
    "hetero tasks": "algorithm.body_weighting=samples,groups",
}
BUDGET = 10  # trials per method, grid and bracketing together (FedBABU: 8 grid points + 2)
WARM_FRACTION = 0.5  # LG-FedAvg, authors' protocol: the share of the rounds that is plain FedAvg
#: methods with a personal and a shared model: the "serving the better model" section
SERVED = ("FedAvg-FT", "Ditto", "APFL", "FedBABU")


def grid(label: str, kind: str) -> list[str]:
    own = [HIER_GRID[kind]] if label == "Hierarchical" else PARAM_GRID.get(label, [])
    return [LR_GRID, *own]


def algorithm(label: str, algo: dict[str, Any], rounds: int) -> dict[str, Any]:
    """The row's algorithm section (the authors' LG-FedAvg protocol depends on the rounds)."""
    if label.startswith("LG-FedAvg (authors"):
        return {**algo, "warmup_rounds": max(1, int(WARM_FRACTION * rounds))}
    return algo


def tuned(kind: str, label: str, algo: dict[str, Any], rounds: int, seed: int, runs: Path) -> dict[str, Any]:
    """The tuning record: overrides chosen on validation rows (first seed), bracketed, within the budget."""
    cfg = {**federation(kind, rounds, seed), "name": f"tune-{label}", "algorithm": algo}
    slug = label.split(" (")[0] + ("-authors" if "authors" in label else "")
    folder = runs / f"tune-{kind.replace(' ', '_')}-{slug}"
    record = tune(
        cfg, grid(label, kind), budget=BUDGET, seeds=[seed], out=folder, log=lambda *_: None, bracket=True
    )
    print(
        f"[{kind}] {label}: tuned {chosen_overrides(record)} ({record['trials_run']} trials; "
        f"edge {record['edge'] or 'none'})",
        flush=True,
    )
    return record


def federation(kind: str, rounds: int, seed: int) -> dict[str, Any]:
    common = {
        "seed": seed,
        "model": {"name": "mlp", "hidden": [200]},
        "train": {"rounds": rounds, "local_epochs": 1, "batch_size": 32, "lr": 0.05},
        "eval": {"every": 10, "new_client_steps": 20},
        # every algorithm here runs batched (same numbers as sequential to float tolerance)
        "runtime": {"execution": "auto"},
        "output": {"progress": False, "checkpoint_every": 50},
    }
    if kind == "label skew":
        data = {
            "dataset": "mnist",
            "normalize": "scale",  # pixels to [0, 1], as the table was measured
            "holdout_clients": 10,
            "partition": {"kind": "dirichlet", "alpha": 0.1, "num_clients": 100},
        }
        return {**common, "data": data, "clients": {"per_round": 10}}
    data = {
        "dataset": "mnist",
        "normalize": "scale",
        "tasks": ["digit", "parity", "ge5", "ink"],
        "partition": {"kind": "dirichlet", "alpha": 0.5, "num_clients": 40},
    }
    return {**common, "data": data, "clients": {"per_round": 10}}


def _client_scores(rows: list[dict[str, Any]], last: int) -> dict[int, float]:
    """Accuracy for classification clients (regression clients are reported via R2 separately)."""
    return {
        r["client"]: r["accuracy"]
        for r in rows
        if r["kind"] == "client" and r["round"] == last and "accuracy" in r
    }


def measure(kind: str, rounds: int, seeds: list[int], runs: Path) -> list[dict[str, Any]]:
    out = []
    fedavg_scores: dict[int, dict[int, float]] = {}
    for label, skew_algo, hetero_algo in ALGORITHMS:
        per_seed = []
        algo = algorithm(label, skew_algo if kind == "label skew" else hetero_algo, rounds)
        record = tuned(kind, label, algo, rounds, seeds[0], runs)
        chosen = chosen_overrides(record)
        slug = f"{kind.replace(' ', '_')}-{algo['name']}" + ("-authors" if "authors" in label else "")
        for seed in seeds:
            cfg = {
                **federation(kind, rounds, seed),
                "name": f"{kind.replace(' ', '-')}-{label.split(' (')[0]}",
                "algorithm": algo,
            }
            cfg = apply_overrides(cfg, chosen)
            res = fedmtl.run(cfg, out=runs / f"{slug}-s{seed}")
            rows = RunDir(res.run_dir).read_metrics()
            scores = _client_scores(rows, res.final["round"])
            if label == "FedAvg":
                fedavg_scores[seed] = scores
            f = res.final
            per_seed.append(
                {
                    "mean": f["accuracy_mean"],
                    "worst": f["accuracy_worst10"],
                    "r2": f.get("task_ink_r2_mean"),
                    "new": f.get("new_after_accuracy_mean"),
                    "scores": scores,
                    "mb": sum(r["bytes_up"] + r["bytes_down"] for r in rows if r["kind"] == "round") / 1e6,
                    "wall": f["wall_time"],
                }
            )
            print(
                f"[{kind}] {label} seed {seed}: mean {f['accuracy_mean']:.4f} "
                f"worst10 {f['accuracy_worst10']:.4f}"
            )
        served = (
            served_runs(kind, label, algo, chosen, rounds, seeds, runs, slug) if label in SERVED else None
        )
        out.append({"label": label, "seeds": per_seed, "tuned": chosen, "record": record, "served": served})
    for row in out:  # per-client gain over FedAvg on the same clients and seed
        gains, neg = [], []
        for seed, s in zip(seeds, row["seeds"], strict=True):
            ref = fedavg_scores.get(seed, {})
            g = [s["scores"][c] - ref[c] for c in s["scores"] if c in ref]
            gains.append(float(np.mean(g)) if g else None)
            neg.append(float(np.mean([x < 0 for x in g])) if g else None)
        row["gain"], row["neg"] = gains, neg
    return out


def ink_by_trial(record: dict[str, Any], key: str) -> str:
    """The ink clients' R² of every tuning trial, by the value of ``key`` (FedBABU's fine-tuning lr):
    what the accuracy-chosen point costs the regression group."""
    import json

    by: dict[str, list[str]] = {}
    for t in record["trials"]:
        summary = json.loads((Path(t["runs"][0]) / "summary.json").read_text())
        r2 = summary["final"].get("task_ink_r2_mean", float("nan"))
        by.setdefault(t["params"][key], []).append(f"{r2:.3g}")
    return "; ".join(f"{key.split('.', 1)[1]} {v}: {', '.join(r2s)}" for v, r2s in by.items())


def served_runs(
    kind: str,
    label: str,
    algo: dict[str, Any],
    chosen: list[str],
    rounds: int,
    seeds: list[int],
    runs: Path,
    slug: str,
) -> list[dict[str, float]]:
    """The method at its tuned point with validation rows and ``eval.serve: better_on_val``: its
    personal and its served model, from the same runs."""
    out = []
    for seed in seeds:
        cfg = {**federation(kind, rounds, seed), "name": f"served-{label}", "algorithm": algo}
        cfg = apply_overrides(cfg, [*chosen, "data.val_fraction=0.1", "eval.serve=better_on_val"])
        f = fedmtl.run(cfg, out=runs / f"{slug}-served-s{seed}").final
        out.append(
            {
                "personal": f["personal_accuracy_mean"],
                "served": f["accuracy_mean"],
                "shared": f["shared_accuracy_mean"],
                "personal_hurt": f["personal_gain_negative_frac"],
                "served_hurt": f["gain_negative_frac"],
                "kept": f["served_personal_mean"],
                "personal_worst": f["personal_accuracy_worst10"],
                "served_worst": f["accuracy_worst10"],
            }
        )
        print(
            f"[{kind}] {label} served seed {seed}: personal {f['personal_accuracy_mean']:.4f} "
            f"served {f['accuracy_mean']:.4f}",
            flush=True,
        )
    return out


def served_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| Algorithm | Shared model acc | Personal acc | Served acc | Personal worst-10% | Served worst-10% "
        "| Clients the personal model hurts | Clients the served model hurts | Clients serving personal |",
        "|---" * 9 + "|",
    ]
    for r in rows:
        s = r["served"]
        if not s:
            continue
        keys = ("shared", "personal", "served", "personal_worst", "served_worst")
        rates = ("personal_hurt", "served_hurt", "kept")
        cells = [_ms([x[k] for x in s]) for k in keys] + [_ms([x[k] for x in s], 2) for k in rates]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return lines


def _ms(values: list[float | None], digits: int = 4) -> str:
    """mean ± std over seeds; — where the value does not apply (None); a diverged value is said, never
    averaged away."""
    present = [v for v in values if v is not None]
    if not present:
        return "—"
    arr = np.asarray(present, dtype=float)
    bad = int((~np.isfinite(arr)).sum())
    if bad:
        return f"non-finite in {bad} of {arr.size} seeds"
    if np.abs(arr).max() > 1e6:
        return f"diverged (mean {arr.mean():.2g})"
    return f"{arr.mean():.{digits}f} ± {arr.std():.{digits}f}"


def table(kind: str, rows: list[dict[str, Any]]) -> list[str]:
    hetero = kind != "label skew"
    head = (
        "| Algorithm | Tuned (grid) | Mean acc | Worst-10% acc | Gain vs FedAvg (mean) "
        "| Clients with negative gain "
        + ("| Ink R² (mean) " if hetero else "| New-client acc (20 head steps) ")
        + "| MB sent | Wall s |"
    )
    lines = [head, "|---" * 9 + "|"]
    for r in rows:
        s = r["seeds"]
        extra = _ms([x["r2"] for x in s], 3) if hetero else _ms([x["new"] for x in s])
        lines.append(
            f"| {r['label']} | {_tuned(r['record'], r['label'], kind)} | {_ms([x['mean'] for x in s])} | "
            f"{_ms([x['worst'] for x in s])} | "
            f"{_ms(r['gain'])} | {_ms(r['neg'], 2)} | {extra} | {_ms([x['mb'] for x in s], 1)} | "
            f"{_ms([x['wall'] for x in s], 1)} |"
        )
    return lines


def _tuned(record: dict[str, Any], label: str, kind: str) -> str:
    """``lr 0.2, lam 1.0 (of lr {0.05, 0.1} x lam {0.1, 1.0}; bracketed: lr 0.2, 0.4)``, **edge**
    marked where the choice is still the lowest or highest value tried."""
    short = [f"{k.split('.', 1)[1]} {v}" for k, v in record["chosen"].items()]
    options = [
        f"{g.split('=')[0].split('.', 1)[1]} {{{g.split('=')[1].replace(',', ', ')}}}"
        for g in grid(label, kind)
    ]
    ext = "; ".join(f"{k.split('.', 1)[1]} {', '.join(v)}" for k, v in record["extended"].items())
    edge = ", ".join(
        f"{k.split('.', 1)[1]} at its {'lowest' if s == 'low' else 'highest'}"
        for k, s in record["edge"].items()
    )
    return (
        f"{', '.join(short)} (of {' x '.join(options)}"
        + (f"; bracketed: {ext}" if ext else "")
        + ")"
        + (f" **edge: {edge}**" if edge else "")
    )


def main(argv: list[str]) -> Path:
    started = time.perf_counter()
    ap = argparse.ArgumentParser(prog="fedmtl bench personalization")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true", help="3 rounds, one seed: a smoke test of the benchmark")
    ap.add_argument("--runs", default="runs/bench/personalization")
    ap.add_argument("--out", default=str(RESULTS / "personalization.md"))
    a = ap.parse_args(argv)
    rounds, seeds = (3, [0]) if a.quick else (a.rounds, a.seeds)
    runs = Path(a.runs) / time.strftime("%Y%m%d-%H%M%S")
    sections = []
    for kind in ("label skew", "hetero tasks"):
        rows = measure(kind, rounds, seeds, runs)
        sections.append((kind, rows))
    lines = [
        "# Personalisation on MNIST",
        "",
        "Clients trained batched (`runtime.execution: auto`). Tuning, the same budget for every "
        f"method: at most {BUDGET} trials per method on seed {seeds[0]}, with 10% of each client's training "
        "rows held out for validation, chosen by the best round's mean validation accuracy "
        "(`fedmtl.experiment.tune`; the test split is not read to choose). The grid is each algorithm's "
        "local lr and, where it has them, its own key hyper-parameters; it is bracketed (`--bracket`): a "
        "choice at the lowest or highest value of a numeric axis extends that axis geometrically (the edge "
        "times its ratio to its neighbour), the other keys at their choice, until the choice is interior or "
        "the budget is spent. The Tuned column gives the choice, the grid and the values bracketing added; "
        "**edge** marks a choice still at the edge when the budget ended. Every seed then runs with the "
        "chosen values on the full training rows.",
        "",
        f"{rounds} rounds, 10 clients per round, MLP 784-200-(head), local SGD, 1 local epoch, "
        f"batch 32; seeds {seeds} (mean ± std over seeds). Accuracy is each client's personalised model "
        "(the model that client uses) on its own 25% test split; mean and 10th percentile over clients. "
        "Gain is per client against FedAvg's model on the same client, seed and split. Bytes are up + down.",
        "",
        "LG-FedAvg runs twice: from the seeded initialisation with the head global (the defaults), and "
        f"with the authors' protocol (their `main_lg.py` starts from a FedAvg-trained model): "
        f"{int(WARM_FRACTION * 100)}% of the rounds plain FedAvg, then the split, the head global (this "
        "MLP has 2 layers; the authors kept the top 3 of 5 global). FedBABU fine-tunes for "
        "`finetune_epochs` at its own `finetune_lr` before each evaluation, both tuned.",
        "",
        "## Label skew: 100 clients, Dirichlet alpha = 0.1 (10 held out as new clients)",
        "",
        *table("label skew", sections[0][1]),
        "",
        "Hierarchical here discovers groups by clustering client updates (CFL with the scale-free "
        "`split_rule: relative`, warm-up 10).",
        "",
        "## Heterogeneous tasks: 40 clients, 4 task groups (digit / parity / >= 5 / ink-mass regression)",
        "",
        "Accuracy columns cover the 30 classification clients; the ink group is reported by R². Tuning "
        "chooses on the classification clients' validation accuracy (the run's primary metric), so the "
        "ink clients' R² plays no part in any choice.",
        "",
        *table("hetero tasks", sections[1][1]),
        "",
        "Hierarchical here uses the known task ids (body weighting tuned: by samples, or each task group "
        "weighing the same); FedAvg averages the body over all clients by samples and each task's head "
        "within the task.",
        "",
        "FedBABU's ink clients fine-tune a regression head from the fixed random one on features its body "
        "learned under that head. The ink R² of every tuning trial (seed "
        f"{seeds[0]}, validation split, last round), by fine-tuning lr: "
        + ink_by_trial(
            next(r["record"] for r in sections[1][1] if r["label"] == "FedBABU"), "algorithm.finetune_lr"
        )
        + ". A fine-tuning lr that suits the classification heads can make the regression head's steps "
        "unstable (non-finite or hugely negative R²); tuning chooses on classification accuracy only.",
        "",
        "## Serving the better model (`eval.serve: better_on_val`)",
        "",
        "Each method with a personal and a shared model, at its tuned point, with 10% of each client's "
        "training rows held out for validation: every client serves whichever of its personal and its "
        "shared model scores better on its own validation rows. Personal and served columns come from the "
        "same runs (same seeds, same trained models); a client is hurt when the model's test accuracy is "
        "below that of the method's own shared model on that client (FedAvg-FT: the global model before "
        "fine-tuning; FedBABU: the global body with the fixed random head).",
        "",
        "### Label skew",
        "",
        *served_table(sections[0][1]),
        "",
        "### Heterogeneous tasks",
        "",
        *served_table(sections[1][1]),
        "",
        f"Reproduce: `fedmtl bench personalization --rounds {rounds} --seeds {' '.join(map(str, seeds))}`.",
        "",
    ]
    return write_table(a.out, lines, "personalization", argv, started)
