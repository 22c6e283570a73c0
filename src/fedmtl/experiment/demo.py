"""``make demo``: FedAvg, FedProx and Local on scikit-learn digits, compared in one report."""

from __future__ import annotations

from pathlib import Path

from fedmtl.config import parse_config
from fedmtl.experiment.report import write_report
from fedmtl.experiment.run import run

BASE = {
    "seed": 0,
    "data": {"dataset": "digits", "partition": {"kind": "dirichlet", "alpha": 0.3, "num_clients": 20}},
    "model": {"name": "mlp", "hidden": [64]},
    "train": {"rounds": 30, "local_epochs": 2, "batch_size": 16, "lr": 0.05},
    "clients": {"per_round": 10},
}


def demo(out: Path) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        from fedmtl.experiment.records import RunDir

        RunDir.create(out.parent, "", 0, out)  # raises the standard "not empty" error
    run_dirs = []
    for name, algo in [
        ("fedavg", {"name": "fedavg"}),
        ("fedprox", {"name": "fedprox", "mu": 0.01}),
        ("local", {"name": "local"}),
    ]:
        cfg = parse_config({**BASE, "name": f"demo-{name}", "algorithm": algo})
        res = run(cfg, out=out / name)
        print(f"{name:>8}: final accuracy mean {res.final['accuracy_mean']:.4f} -> {res.run_dir}")
        run_dirs.append(res.run_dir)
    return write_report(run_dirs, out)
