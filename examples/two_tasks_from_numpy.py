"""Your own multi-task federation from plain numpy arrays: two tasks on the same samples.

Eight hospitals each hold patient records (12 measurements). Every record has a diagnosis (3
classes) and a length of stay in days; some stays are not recorded yet (NaN: that record trains the
diagnosis head only). The reader returns one ``x`` and a dict of labels per hospital, and declares
what each label is; every hospital then learns both tasks with one shared body and a head per
task, and the run reports each task's metrics per client and per round.

    python examples/two_tasks_from_numpy.py [OUT_DIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

import fedmtl
from fedmtl.data import Clients, DataConfig, register_dataset


def hospital_records(hospitals: int = 8, seed: int = 0) -> Clients:
    """Stand-in for the hospitals' own data: a diagnosis driven by the first measurements, a stay
    that grows with severity, and a hospital-specific shift in both."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(12, 3))
    names, xs, ys = [], [], []
    for h in range(hospitals):
        n = int(rng.integers(120, 260))
        x = rng.normal(size=(n, 12)).astype(np.float32) + 0.3 * h / hospitals
        diagnosis = (x @ w + rng.normal(scale=0.5, size=(n, 3))).argmax(1)
        stay = 2.0 + 1.5 * diagnosis + 0.8 * x[:, 0] + h * 0.1 + rng.normal(scale=0.5, size=n)
        stay[rng.random(n) < 0.2] = np.nan  # not recorded yet: masked, never imputed
        names.append(f"hospital_{h}")
        xs.append(x)
        ys.append({"diagnosis": diagnosis, "stay": stay})
    return Clients(
        names,
        xs,
        ys,
        tasks=[
            {"name": "diagnosis", "kind": "classification", "classes": 3},
            {"name": "stay", "kind": "regression", "loss": "huber"},
        ],
    )


@register_dataset("hospitals", kind="natural", replace=True, description="8 hospitals, 2 tasks per record")
def read_hospitals(cfg: DataConfig) -> Clients:
    return hospital_records()


def main(out: Path) -> dict[str, dict[str, float]]:
    results = {}
    for algorithm in ("fedavg", "fedper"):
        res = fedmtl.run(
            {
                "seed": 0,
                "data": {"dataset": "hospitals"},
                "model": {"name": "mlp", "hidden": [64]},
                "algorithm": {"name": algorithm},
                "train": {"rounds": 30, "lr": 0.05},
                "output": {"progress": False},
            },
            out=out / algorithm,
        )
        final = res.final
        results[algorithm] = {
            "diagnosis accuracy": final["diagnosis.accuracy_mean"],
            "stay rmse (days)": final["stay.rmse_mean"],
        }
        print(f"{algorithm}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[algorithm].items()))
    return results


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="hospitals-")))
