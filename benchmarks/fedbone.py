"""FedBone on heterogeneous dense MNIST tasks: Local, FedAvg per task group, split learning with a
plain mean, FedBone (GPAggregation), FedBone without rescaling.

One federation per seed: 8 clients (2 per task: digit classification, foreground segmentation,
Sobel edge map, denoising), each with a few hundred MNIST images of its own (``mnist_dense``,
iid partition of the 60,000 training images into 200 parts, the first 8 used; 75/25 train/test).

- **Local**: each client trains its own *small* full model (the network clients can afford: the
  same embedding/adapter/head around a tiny general model), never communicating. Run per task
  group like FedAvg (``local``/``fedavg`` train every client with the federation's first task model,
  which only works when all heads share one structure).
- **FedAvg (task group)**: FedAvg of that small full model within each task group: one federation
  per task with the same number of clients of the same size (different images of the same pool).
- **Split (mean)**: split learning with the large general model on the server, client gradients
  of the general model averaged (GPAggregation off).
- **FedBone (GP)**: GPAggregation: history attention rescaling + conflict projection.
- **FedBone (GP, no rescale)**: projection only.

Every method does the same local steps with the same batch size and optimizer per round. Bytes are
up + down per round (split learning: activations and gradients; FedAvg: parameters); client FLOPs
are training FLOPs per round per client (3 x forward). Run with ``fedmtl bench fedbone``."""

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
    # (label, kind, model, algorithm)
    ("Local (small full model)", "groups", SMALL, {"name": "local"}),
    ("FedAvg per task group (small full model)", "groups", SMALL, {"name": "fedavg"}),
    ("Split learning, plain mean", "split", LARGE, {"name": "fedbone", "aggregation": "mean"}),
    ("FedBone (GP)", "split", LARGE, {"name": "fedbone", "aggregation": "gp"}),
    (
        "FedBone (GP, no rescaling)",
        "split",
        LARGE,
        {"name": "fedbone", "aggregation": "gp", "rescale": False},
    ),
]


