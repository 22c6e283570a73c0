"""A new algorithm in one file: FedAvgM (Hsu, Qi & Brown 2019), FedAvg with server momentum.

The client side is the contract's default (train the received model, send back its new values).
The server side never combines replies itself: the round reduces them to their weighted mean (each
task's head over its own clients in a multi-task federation; through client DP's clip and noise, or
the run's ``aggregation:`` list, when configured) and hands this algorithm the ``Aggregate``. What
the algorithm adds is its ``server_update``: a momentum step toward that mean.

    python examples/fedavgm.py [OUT_DIR]

Run from the CLI after importing it (``python -c "import examples.fedavgm"`` is not needed: any
config can name ``algorithm: {name: fedavgm}`` once this file is imported, e.g. from a script).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

import fedmtl
from fedmtl.algorithms import Aggregate, AlgoParams, Algorithm, register


class FedAvgMParams(AlgoParams):
    """The config keys of ``algorithm: {name: fedavgm, ...}``."""

    server_lr: float = Field(1.0, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)


@register
class FedAvgM(Algorithm):
    name = "fedavgm"
    Params = FedAvgMParams

    def init_server(self) -> dict[str, Any]:
        server = super().init_server()  # the body and every task's head
        return {**server, "velocity": {k: np.zeros_like(v) for k, v in server["params"].items()}}

    def server_update(self, server: dict[str, Any], aggregate: Aggregate, round: int) -> dict[str, Any]:
        """v <- momentum v + (w - mean); w <- w - server_lr v, for the keys the round aggregated."""
        if aggregate.empty:  # nobody replied (or a secure-aggregation round aborted)
            return server
        params, velocity = dict(server["params"]), dict(server["velocity"])
        for key, mean in aggregate.params.items():
            velocity[key] = self.p.momentum * velocity[key] + (params[key] - mean)
            params[key] = (params[key] - self.p.server_lr * velocity[key]).astype(params[key].dtype)
        return {**server, "params": params, "velocity": velocity}


def main(out: Path) -> dict[str, float]:
    """FedAvgM on digits: single-task, multi-task, under client-level DP and with a robust mean."""
    base: dict[str, Any] = {
        "seed": 0,
        "data": {"dataset": "digits", "partition": {"kind": "dirichlet", "alpha": 0.5, "num_clients": 10}},
        "algorithm": {"name": "fedavgm", "momentum": 0.5},
        "train": {"rounds": 10, "lr": 0.05},
        "output": {"progress": False},
    }
    variants = {
        "single-task": {},
        "multi-task": {"data": {**base["data"], "tasks": ["digit", "parity"]}},
        # clients release their evaluation only as a noisy mean (accounted with the training)
        "client-dp": {
            "privacy": {
                "enabled": True,
                "noise_multiplier": 0.5,
                "clip_norm": 1.0,
                "eval_noise_multiplier": 5.0,
            }
        },
        "median": {"aggregation": [{"name": "median"}]},
    }
    out_acc = {}
    for name, over in variants.items():
        res = fedmtl.run({**base, **over}, out=out / name)
        out_acc[name] = res.final["accuracy_mean"]
        eps = f", epsilon {res.final['epsilon']:.2f}" if "epsilon" in res.final else ""
        print(f"{name}: mean client accuracy {out_acc[name]:.3f}{eps} ({res.run_dir})")
    return out_acc


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="fedavgm-")))
