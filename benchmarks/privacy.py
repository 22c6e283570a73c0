"""Accuracy vs privacy on MNIST: client-level DP-FedAvg at several noise multipliers (fixed and
adaptive clipping) and sample-level DP-SGD, with epsilon from ``dp_accounting``.

100 clients (Dirichlet alpha = 0.5), 20 sampled per round. Epsilon is what the run's round rows
report (RDP, Poisson sampling, delta = 1e-5); the table adds the PLD accountant's value and the
exact fixed-size (without replacement, replace-one) RDP value for the same releases.

Run with ``fedmtl bench privacy [--quick]``; writes ``benchmarks/results/privacy.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

import fedmtl
from _mnist_setting import mnist_config  # benchmarks/ is on sys.path under fedmtl bench
from fedmtl.privacy.accountant import epsilon

RESULTS = Path(__file__).resolve().parent / "results"
DELTA = 1e-5
CLIP = 0.2

SETTINGS: list[tuple[str, dict[str, Any] | None]] = [("no DP", None)]
SETTINGS += [
    (f"client DP, fixed clip {CLIP}, z = {z}", {"noise_multiplier": z, "clip_norm": CLIP})
    for z in (0.3, 0.5, 1.0, 2.0)
]
SETTINGS += [
    (
        f"client DP, adaptive clip (median), z = {z}",
        {"noise_multiplier": z, "clip_norm": CLIP, "clipping": "adaptive", "clip_lr": 0.2},
    )
    for z in (0.5, 1.0)
]
SETTINGS += [
    (f"sample DP-SGD, clip 1.0, z = {z}", {"level": "sample", "noise_multiplier": z, "clip_norm": 1.0})
    for z in (0.7, 1.0)
]


def config(seed: int, rounds: int, privacy: dict[str, Any] | None) -> dict[str, Any]:
    cfg = mnist_config(seed, rounds)
    if privacy is not None:
        cfg["privacy"] = {"enabled": True, "delta": DELTA, **privacy}
    return cfg


def cache_data() -> None:
    """Every run of a seed uses the same federation: load it once per process (read-only)."""
    import fedmtl.experiment.run as run_mod

    if getattr(run_mod.load_federated, "memo", None) is not None:
        return
    original = run_mod.load_federated
    memo: dict[str, Any] = {}

    def cached(dcfg: Any, seed: int) -> Any:
        key = json.dumps([dcfg.model_dump(mode="json"), seed], sort_keys=True)
        if key not in memo:
            memo[key] = original(dcfg, seed)
        return memo[key]

    cached.memo = memo  # type: ignore[attr-defined]
    run_mod.load_federated = cached  # type: ignore[assignment]


def _ms(xs: list[float], digits: int = 3) -> str:
    a = np.asarray(xs, dtype=float)
    return f"{a.mean():.{digits}f} ± {a.std():.{digits}f}" if len(a) > 1 else f"{a[0]:.{digits}f}"


def main(argv: list[str]) -> Path:
    ap = argparse.ArgumentParser(prog="fedmtl bench privacy")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true", help="2 rounds, one seed: a smoke test")
    ap.add_argument("--runs", default="runs/bench/privacy")
    ap.add_argument("--out", default=str(RESULTS / "privacy.md"))
    a = ap.parse_args(argv)
    rounds, seeds = (2, [0]) if a.quick else (a.rounds, a.seeds)
    runs = Path(a.runs) / time.strftime("%Y%m%d-%H%M%S")
    cache_data()
    t0 = time.perf_counter()
    rows = []
    for label, priv in SETTINGS:
        accs, eps, worst = [], [], []
        for seed in seeds:
            name = label.replace(" ", "").replace(",", "-").replace("=", "") + f"-s{seed}"
            res = fedmtl.run(config(seed, rounds, priv), out=runs / name)
            f = res.final
            accs.append(f["global_accuracy"])
            worst.append(f["accuracy_worst10"])
            eps.append(f.get("epsilon", 0.0))
            print(f"{name}: acc {accs[-1]:.4f} eps {eps[-1]:.3f}", flush=True)
        extra = "—", "—"
        if priv is not None and priv.get("level", "client") == "client":
            z = priv["noise_multiplier"]
            extra = (
                f"{epsilon(z, rounds, DELTA, 20, 100, 'poisson', 'pld'):.2f}",
                f"{epsilon(z, rounds, DELTA, 20, 100, 'without_replacement', 'rdp'):.2f}",
            )
        e = f"{np.mean(eps):.2f}" if priv is not None else "∞"
        rows.append(f"| {label} | {_ms(accs)} | {_ms(worst)} | {e} | {extra[0]} | {extra[1]} |")
    wall = time.perf_counter() - t0
    big = {z: epsilon(z, rounds, DELTA, 1000, 100_000) for z in (0.5, 1.0)}
    lines = [
        "# Accuracy vs privacy (MNIST)",
        "",
        f"MNIST, 100 clients (Dirichlet alpha = 0.5), 20 sampled per round (q = 0.2), {rounds} rounds, "
        "MLP 784-64-10, 10 local SGD steps per round (batch 32, lr 0.05); seeds "
        f"{' '.join(map(str, seeds))} (mean ± std). Accuracy: global model on the 10,000-image test set; "
        "worst-10%: 10th percentile of the clients' own test splits. delta = 1e-5.",
        "",
        "Client DP is DP-FedAvg: each client clips its update (L2), the server averages uniformly and adds "
        "N(0, (z C / m)^2) to the mean of the m updates, i.e. z C on the sum. With adaptive clipping the "
        "bound follows the median update norm from a noisy count and the update noise is raised so that "
        "the total still costs z. Sample DP-SGD clips every per-sample gradient inside local training; "
        "its epsilon is the largest over clients (per-client accountant over the local steps it did, "
        "Poisson batches).",
        "",
        "| setting | accuracy | worst-10% client acc | epsilon (RDP, Poisson; as reported) "
        "| epsilon (PLD) | epsilon (RDP, fixed-size sampling, replace-one) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "DP-FedAvg's noise is set per round on the *sum*, so with only 20 clients per round the mean "
        "carries noise of std z C / 20 per coordinate on a 51k-parameter model: the accuracy cost above is "
        "that of a small federation. The same z over the same rounds with 1,000 of 100,000 clients per "
        f"round would give epsilon {big[0.5]:.2f} (z = 0.5) and {big[1.0]:.2f} (z = 1.0) "
        "at 50x less noise per coordinate on the mean (RDP, Poisson).",
        "",
        "Secure aggregation's overhead (time and bytes at 10, 100 and 1,000 clients, dropouts) is in "
        "[secagg.md](secagg.md); `privacy.noise_at: client` adds the DP noise in shares on the clients "
        "before masking.",
        "",
        f"{len(SETTINGS) * len(seeds)} runs, {wall / 60:.1f} min wall on a shared 2-core machine.",
        "",
        f"Reproduce: `fedmtl bench privacy --rounds {rounds} --seeds {' '.join(map(str, seeds))}`.",
        "",
    ]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return out