def config(
    seed: int, rounds: int, steps: int, model: dict[str, Any], algo: dict[str, Any], **data: Any
) -> dict:
    return {
        "name": f"fedbone-bench-{algo['name']}",
        "seed": seed,
        "data": {
            "dataset": "mnist_dense",
            "partition": {"kind": "iid", "num_clients": 200},
            "max_clients": 8,
            "tasks": TASKS,
            **data,
        },
        "model": model,
        "algorithm": algo,
        "train": {"rounds": rounds, "local_steps": steps, "batch_size": 16, "optimizer": "adam", "lr": 0.003},
        "eval": {"every": max(1, rounds // 4)},
        "output": {"progress": False, "checkpoint_every": rounds},
    }


def _read(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _task_values(rows: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Round -> {task: primary metric mean over that task's clients}."""
    out: dict[int, dict[str, list[float]]] = {}
    for r in rows:
        if r["kind"] != "client":
            continue
        for task, metric, _, _ in METRICS:
            if r["task"] == task and metric in r:
                out.setdefault(r["round"], {}).setdefault(task, []).append(r[metric])
    return {rnd: {t: float(np.mean(v)) for t, v in d.items()} for rnd, d in out.items()}


def _flops_small(steps: int) -> float:
    """Training FLOPs per round of one client running the small full model (mean over tasks)."""
    import fedmtl.algorithms  # noqa: F401  (registers the model)
    from fedmtl.fedbone.flops import TRAIN_FACTOR, part_flops
    from fedmtl.fedbone.model import FedBoneNet, FedBoneNetParams
    from fedmtl.fedbone.tasks import TASKS as DENSE

    p = FedBoneNetParams(**{k: v for k, v in SMALL.items() if k != "name"})
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


def run_method(kind: str, model: dict, algo: dict, seed: int, rounds: int, steps: int, runs: Path) -> dict:
    t0 = time.perf_counter()
    if kind == "groups":
        final: dict[str, float] = {}
        best: dict[str, float] = {}
        bytes_round = []
        for task, _, higher, _ in METRICS:
            res = fedmtl.run(
                config(seed, rounds, steps, model, algo, tasks=[task], max_clients=2),
                out=runs / f"{algo['name']}-{task}-s{seed}",
            )
            rows = _read(res.run_dir)
            vals = _task_values(rows)
            final[task] = vals[max(vals)][task]
            pick = max if higher else min
            best[task] = pick(v[task] for v in vals.values())
            bytes_round += [r["bytes_up"] + r["bytes_down"] for r in rows if r["kind"] == "round"]
        # four 2-client federations make one 8-client round
        out = {"final": final, "best": best, "bytes": 4 * float(np.mean(bytes_round))}
    else:
        res = fedmtl.run(
            config(seed, rounds, steps, model, algo),
            out=runs / f"{algo['name']}-{kind}-{len(runs.name)}-s{seed}-{_slug(algo)}",
        )
        rows = _read(res.run_dir)
        vals = _task_values(rows)
        out = {
            "final": vals[max(vals)],
            "best": {t: (max if h else min)(v[t] for v in vals.values()) for t, _, h, _ in METRICS},
            "bytes": float(np.mean([r["bytes_up"] + r["bytes_down"] for r in rows if r["kind"] == "round"])),
        }
        rounds_rows = [r for r in rows if r["kind"] == "round"]
        if "client_flops_per_client" in rounds_rows[-1]:
            out["client_flops"] = float(np.mean([r["client_flops_per_client"] for r in rounds_rows]))
            out["server_flops"] = float(np.mean([r["server_flops"] for r in rounds_rows]))
            out["conflict"] = float(np.nanmean([r["conflict_rate"] for r in rounds_rows]))
    if "client_flops" not in out:
        out["client_flops"] = _flops_small(steps)
    out["wall"] = time.perf_counter() - t0
    return out


def _slug(algo: dict[str, Any]) -> str:
    return "-".join(f"{k}{v}" for k, v in sorted(algo.items()) if k != "name") or "default"


def delta_m(values: dict[str, float], ref: dict[str, float]) -> float:
    """Mean relative change over tasks against ``ref`` (%), signed so that higher is better."""
    terms = []
    for task, _, higher, _ in METRICS:
        rel = (values[task] - ref[task]) / abs(ref[task])
        terms.append(rel if higher else -rel)
    return 100.0 * float(np.mean(terms))


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
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true", help="2 rounds, 2 steps, one seed: a smoke test")
    ap.add_argument("--runs", default="runs/bench/fedbone")
    ap.add_argument("--out", default=str(RESULTS / "fedbone.md"))
    a = ap.parse_args(argv)
    rounds, steps, seeds = (2, 2, [0]) if a.quick else (a.rounds, a.steps, a.seeds)
    runs = Path(a.runs) / time.strftime("%Y%m%d-%H%M%S")
    t_start = time.perf_counter()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {}
    for seed in seeds:
        for label, kind, model, algo in METHODS:
            r = run_method(kind, model, algo, seed, rounds, steps, runs)
            results.setdefault(label, []).append(r)
            print(f"seed {seed} {label}: final {r['final']} ({r['wall']:.0f} s)", flush=True)
        # the table after every seed, so a run cut short still leaves its finished seeds
        done = seeds[: seeds.index(seed) + 1]
        total = time.perf_counter() - t_start
        out.write_text("\n".join(report(results, rounds, steps, done, total, argv)) + "\n")
    return stamp(out, "fedbone", argv, started)


def report(
    results: dict[str, list[dict]], rounds: int, steps: int, seeds: list[int], total: float, argv: list[str]
) -> list[str]:
    large, small = _params(LARGE), _params(SMALL)
    local = results[METHODS[0][0]]
    cols = " | ".join(c for _, _, _, c in METRICS)
    lines = [
        "# FedBone on heterogeneous dense MNIST tasks",
        "",
        f"8 clients, 2 per task (digit / segment / edge / denoise), ~225 training and 75 test images each "
        f"(`mnist_dense`); {rounds} rounds, {steps} local steps of batch 16 per round, Adam lr 0.003 on "
        f"clients (and on the server's general model, per batch); seeds {seeds}, mean ± std over seeds. "
        "Each metric is the mean over the task's clients of the metric on the client's own test split. "
        "Δm is the mean relative change over the four tasks against Local (signed, higher is better).",
        "",
        "**Parameters.** Large general model (server, split methods): "
        f"{large['general']:,}; client part (embedding + adapter + head): {large['client_min']:,}–"
        f"{large['client_max']:,} per client (the general model is "
        f"{large['general'] / large['client_max']:.0f}x larger). Small full model (Local, FedAvg): "
        f"{small['general'] + small['client_min']:,}–{small['general'] + small['client_max']:,} "
        f"(tiny general model {small['general']:,}).",
        "",
        "## Final round",
        "",
        f"| Method | {cols} | Δm vs Local % | MB / round (up + down) | client MFLOPs / round "
        "| conflict rate |",
        "|---" * (len(METRICS) + 5) + "|",
    ]
    for label, _, _, _ in METHODS:
        rs = results[label]
        cells = [_ms([r["final"][t] for r in rs], 3 if m != "psnr" else 2) for t, m, _, _ in METRICS]
        dm = _ms([delta_m(r["final"], lo["final"]) for r, lo in zip(rs, local, strict=True)], 1)
        mb = _ms([r["bytes"] / 1e6 for r in rs], 2)
        fl = _ms([r["client_flops"] / 1e6 for r in rs], 0)
        conflict = _ms([r.get("conflict", float("nan")) for r in rs], 2)
        lines.append(f"| {label} | {' | '.join(cells)} | {dm} | {mb} | {fl} | {conflict} |")
    lines += [
        "",
        "## Best evaluated round (per task)",
        "",
        f"| Method | {cols} |",
        "|---" * (len(METRICS) + 1) + "|",
    ]
    for label, _, _, _ in METHODS:
        rs = results[label]
        cells = [_ms([r["best"][t] for r in rs], 3 if m != "psnr" else 2) for t, m, _, _ in METRICS]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    split = results[METHODS[3][0]]
    lines += [
        "",
        "Server training FLOPs per round (split methods): "
        f"{_ms([r['server_flops'] / 1e9 for r in split], 2)} "
        "GFLOPs for all 8 clients; a client's own share is in the table.",
        "",
        "Notes: FedAvg per task group runs one 2-client federation per task (same client sizes, other "
        "images of the same pool). Evaluation every "
        f"{max(1, rounds // 4)} rounds. Conflict rate: fraction of client pairs whose general-model "
        "gradients have negative cosine, averaged over the round's per-batch aggregations. "
        f"Total wall time {total / 60:.1f} min on a shared 2-core CPU.",
        "",
        f"Reproduce: `{' '.join(['fedmtl bench fedbone', *argv])}`",
        "",
    ]
    return lines


if __name__ == "__main__":
    import sys

    print(main(sys.argv[1:]))
