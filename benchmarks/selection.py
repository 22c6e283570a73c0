"""Client-side sample selection on MNIST with noisy, redundant and poisoned clients.

100 clients (Dirichlet alpha = 0.5), FedAvg, 10 clients per round, a small MLP multi-task
autoencoder; the corruption harness (``data.corrupt``) gives exact ground truth, so detection
precision and recall are measured, not guessed. Rows:

- clean, and 40% closed-set (symmetric label flips) / open-set (grey photo crops) noise on every
  client, without selection and with OCSVM, IsolationForest (global detectors, nu / contamination
  set to the true rate 0.4 as in the authors' code: an oracle) and the adaptive loss threshold;
- the same detectors with the one-sided rule (a flagged sample is dropped only when its loss is
  above the median), and with nu / contamination mis-specified (0.2 for a true rate of 0.4);
- duplicates (one copy of 50% of each client's samples) with and without the near-duplicate filter;
- a backdoor (10% malicious clients, a 3x3 trigger on half their samples, target 0) with and
  without selection, with the attack success rate of the final global model.

Run with ``fedmtl bench selection [--quick]``; writes ``benchmarks/results/selection.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

import fedmtl
from _provenance import stamp  # benchmarks/ is on sys.path under fedmtl bench
from fedmtl.config import parse_config
from fedmtl.data.corrupt import apply_trigger, attack_success_rate
from fedmtl.experiment.records import RunDir
from fedmtl.experiment.run import build
from fedmtl.training.local import predict
from fedmtl.training.tensors import to_torch

RESULTS = Path(__file__).resolve().parent / "results"
NOISE = 0.4
START, REFIT = 8, 4
LOCAL_STEPS = 15

OCSVM = {"method": "ocsvm", "nu": NOISE}
IFOREST = {"method": "iforest", "contamination": NOISE}
THRESHOLD = {"method": "threshold"}
CLOSED = {"enabled": True, "label_flip": NOISE}
OPEN = {"enabled": True, "open_set": NOISE}
DUPS = {"enabled": True, "duplicate": 0.5}
BACKDOOR = {"enabled": True, "backdoor": {"fraction": 0.1, "rate": 0.5, "target": 0, "size": 3}}

# (group, label, corruption, selection or None, main row: all seeds / else the extra seeds)
ROWS: list[tuple[str, str, dict[str, Any] | None, dict[str, Any] | None, bool]] = [
    ("clean", "no selection", None, None, True),
    ("closed-set 0.4", "no selection", CLOSED, None, True),
    ("closed-set 0.4", "OCSVM (nu 0.4)", CLOSED, OCSVM, True),
    ("closed-set 0.4", "IF (contamination 0.4)", CLOSED, IFOREST, True),
    ("closed-set 0.4", "adaptive threshold", CLOSED, THRESHOLD, True),
    ("closed-set 0.4", "OCSVM one-sided", CLOSED, {**OCSVM, "one_sided": True}, False),
    ("closed-set 0.4", "IF one-sided", CLOSED, {**IFOREST, "one_sided": True}, False),
    ("closed-set 0.4", "OCSVM nu 0.2 (mis-specified)", CLOSED, {**OCSVM, "nu": 0.2}, False),
    (
        "closed-set 0.4",
        "IF contamination 0.2 (mis-specified)",
        CLOSED,
        {**IFOREST, "contamination": 0.2},
        False,
    ),
    ("open-set 0.4", "no selection", OPEN, None, True),
    ("open-set 0.4", "OCSVM (nu 0.4)", OPEN, OCSVM, True),
    ("open-set 0.4", "IF (contamination 0.4)", OPEN, IFOREST, True),
    ("open-set 0.4", "adaptive threshold", OPEN, THRESHOLD, True),
    ("open-set 0.4", "OCSVM one-sided", OPEN, {**OCSVM, "one_sided": True}, False),
    ("open-set 0.4", "IF one-sided", OPEN, {**IFOREST, "one_sided": True}, False),
    ("duplicates 50%", "no selection", DUPS, None, False),
    ("duplicates 50%", "near-duplicate filter", DUPS, {"method": "none", "dedup": True}, False),
    ("backdoor", "no selection", BACKDOOR, None, False),
    ("backdoor", "IF one-sided", BACKDOOR, {**IFOREST, "one_sided": True}, False),
]


def config(corrupt: dict[str, Any] | None, selection: dict[str, Any] | None, rounds: int, seed: int) -> dict:
    cfg: dict[str, Any] = {
        "seed": seed,
        "data": {"dataset": "mnist", "partition": {"kind": "dirichlet", "alpha": 0.5, "num_clients": 100}},
        "model": {"name": "autoencoder", "hidden": [128], "code": 32, "w_ce": 1.0, "w_re": 1.0},
        "algorithm": {"name": "fedavg"},
        "train": {"rounds": rounds, "local_steps": LOCAL_STEPS, "batch_size": 32, "lr": 0.1},
        "clients": {"per_round": 10},
        "runtime": {"execution": "batched"},
        "eval": {"every": 1},
        "output": {"progress": False, "checkpoint_every": rounds},
    }
    if corrupt is not None:
        cfg["data"]["corrupt"] = corrupt
    if selection is not None:
        cfg["selection"] = {"enabled": True, "start_round": START, "refit_every": REFIT, **selection}
    return cfg


def _asr(cfg: dict[str, Any], run_dir: Path) -> float:
    """Attack success rate of the final global model on the triggered global test set."""
    parsed = parse_config(cfg)
    data, algo, _ = build(parsed)
    params = algo.global_params(RunDir(run_dir).load_checkpoint()["server"])
    b = parsed.data.corrupt.backdoor
    x = apply_trigger(data.x_global_test, b.size, b.value)
    pred = predict(algo.ctx.model, to_torch(params), x).argmax(1).numpy()
    return attack_success_rate(pred, data.y_global_test, b.target)


def measure_run(cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    rd = RunDir(out) if (out / "summary.json").is_file() else None
    if rd is not None:  # finished earlier (--reuse): read it back instead of running it again
        summary = rd.read_summary() or {}
        rounds = [r for r in rd.read_metrics() if r.get("kind") == "round"]
        run_dir = out
    else:
        res = fedmtl.run(cfg, out=out)
        summary, rounds, run_dir = res.summary, res.rounds, res.run_dir
    acc = [r.get("global_accuracy", float("nan")) for r in rounds]
    active = [r for r in rounds if "selection_samples" in r]
    n = sum(r["selection_samples"] for r in active)
    kept = sum(r["selection_kept"] for r in active)
    tp = sum(r.get("selection_true_drops", 0) for r in active)
    bad = sum(r.get("selection_bad", 0) for r in active)
    out_row = {
        "final": acc[-1],
        "best": float(np.nanmax(acc)),
        "curve": acc,
        "kept": kept / n if n else 1.0,
        "precision": tp / (n - kept) if n - kept > 0 and bad else float("nan"),
        "recall": tp / bad if bad and active else float("nan"),
        "base": bad / n if bad and n else float("nan"),  # precision of dropping at random
        "wall": summary["wall_time"],
        "asr": float("nan"),
    }
    if cfg["data"].get("corrupt", {}).get("backdoor"):
        out_row["asr"] = _asr(cfg, run_dir)
    return out_row


def _ms(values: list[float], digits: int = 3) -> str:
    arr = np.asarray(values, dtype=float)
    if arr.size == 0 or np.isnan(arr).all():
        return "—"
    if arr.size == 1:
        return f"{arr[0]:.{digits}f}"
    return f"{np.nanmean(arr):.{digits}f} ± {np.nanstd(arr):.{digits}f}"


def _rounds_to(curve: list[float], target: float) -> float:
    hit = [i + 1 for i, a in enumerate(curve) if a == a and a >= target]
    return float(hit[0]) if hit else float("nan")


def plot(results: list[tuple[str, str, list[int], list[dict[str, Any]]]], path: Path) -> None:
    """Test accuracy per round (mean over seeds) for the clean and the noisy rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = ["closed-set 0.4", "open-set 0.4"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    clean = next(r for r in results if r[0] == "clean")
    for ax, group in zip(axes, groups, strict=True):
        for g, label, _, per_seed in [clean, *[r for r in results if r[0] == group]]:
            curve = np.nanmean([r["curve"] for r in per_seed], axis=0)
            ax.plot(np.arange(1, len(curve) + 1), curve, label=f"{g}: {label}" if g == "clean" else label)
        ax.axvline(START, color="grey", lw=0.8, ls=":")
        ax.set_title(f"MNIST, {group} noise")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("global test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> Path:
    started = time.perf_counter()
    ap = argparse.ArgumentParser(prog="fedmtl bench selection")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the main rows")
    ap.add_argument("--extra-seeds", type=int, nargs="+", default=[0], help="seeds of the other rows")
    ap.add_argument("--quick", action="store_true", help="12 rounds, one seed, main rows only (smoke test)")
    ap.add_argument("--runs", default="runs/bench/selection")
    ap.add_argument("--reuse", help="a run folder of an earlier invocation: finished runs are read back")
    ap.add_argument("--out", default=str(RESULTS / "selection.md"))
    a = ap.parse_args(argv)
    rounds, seeds, extra = (12, [0], []) if a.quick else (a.rounds, a.seeds, a.extra_seeds)
    runs = Path(a.reuse) if a.reuse else Path(a.runs) / time.strftime("%Y%m%d-%H%M%S")
    t0 = time.perf_counter()
    results: list[tuple[str, str, list[int], list[dict[str, Any]]]] = []
    for i, (group, label, corrupt, selection, main_row) in enumerate(ROWS):
        row_seeds = seeds if main_row else extra
        if not row_seeds:
            continue
        per_seed = []
        for seed in row_seeds:
            cfg = config(corrupt, selection, rounds, seed)
            r = measure_run(cfg, runs / f"row{i:02d}-s{seed}")
            per_seed.append(r)
            print(
                f"[{group}] {label} seed {seed}: final {r['final']:.4f} kept {r['kept']:.3f} "
                f"precision {r['precision']:.3f} recall {r['recall']:.3f} asr {r['asr']:.3f} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        results.append((group, label, row_seeds, per_seed))
    clean = float(np.mean([r["final"] for r in results[0][3]]))
    target = 0.9 * clean
    lines = [
        "# Sample selection on MNIST (noisy, redundant and poisoned clients)",
        "",
        f"MNIST, 100 clients (Dirichlet alpha 0.5, 25% of each client's data is its test split), FedAvg, "
        f"10 clients per round, {rounds} rounds, {LOCAL_STEPS} local SGD steps per round (batch 32, lr 0.1), "
        "batched client execution. Model: MLP multi-task autoencoder 784-128-32 (code) with a linear "
        "classifier head on the code and a 32-128-784 sigmoid decoder, loss CE + MSE (w_ce = w_re = 1; "
        "the paper's w_ce = 0.05 learns too slowly for this CPU budget). Selection starts at round "
        f"{START} and global detectors are refitted every {REFIT} rounds on the score vectors "
        "[CE, reconstruction MSE] that the round's clients send (sizes: n_samples x 2 float32 per "
        "client in refit rounds). Noise hits 40% of every client's training samples.",
        "",
        "Accuracy: the final global model on the official 10,000-image test set. Precision / recall: "
        "dropped samples against the harness's ground truth, pooled over every client-round from the "
        "start round on; kept: fraction of the scored samples trained on. Rounds to 90%: first round "
        f"whose test accuracy reaches 90% of the clean run's final accuracy ({target:.4f}); — = never. "
        + (
            f"Every row: mean ± std over seeds {seeds}."
            if extra == seeds
            else f"Main rows: mean ± std over seeds {seeds}; rows marked * ran with seeds {extra} only "
            "(to fit the benchmark's time budget on a shared 2-core machine)."
        ),
        "",
        "| Data | Selection | Final acc | Best acc | Precision | (random drop) | Recall | Kept | "
        "Rounds to 90% | Attack success | Seeds |",
        "|---" * 11 + "|",
    ]
    for group, label, row_seeds, per_seed in results:
        star = "" if row_seeds == seeds else " *"
        lines.append(
            f"| {group} | {label}{star} | {_ms([r['final'] for r in per_seed], 4)} | "
            f"{_ms([r['best'] for r in per_seed], 4)} | {_ms([r['precision'] for r in per_seed])} | "
            f"{_ms([r['base'] for r in per_seed], 2)} | {_ms([r['recall'] for r in per_seed])} | "
            f"{_ms([r['kept'] for r in per_seed])} | "
            f"{_ms([_rounds_to(r['curve'], target) for r in per_seed], 1)} | "
            f"{_ms([r['asr'] for r in per_seed])} | {len(per_seed)} |"
        )
    wall = sum(r["wall"] for *_, per_seed in results for r in per_seed)
    lines += [
        "",
        "(random drop): the precision of dropping samples at random, i.e. the bad fraction among the "
        "scored samples (the backdoor poisons half of the samples of 10% of the clients). The nu / "
        "contamination of the main rows equals the true noise rate, which a user does not know;"
        f" the mis-specified rows show what 0.2 does. Sum of the runs' wall times: "
        f"{wall / 60:.1f} min (on a 2-core machine shared with other jobs).",
        "",
        "Reproduce: `fedmtl bench selection --rounds "
        f"{rounds} --seeds {' '.join(map(str, seeds))} --extra-seeds {' '.join(map(str, extra)) or '0'}`.",
        "",
    ]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if any(r[0] == "clean" for r in results):
        plot(results, out.with_suffix(".png"))
        caption = "test accuracy per round, mean over each row's seeds"
        lines.insert(-3, f"![{caption}]({out.with_suffix('.png').name})\n")
    out.write_text("\n".join(lines))
    return stamp(out, "selection", argv, started)
