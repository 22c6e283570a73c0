"""Federations of 1,000 to 100,000 clients on one machine, and the LEAF path end to end.

Part 1 (scale): FedAvg and Ditto, 100 clients sampled per round, an MLP 64-32-10 on populations of
1,000 / 10,000 / 100,000 clients with 20-50 samples each, resampled from scikit-learn's digits
(``partition.kind: resample``: clients are index ranges into one pool). Each configuration runs in
a fresh process, so its peak resident memory is its own. Measured: seconds per training round
(median), seconds per evaluation round (1,000 sampled clients, ``eval.clients``), peak RSS, bytes a
checkpoint writes (the client-state segment of the states changed since the previous checkpoint,
and the checkpoint file), and the time ``fedmtl.resume`` takes to be back at work (load, rebuild,
reopen the client states) in another fresh process. One stress row runs Ditto at 100,000 clients
long enough that tens of thousands hold a personal model, with a 64 MiB state cache.

Part 2 (LEAF): MNIST written as LEAF data by ``fedmtl pack --format leaf`` (120 pseudo-writers of a
Dirichlet(0.5) split, LEAF's per-user train/test), read back through the LEAF path with
``data.input_shape: [1, 28, 28]`` and a CNN: FedAvg, Ditto and FedPer, 3 seeds.

Run with ``fedmtl bench scale [--quick]``; writes ``benchmarks/results/scale.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
POPULATIONS = (1_000, 10_000, 100_000)
PER_ROUND = 100


def scale_config(pop: int, algo: str, rounds: int, cache_mib: float = 1024.0) -> dict[str, Any]:
    return {
        "name": f"scale-{algo}-{pop}",
        "seed": 0,
        "data": {
            "dataset": "digits",
            "partition": {"kind": "resample", "num_clients": pop, "samples": [20, 50]},
            "normalize": "scale",
        },
        "model": {"name": "mlp", "hidden": [32]},
        "algorithm": {"name": algo},
        "clients": {"per_round": PER_ROUND},
        "train": {"rounds": rounds, "local_epochs": 1, "batch_size": 16, "lr": 0.1},
        "eval": {"every": max(1, rounds // 2), "clients": 1000, "global_test": True},
        "runtime": {"execution": "batched", "state_cache_mib": cache_mib},
        "output": {"progress": False},
    }


# ------------------------------------------------------------------------------------ one process
def measure_run(raw: dict[str, Any], out: Path) -> dict[str, Any]:
    """Run ``raw`` in this (fresh) process; what part 1 reports about it."""
    import fedmtl

    t0 = time.perf_counter()
    res = fedmtl.run(raw, out=out)
    wall = time.perf_counter() - t0
    walls = np.diff([0.0] + [r["wall_time"] for r in res.rounds])
    every = raw["eval"]["every"]
    train_rounds = [w for i, w in enumerate(walls, start=1) if i % every and i != len(walls)]
    eval_rounds = [w for i, w in enumerate(walls, start=1) if i % every == 0]
    segments = sorted((out / "clients").glob("seg-*.bin"))
    seg_bytes = [
        p.stat().st_size + (p.with_suffix("").with_suffix(".idx.npy")).stat().st_size for p in segments
    ]
    final = res.final
    return {
        "round_s": float(np.median(train_rounds)),
        "eval_s": float(np.median(eval_rounds)),
        "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "segment_bytes": float(np.median(seg_bytes)) if seg_bytes else 0.0,
        "segment_bytes_max": float(max(seg_bytes)) if seg_bytes else 0.0,
        "checkpoint_file_bytes": (out / "checkpoint.tree").stat().st_size,
        "states_on_disk": sum(p.stat().st_size for p in segments),
        "clients_with_state": int(final.get("clients_with_state", 0)) or _count_states(out),
        "accuracy": final["accuracy_mean"],
        "accuracy_ci95": final.get("accuracy_ci95", 0.0),
        "wall_s": wall,
    }


def _count_states(run_dir: Path) -> int:
    from fedmtl.experiment.records import RunDir

    saved = RunDir.open(run_dir).load_checkpoint()["clients"]
    segments = saved["segments"]
    ids: set[int] = set()
    for name in segments:
        ids.update(np.load(run_dir / "clients" / f"{name}.idx.npy")[:, 0].tolist())
    return len(ids)


def measure_resume(run_dir: Path) -> dict[str, Any]:
    """Time ``fedmtl.resume`` of a finished run given one more round, in this fresh process."""
    import yaml

    import fedmtl

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["train"]["rounds"] += 1
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (run_dir / "summary.json").unlink()
    t0 = time.perf_counter()
    res = fedmtl.resume(run_dir)
    return {"resume_s": time.perf_counter() - t0, "rounds": res.summary["rounds_completed"]}


def _child(args: list[str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=False, cwd=Path.cwd()
    )
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ LEAF part
def leaf_rows(rounds: int, seeds: list[int], work: Path, writers: int) -> list[str]:
    import fedmtl
    from fedmtl.config import parse_config
    from fedmtl.data import load_federated
    from fedmtl.data.export import write_leaf

    mnist = parse_config({"data": {"dataset": "mnist", "partition": {"kind": "dirichlet", "alpha": 0.5,
                                                                       "num_clients": 500},
                                   "max_clients": writers}}).data  # fmt: skip
    leaf = write_leaf(load_federated(mnist, seed=0), work / "leaf_mnist")
    methods = [
        ("FedAvg", {"name": "fedavg"}, "auto"),
        ("FedAvg, data.normalize: standardize", {"name": "fedavg"}, "standardize"),
        ("Ditto (lam 0.1)", {"name": "ditto", "lam": 0.1}, "auto"),
        ("FedPer", {"name": "fedper"}, "auto"),
    ]
    rows = []
    for label, algo, norm in methods:
        accs, worst, secs = [], [], []
        for seed in seeds:
            raw = {
                "name": f"leaf-{algo['name']}",
                "seed": seed,
                "data": {"dataset": "leaf", "file": str(leaf), "input_shape": [1, 28, 28], "normalize": norm},
                "model": {"name": "cnn", "channels": [16, 32], "fc": 64},
                "algorithm": algo,
                "clients": {"per_round": 20},
                "train": {"rounds": rounds, "local_epochs": 1, "batch_size": 32, "lr": 0.05},
                "eval": {"every": rounds},
                "runtime": {"execution": "auto"},
                "output": {"progress": False, "checkpoint_every": rounds},
            }
            t = time.perf_counter()
            res = fedmtl.run(raw, out=work / f"{raw['name']}-{norm}-s{seed}")
            secs.append(time.perf_counter() - t)
            accs.append(res.final["accuracy_mean"])
            worst.append(res.final["accuracy_worst10"])
            print(f"LEAF {label} seed {seed}: {accs[-1]:.4f}", flush=True)
        rows.append(
            f"| {label} | {np.mean(accs):.3f} ± {np.std(accs):.3f} "
            f"| {np.mean(worst):.3f} ± {np.std(worst):.3f} | {np.mean(secs):.0f} |"
        )
    return rows


# ------------------------------------------------------------------------------------ main
def main(argv: list[str]) -> Path:
    if argv[:1] == ["--child-run"]:
        raw = json.loads(argv[1])
        print(json.dumps(measure_run(raw, Path(argv[2]))))
        sys.exit(0)
    if argv[:1] == ["--child-resume"]:
        print(json.dumps(measure_resume(Path(argv[1]))))
        sys.exit(0)
    ap = argparse.ArgumentParser(prog="fedmtl bench scale")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--stress-rounds", type=int, default=600)
    ap.add_argument("--leaf-rounds", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--writers", type=int, default=120)
    ap.add_argument("--quick", action="store_true", help="short runs, one seed: a smoke test")
    ap.add_argument("--out", default=str(RESULTS / "scale.md"))
    a = ap.parse_args(argv)
    if a.quick:
        a.rounds, a.stress_rounds, a.leaf_rounds, a.seeds, a.writers = 6, 20, 2, [0], 100
    work = Path(tempfile.mkdtemp(prefix="fedmtl-scale-"))
    t_start = time.perf_counter()
    measured: dict[tuple[str, int], dict[str, Any]] = {}
    for algo in ("fedavg", "ditto"):
        for pop in POPULATIONS:
            run_dir = work / f"{algo}-{pop}"
            m = _child(["--child-run", json.dumps(scale_config(pop, algo, a.rounds)), str(run_dir)])
            m.update(_child(["--child-resume", str(run_dir)]))
            m["resume_s"] -= m["round_s"]  # back at work: the one extra round is not resume cost
            measured[(algo, pop)] = m
            print(f"{algo} {pop}: {m}", flush=True)
    stress_dir = work / "stress"
    stress = _child(
        ["--child-run", json.dumps(scale_config(100_000, "ditto", a.stress_rounds, 64.0)), str(stress_dir)]
    )
    print(f"stress: {stress}", flush=True)
    leaf = leaf_rows(a.leaf_rounds, a.seeds, work, a.writers)
    wall = time.perf_counter() - t_start
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()

    def row(algo: str, pop: int) -> str:
        m, base = measured[(algo, pop)], measured[(algo, POPULATIONS[0])]
        return (
            f"| {algo} | {pop:,} | {1000 * m['round_s']:.1f} | {m['round_s'] / base['round_s']:.2f}x "
            f"| {1000 * m['eval_s']:.0f} | {m['rss_mib']:.0f} | {m['segment_bytes'] / 1024:.0f} "
            f"| {m['checkpoint_file_bytes'] / 1024:.1f} | {m['clients_with_state']:,} | {m['resume_s']:.2f} "
            f"| {m['accuracy']:.3f} ± {m['accuracy_ci95']:.3f} |"
        )

    lines = [
        "# Scale: populations of 1,000 to 100,000 clients, and LEAF data",
        "",
        f"Written by `fedmtl bench scale{' --quick' if a.quick else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')} "
        f"at commit {commit or 'unknown'}; {platform.machine()} machine, {_cores()} cores, CPU only; "
        f"{wall / 60:.1f} min wall.",
        "",
        f"## Cost per round vs population ({a.rounds} rounds, {PER_ROUND} clients per round)",
        "",
        "Clients hold 20-50 samples drawn from digits (`partition.kind: resample`), MLP 64-32-10, one local "
        "epoch of batch 16, batched execution. Each run is a fresh process (its peak RSS is its own). "
        "`round` is the median training round, `eval` the median evaluation round (1,000 sampled clients, "
        "`eval.clients: 1000`, plus the global test set); `segment` is what a checkpoint writes for client "
        "state (the states changed since the previous checkpoint: the round's 100 clients), `checkpoint` the "
        "checkpoint file beside it (server state, round, best row); `resume` the seconds `fedmtl.resume` "
        "takes in a fresh process to be back at work (load, rebuild, reopen the states), less one round. "
        "Accuracy is the sampled clients' mean with its 95% interval.",
        "",
        "| algorithm | clients | round ms | vs 1,000 | eval ms | peak RSS MiB | segment KiB | checkpoint KiB "
        "| clients with state | resume s | accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *[row(algo, pop) for algo in ("fedavg", "ditto") for pop in POPULATIONS],
        "",
        f"## Ditto at 100,000 clients, {a.stress_rounds} rounds, `runtime.state_cache_mib: 64`",
        "",
        f"{stress['clients_with_state']:,} clients hold a personal model at the end "
        f"({stress['states_on_disk'] / 2**20:.0f} MiB of client state on disk in the run directory, at most "
        f"64 MiB of it in memory); peak RSS {stress['rss_mib']:.0f} MiB; median round "
        f"{1000 * stress['round_s']:.1f} ms; checkpoint segments {stress['segment_bytes'] / 1024:.0f} KiB "
        f"(median), {stress['segment_bytes_max'] / 2**20:.1f} MiB at most (a compaction rewrites every live "
        f"state once superseded copies outweigh them 3 to 1); accuracy {stress['accuracy']:.3f} ± "
        f"{stress['accuracy_ci95']:.3f}.",
        "",
        f"## LEAF path end to end ({a.writers} users, {a.leaf_rounds} rounds, seeds {a.seeds})",
        "",
        f"MNIST split into {a.writers} pseudo-writers (Dirichlet 0.5 over 500, the first {a.writers} kept), "
        "written as LEAF data (`fedmtl pack --format leaf`: `train/` and `test/` JSON with each user's own "
        "75/25 split) and read back with `data: {dataset: leaf, input_shape: [1, 28, 28]}`; CNN 16-32 "
        "channels, 64 hidden; 20 users per round, one local epoch, lr 0.05, not tuned. Accuracy is each "
        "user's model (personalised where the method has one) on that user's LEAF test samples; mean ± std "
        "over seeds. `normalize: auto` leaves LEAF pixels as stored in [0, 1]; the standardised row shows "
        "what per-pixel standardisation does to the same run.",
        "",
        "| method | mean accuracy | worst-10% | seconds per run |",
        "|---|---|---|---|",
        *leaf,
        "",
        f"Reproduce: `fedmtl bench scale --rounds {a.rounds} --stress-rounds {a.stress_rounds} "
        f"--leaf-rounds {a.leaf_rounds} --seeds {' '.join(map(str, a.seeds))} --writers {a.writers}`.",
        "",
    ]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return out


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if __name__ == "__main__":
    main(sys.argv[1:])
