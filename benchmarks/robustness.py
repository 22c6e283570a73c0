"""Robust aggregation under malicious clients on MNIST.

100 clients (Dirichlet alpha = 0.5), 20 sampled per round. Every aggregation chain is run with no
attacker (shared by all attack kinds) and with 10/20/30% of the clients malicious for each attack
kind: sign flipping, scaling (model replacement, x20), Gaussian updates, label flipping and a
pixel-trigger backdoor (whose success rate on triggered test images is reported too). The full
grid runs on one seed; the 0% and 30% rows are repeated on more seeds (mean ± std).

Run with ``fedmtl bench robustness [--quick]``; writes ``benchmarks/results/robustness.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

import fedmtl
import fedmtl.experiment.run as run_mod
from _mnist_setting import mnist_config  # benchmarks/ is on sys.path under fedmtl bench
from _provenance import write_table  # benchmarks/ is on sys.path under fedmtl bench

RESULTS = Path(__file__).resolve().parent / "results"

AGGREGATORS: list[tuple[str, list[Any]]] = [
    ("mean (FedAvg)", []),
    ("clip (adaptive) + mean", [{"name": "clip", "max_norm": 1.0, "adaptive": True, "target_quantile": 0.5}]),
    ("median", ["median"]),
    ("trimmed mean 30%", [{"name": "trimmed_mean", "trim": 0.3}]),
    ("Krum f=6", [{"name": "krum", "f": 6}]),
    ("Multi-Krum f=6", [{"name": "multi_krum", "f": 6}]),
]
KINDS = ["sign_flip", "scale", "gaussian", "label_flip", "backdoor"]
ATTACK_OPTS: dict[str, dict[str, Any]] = {
    "sign_flip": {"scale": 3.0},
    "scale": {},  # x clients per round = 20: model replacement
    "gaussian": {"noise_std": 1.0},
    "label_flip": {},
    "backdoor": {"target": 0, "poison_rate": 0.5, "trigger_size": 4},
}


def config(seed: int, rounds: int, agg: list[Any], kind: str | None, fraction: float) -> dict[str, Any]:
    cfg = {**mnist_config(seed, rounds), "aggregation": agg}
    if kind is not None:
        cfg["attack"] = {"enabled": True, "kind": kind, "fraction": fraction, **ATTACK_OPTS[kind]}
    return cfg


def cache_data() -> None:
    """Every run of a seed uses the same federation: load it once per process (read-only)."""
    if not hasattr(run_mod.load_federated, "cache_info"):
        original = run_mod.load_federated
        memo: dict[str, Any] = {}

        @functools.wraps(original)
        def cached(dcfg: Any, seed: int) -> Any:
            key = json.dumps([dcfg.model_dump(mode="json"), seed], sort_keys=True)
            if key not in memo:
                memo[key] = original(dcfg, seed)
            return memo[key]

        cached.cache_info = lambda: len(memo)  # type: ignore[attr-defined]
        run_mod.load_federated = cached  # type: ignore[assignment]


def one(
    runs: Path, seed: int, rounds: int, label: str, agg: list[Any], kind: str | None, frac: float
) -> dict:
    name = f"{label.split()[0]}-{kind or 'none'}-{int(frac * 100)}-s{seed}"
    res = fedmtl.run(config(seed, rounds, agg, kind, frac), out=runs / name)
    f = res.final
    out = {"acc": f["global_accuracy"], "asr": f.get("backdoor_asr")}
    print(
        f"{name}: acc {out['acc']:.4f}" + (f" asr {out['asr']:.3f}" if out["asr"] is not None else ""),
        flush=True,
    )
    return out


def _cell(vals: list[dict], key: str = "acc") -> str:
    xs = [v[key] for v in vals if v.get(key) is not None]
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{np.mean(xs):.3f} ± {np.std(xs):.3f}"


def main(argv: list[str]) -> Path:
    started = time.perf_counter()
    ap = argparse.ArgumentParser(prog="fedmtl bench robustness")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="first: full grid; rest: key rows"
    )
    ap.add_argument("--quick", action="store_true", help="2 rounds, one seed, 30%% only: a smoke test")
    ap.add_argument("--runs", default="runs/bench/robustness")
    ap.add_argument("--out", default=str(RESULTS / "robustness.md"))
    a = ap.parse_args(argv)
    rounds, seeds, fractions = (2, [0], [0.3]) if a.quick else (a.rounds, a.seeds, a.fractions)
    runs = Path(a.runs) / time.strftime("%Y%m%d-%H%M%S")
    cache_data()
    t0 = time.perf_counter()
    key_frac = max(fractions)
    # results[(agg label, kind, fraction)] -> list over seeds
    results: dict[tuple[str, str | None, float], list[dict]] = {}
    for i, seed in enumerate(seeds):
        for label, agg in AGGREGATORS:
            results.setdefault((label, None, 0.0), []).append(one(runs, seed, rounds, label, agg, None, 0.0))
            for kind in KINDS:
                for frac in fractions if i == 0 else [key_frac]:
                    r = one(runs, seed, rounds, label, agg, kind, frac)
                    results.setdefault((label, kind, frac), []).append(r)
    wall = time.perf_counter() - t0

    labels = [lab for lab, _ in AGGREGATORS]
    head = "| attack | malicious | " + " | ".join(labels) + " |"
    sep = "|---|---|" + "---|" * len(labels)
    grid = [head, sep]
    grid.append("| none | 0% | " + " | ".join(_cell(results[(lab, None, 0.0)][:1]) for lab in labels) + " |")
    for kind in KINDS:
        for frac in fractions:
            cells = []
            for lab in labels:
                v = results[(lab, kind, frac)][:1]
                c = _cell(v)
                if kind == "backdoor":
                    c += f" / {_cell(v, 'asr')}"
                cells.append(c)
            grid.append(f"| {kind} | {int(frac * 100)}% | " + " | ".join(cells) + " |")
    key = [head, sep]
    key.append("| none | 0% | " + " | ".join(_cell(results[(lab, None, 0.0)]) for lab in labels) + " |")
    for kind in KINDS:
        cells = []
        for lab in labels:
            v = results[(lab, kind, key_frac)]
            cells.append(_cell(v) + (f" / {_cell(v, 'asr')}" if kind == "backdoor" else ""))
        key.append(f"| {kind} | {int(key_frac * 100)}% | " + " | ".join(cells) + " |")
    seeds_txt = " ".join(map(str, seeds))
    lines = [
        "# Robust aggregation under malicious clients (MNIST)",
        "",
        "MNIST, 100 clients (Dirichlet alpha = 0.5 label skew), 20 clients sampled per round, "
        f"{rounds} rounds, MLP 784-64-10, 10 local SGD steps per round (batch 32, lr 0.05), "
        "FedAvg server step. Cells: "
        "accuracy of the global model on the official 10,000-image test set after the last round; "
        "for the backdoor also its attack success rate (ASR: triggered test images of other classes "
        "classified as the target 0), `accuracy / ASR`. "
        "Malicious clients are a seeded fixed fraction of the 100; a round holds as many as sampling "
        "draws (on average the same fraction of the 20).",
        "",
        "Attacks: `sign_flip` sends -3x its update; `scale` sends 20x (model replacement); `gaussian` "
        "sends N(0, 1) noise; `label_flip` trains on labels c -> 9 - c; `backdoor` stamps a 4x4 white "
        "square on half of its images (other than class 0) and labels them 0. Aggregators: "
        "`clip (adaptive)` clips every update to the running median of update norms (Andrew et al.) "
        "before the mean; trimmed mean drops 30% at each end per coordinate; Krum/Multi-Krum assume "
        "f = 6 of 20 Byzantine (Multi-Krum averages the best 14).",
        "",
        f"## Key rows: 0% and {int(key_frac * 100)}% malicious, seeds {seeds_txt} (mean ± std)",
        "",
        *key,
        "",
        f"## Full grid: seed {seeds[0]}",
        "",
        *grid,
        "",
        f"{len([v for vs in results.values() for v in vs])} runs, {wall / 60:.1f} min wall in one process "
        "on a shared 2-core machine.",
        "",
        f"Reproduce: `fedmtl bench robustness --rounds {rounds} --seeds {seeds_txt} "
        f"--fractions {' '.join(str(f) for f in fractions)}`.",
        "",
    ]
    return write_table(a.out, lines, "robustness", argv, started)
