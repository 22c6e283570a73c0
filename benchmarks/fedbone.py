"""FedBone on heterogeneous dense MNIST tasks, against baselines on an equal footing.

One federation per seed: 8 clients (2 per task: digit classification, foreground segmentation,
Sobel edge map, denoising), each with a few hundred MNIST images of its own (``mnist_dense``,
iid partition of the 60,000 training images into 200 parts, the first 8 used; 75/25 train/test).

Capacity is held equal where the comparison is about aggregation: every method below the two
"small" rows trains the same large network (embedding + large general model + adapter + task head).
- **Local / FedAvg per task group (small full model)**: what a client can afford to train itself
  (a tiny general model); FedAvg runs one federation per task group.
- **FedAvg per task group (large model on clients)**: the same per-task FedAvg, but every client
  trains the whole large network itself (what split learning saves it).
- **Multi-task FedAvg (large model on clients)**: body (embedding, general model, adapter) averaged
  over all 8 clients, each head within its task (``hierarchical`` with ``grouping: task``).
- **Split learning, plain mean**: the general model on the server, client gradients averaged.
- **PCGrad aggregation (no rescaling)**: split learning, PCGrad's conflict projection, then the mean.
- **FedBone (GP)**: GPAggregation: history attention rescaling + conflict projection.

Tuning, equal for every method (Local, the reference of every Δm, included): the learning rate
(client Adam, and the server's for the split methods) is chosen from the same grid on seed 0's
*validation* rows (10% of each client's training images), by the validation Δm of the last round
against Local at lr 0.003, the grid bracketed: while a method's choice is the lowest or highest lr
it tried, the next lr beyond (geometric) is tried, up to ``LR_BUDGET`` lrs per method; test rows are
never read to choose anything. Every method does the same local steps with the same batch size per round.
Bytes are up + down per round (split learning: activations and gradients; FedAvg: parameters);
client FLOPs are training FLOPs per round per client (3 x forward). Run with
``fedmtl bench fedbone``."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

import fedmtl
from _provenance import stamp  # benchmarks/ is on sys.path under fedmtl bench
from fedmtl import metrics
from fedmtl.experiment.tune import beyond, edge_of

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ["digit", "segment", "edge", "denoise"]
# (task, metric, higher is better, column label)
METRICS = [
    ("digit", "accuracy", True, "digit acc ↑"),
    ("segment", "miou", True, "segment mIoU ↑"),
    ("edge", "rmse", False, "edge RMSE ↓"),
    ("denoise", "psnr", True, "denoise PSNR dB ↑"),
]
LARGE = {"name": "fedbone_net", "width": 48, "depth": 2}
SMALL = {"name": "fedbone_net", "width": 8, "depth": 1}

METHODS: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    # (label, kind, model, algorithm); kind: groups (one federation per task), joint (all 8 clients)
    ("Local (small full model)", "groups", SMALL, {"name": "local"}),
    ("FedAvg per task group (small full model)", "groups", SMALL, {"name": "fedavg"}),
    ("FedAvg per task group (large model on clients)", "groups", LARGE, {"name": "fedavg"}),
    (
        "Multi-task FedAvg (large model on clients)",
        "joint",
        LARGE,
        {"name": "hierarchical", "grouping": "task"},
    ),
    ("Split learning, plain mean", "joint", LARGE, {"name": "fedbone", "aggregation": "mean"}),
    (
        "PCGrad aggregation (split, no rescaling)",
        "joint",
        LARGE,
        {"name": "fedbone", "aggregation": "gp", "rescale": False},
    ),
    ("FedBone (GP)", "joint", LARGE, {"name": "fedbone", "aggregation": "gp"}),
]
LR_GRID = [0.001, 0.003, 0.01]
LR_BUDGET = 5  # lrs tried per method: the grid, then bracketing
REF_LR = 0.003  # Local at this lr is the fixed reference of the validation Δm
VAL_FRACTION = 0.1


def config(
    seed: int,
    rounds: int,
    steps: int,
    model: dict[str, Any],
    algo: dict[str, Any],
    lr: float = REF_LR,
    val: float = 0.0,
    **data: Any,
) -> dict:
    algo = {**algo, "server_lr": lr} if algo["name"] == "fedbone" else algo
    return {
        "name": f"fedbone-bench-{algo['name']}",
        "seed": seed,
        "data": {
            "dataset": "mnist_dense",
            "partition": {"kind": "iid", "num_clients": 200},
            "max_clients": 8,
            "tasks": TASKS,
            "val_fraction": val,
            **data,
        },
        "model": model,
        "algorithm": algo,
        "train": {"rounds": rounds, "local_steps": steps, "batch_size": 16, "optimizer": "adam", "lr": lr},
        "eval": {"every": max(1, rounds // 4)},
        "output": {"progress": False, "checkpoint_every": rounds},
    }


def _read(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _task_values(rows: list[dict[str, Any]], prefix: str = "") -> dict[int, dict[str, float]]:
    """Round -> {task: metric mean over that task's clients}; ``prefix="val_"``: validation rows."""
    out: dict[int, dict[str, list[float]]] = {}
    for r in rows:
        if r["kind"] != "client":
            continue
        for task, metric, _, _ in METRICS:
            if r["task"] == task and prefix + metric in r:
                out.setdefault(r["round"], {}).setdefault(task, []).append(r[prefix + metric])
    return {rnd: {t: float(np.mean(v)) for t, v in d.items()} for rnd, d in out.items()}


def _client_flops(model: dict[str, Any], steps: int) -> float:
    """Training FLOPs per round of one client that trains the whole network (mean over tasks)."""
    import fedmtl.algorithms  # noqa: F401  (registers the model)
    from fedmtl.fedbone.flops import TRAIN_FACTOR, part_flops
    from fedmtl.fedbone.model import FedBoneNet, FedBoneNetParams
    from fedmtl.fedbone.tasks import TASKS as DENSE

    p = FedBoneNetParams(**{k: v for k, v in model.items() if k != "name"})
    per = [
        TRAIN_FACTOR
        * sum(part_flops(FedBoneNet((1, 28, 28), DENSE[t].spec.num_outputs, p), (1, 28, 28)).values())
        for t in TASKS
    ]
    return float(np.mean(per)) * steps * 16


def _params(model: dict[str, Any]) -> dict[str, int]:
    import fedmtl.algorithms  # noqa: F401
    from fedmtl.fedbone.model import FedBoneNet, FedBoneNetParams, count_params
    from fedmtl.fedbone.tasks import TASKS as DENSE

    p = FedBoneNetParams(**{k: v for k, v in model.items() if k != "name"})
    nets = [FedBoneNet((1, 28, 28), DENSE[t].spec.num_outputs, p) for t in TASKS]
    client = [sum(count_params(n, part) for part in ("embed", "adapter", "head")) for n in nets]
    return {"general": count_params(nets[0], "general"), "client_min": min(client), "client_max": max(client)}


def run_method(
    kind: str,
    model: dict,
    algo: dict,
    seed: int,
    rounds: int,
    steps: int,
    runs: Path,
    lr: float = REF_LR,
    val: float = 0.0,
) -> dict:
    """One method, one seed: the last round's metrics per task (test, and validation when ``val``)."""
    t0 = time.perf_counter()
    tag = f"{_slug(algo)}-w{model['width']}-lr{lr}-v{val}-s{seed}"
    if kind == "groups":
        final: dict[str, float] = {}
        final_val: dict[str, float] = {}
        bytes_round = []
        for task, _, _, _ in METRICS:
            res = fedmtl.run(
                config(seed, rounds, steps, model, algo, lr, val, tasks=[task], max_clients=2),
                out=runs / f"{algo['name']}-{task}-{tag}",
            )
            rows = _read(res.run_dir)
            vals = _task_values(rows)
            final[task] = vals[max(vals)][task]
            if val:
                vv = _task_values(rows, "val_")
                final_val[task] = vv[max(vv)][task]
            bytes_round += [r["bytes_up"] + r["bytes_down"] for r in rows if r["kind"] == "round"]
        # four 2-client federations make one 8-client round
        out: dict[str, Any] = {"final": final, "val": final_val, "bytes": 4 * float(np.mean(bytes_round))}
    else:
        cfg = config(seed, rounds, steps, model, algo, lr, val)
        res = fedmtl.run(cfg, out=runs / f"{algo['name']}-{tag}")
        rows = _read(res.run_dir)
        vals = _task_values(rows)
        vv = _task_values(rows, "val_") if val else {}
        out = {
            "final": vals[max(vals)],
            "val": vv[max(vv)] if vv else {},
            "bytes": float(np.mean([r["bytes_up"] + r["bytes_down"] for r in rows if r["kind"] == "round"])),
        }
        rounds_rows = [r for r in rows if r["kind"] == "round"]
        if "client_flops_per_client" in rounds_rows[-1]:
            out["client_flops"] = float(np.mean([r["client_flops_per_client"] for r in rounds_rows]))
            out["server_flops"] = float(np.mean([r["server_flops"] for r in rounds_rows]))
            out["conflict"] = float(np.nanmean([r["conflict_rate"] for r in rounds_rows]))
    if "client_flops" not in out:
        out["client_flops"] = _client_flops(model, steps)
    out["wall"] = time.perf_counter() - t0
    return out


def tune_lrs(seed: int, rounds: int, steps: int, runs: Path) -> dict[str, tuple[float, dict[float, float]]]:
    """Each method's lr: the one with the best validation Δm against Local at ``REF_LR`` (Local's own
    grid run at that lr is the reference), the grid bracketed within ``LR_BUDGET`` lrs, with every
    tried lr's score."""

    done: dict[tuple[str, float], dict[str, float]] = {}

    def val_of(label: str, kind: str, model: dict, algo: dict, lr: float) -> dict[str, float]:
        if (label, lr) not in done:
            done[label, lr] = run_method(kind, model, algo, seed, rounds, steps, runs, lr, VAL_FRACTION)[
                "val"
            ]
        return done[label, lr]

    ref = val_of(*METHODS[0], REF_LR)
    tuned = {}
    for label, kind, model, algo in METHODS:
        scores = {lr: delta_m(val_of(label, kind, model, algo, lr), ref) for lr in LR_GRID}
        while True:
            best = max(scores, key=lambda lr: scores[lr])
            side = edge_of([repr(lr) for lr in scores], repr(best))
            if side is None or len(scores) >= LR_BUDGET:
                break
            nxt = float(beyond([repr(lr) for lr in scores], side))
            scores[nxt] = delta_m(val_of(label, kind, model, algo, nxt), ref)
        tuned[label] = (best, scores)
    return tuned


def at_edge(scores: dict[float, float], lr: float) -> bool:
    """Whether ``lr`` is still the lowest or highest lr tried (bracketing ran out of budget)."""
    return edge_of([repr(x) for x in scores], repr(lr)) is not None


def _slug(algo: dict[str, Any]) -> str:
    return "-".join(f"{k}{v}" for k, v in sorted(algo.items()) if k != "name") or algo["name"]


def delta_m(values: dict[str, float], ref: dict[str, float]) -> float:
    """Mean relative change over the four tasks against ``ref`` (%), higher is better."""
    return metrics.delta_m(values, ref, {task: higher for task, _, higher, _ in METRICS})


def _ms(values: list[float], digits: int = 3) -> str:
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return "—"
    if arr.size == 1:
        return f"{arr[0]:.{digits}f}"
    return f"{arr.mean():.{digits}f} ± {arr.std():.{digits}f}"


def main(argv: list[str]) -> Path:
    started = time.perf_counter()
    ap = argparse.ArgumentParser(prog="fedmtl bench fedbone")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=5, help="local steps (batches) per round")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--quick", action="store_true", help="2 rounds, 2 steps, one seed: a smoke test")
    ap.add_argument("--runs", default="runs/bench/fedbone")
    ap.add_argument("--out", default=str(RESULTS / "fedbone.md"))
    a = ap.parse_args(argv)
    rounds, steps, seeds = (2, 2, [0]) if a.quick else (a.rounds, a.steps, a.seeds)
    runs = Path(a.runs) / time.strftime("%Y%m%d-%H%M%S")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # tuning on seed 0's validation rows, the same grid for every method
    tuned = tune_lrs(seeds[0], rounds, steps, runs)
    for label, (lr, scores) in tuned.items():
        print(f"tuned {label}: lr {lr} (val Δm {scores})", flush=True)
    results: dict[str, list[dict[str, Any]]] = {}
    for seed in seeds:
        for label, kind, model, algo in METHODS:
            r = run_method(kind, model, algo, seed, rounds, steps, runs, tuned[label][0])
            results.setdefault(label, []).append(r)
            print(f"seed {seed} {label}: final {r['final']} ({r['wall']:.0f} s)", flush=True)
        # the table after every seed, so a run cut short still leaves its finished seeds
        done = seeds[: seeds.index(seed) + 1]
        total = time.perf_counter() - started
        out.write_text("\n".join(report(results, tuned, rounds, steps, done, total, argv)) + "\n")
    return stamp(out, "fedbone", argv, started)


def report(
    results: dict[str, list[dict]],
    tuned: dict[str, tuple[float, dict[float, float]]],
    rounds: int,
    steps: int,
    seeds: list[int],
    total: float,
    argv: list[str],
) -> list[str]:
    large, small = _params(LARGE), _params(SMALL)
    local = results[METHODS[0][0]]
    cols = " | ".join(c for _, _, _, c in METRICS)
    lines = [
        "# FedBone on heterogeneous dense MNIST tasks",
        "",
        f"8 clients, 2 per task (digit / segment / edge / denoise), ~225 training and 75 test images each "
        f"(`mnist_dense`); {rounds} rounds, {steps} local steps of batch 16 per round, Adam on clients "
        f"(and on the server's general model, per batch, for the split methods); seeds {seeds}, mean ± "
        "std over seeds. Each metric is the last round's mean over the task's clients of the metric on "
        "the client's own test split. Δm is the mean relative change over the four tasks against Local "
        "(signed, higher is better).",
        "",
        f"**Tuning (equal budget).** Each method's lr (client and server lr together; Local, the "
        f"reference of every Δm, tuned the same way) from the grid {LR_GRID}, bracketed: while the "
        "choice is the lowest or highest lr the method tried, the next lr beyond it (geometric, the edge "
        f"times its ratio to its neighbour) is tried, up to {LR_BUDGET} lrs per method; chosen on seed "
        f"{seeds[0]}'s validation rows ({VAL_FRACTION:.0%} of each client's training images, held out of "
        f"training for the tuning runs only) by the last round's validation Δm against Local at lr "
        f"{REF_LR}; the test split is not read to choose. **edge**: a choice still at the lowest or "
        "highest lr tried when the budget ended.",
        "",
        "**Parameters.** Large network: general model "
        f"{large['general']:,} + client part (embedding + adapter + head) {large['client_min']:,}–"
        f"{large['client_max']:,} (the general model is "
        f"{large['general'] / large['client_max']:.0f}x the client part); the split methods keep the "
        "general model on the server, the two *large model on clients* rows train all of it on every "
        f"client. Small full model (Local, FedAvg): {small['general'] + small['client_min']:,}–"
        f"{small['general'] + small['client_max']:,} (tiny general model {small['general']:,}).",
        "",
        f"| Method | lr (tuned) | {cols} | Δm vs Local % | MB / round (up + down) | client MFLOPs / round "
        "| conflict rate |",
        "|---" * (len(METRICS) + 6) + "|",
    ]
    for label, _, _, _ in METHODS:
        rs = results[label]
        cells = [_ms([r["final"][t] for r in rs], 3 if m != "psnr" else 2) for t, m, _, _ in METRICS]
        dm = _ms([delta_m(r["final"], lo["final"]) for r, lo in zip(rs, local, strict=True)], 1)
        mb = _ms([r["bytes"] / 1e6 for r in rs], 2)
        fl = _ms([r["client_flops"] / 1e6 for r in rs], 0)
        conflict = _ms([r.get("conflict", float("nan")) for r in rs], 2)
        lr, scores = tuned[label]
        shown = f"{lr:.3g}" + (" **edge**" if at_edge(scores, lr) else "")
        lines.append(f"| {label} | {shown} | {' | '.join(cells)} | {dm} | {mb} | {fl} | {conflict} |")
    every = sorted({lr for _, scores in tuned.values() for lr in scores})
    lines += [
        "",
        "Validation Δm of each lr tried (seed "
        + str(seeds[0])
        + "; the grid, then bracketing; — = not tried):",
        "",
        "| Method | " + " | ".join(f"lr {lr:.3g}" for lr in every) + " |",
        "|---" * (len(every) + 1) + "|",
    ]
    for label, _, _, _ in METHODS:
        scores = tuned[label][1]
        cells = [f"{scores[lr]:.1f}" if lr in scores else "—" for lr in every]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    split = results[METHODS[-1][0]]
    lines += [
        "",
        "Server training FLOPs per round (split methods): "
        f"{_ms([r['server_flops'] / 1e9 for r in split], 2)} "
        "GFLOPs for all 8 clients; a client's own share is in the table.",
        "",
        "Notes: FedAvg per task group runs one 2-client federation per task (same client sizes, other "
        "images of the same pool). Multi-task FedAvg is `hierarchical` with `grouping: task`. "
        "Conflict rate: fraction of client pairs whose general-model gradients have negative cosine, "
        "averaged over the round's per-batch aggregations. "
        f"Total wall time {total / 60:.1f} min on a shared 2-core CPU.",
        "",
        f"Reproduce: `{' '.join(['fedmtl bench fedbone', *argv])}`",
        "",
    ]
    return lines


if __name__ == "__main__":
    import sys

    print(main(sys.argv[1:]))
