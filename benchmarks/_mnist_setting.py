"""The MNIST federation the robustness and privacy benchmarks share, so their tables compare."""

from __future__ import annotations

from typing import Any


def mnist_config(seed: int, rounds: int) -> dict[str, Any]:
    """100 clients (Dirichlet 0.5), 20 per round, MLP 784-64-10, 10 local SGD steps of batch 32."""
    return {
        "seed": seed,
        "data": {
            "dataset": "mnist",
            "partition": {"kind": "dirichlet", "alpha": 0.5, "num_clients": 100},
            "normalize": "scale",  # pixels to [0, 1], as every table of this setting was measured
        },
        "model": {"name": "mlp", "hidden": [64]},
        "train": {"rounds": rounds, "local_steps": 10, "batch_size": 32, "lr": 0.05},
        "clients": {"per_round": 20},
        "eval": {"every": rounds},
        "runtime": {"execution": "auto"},  # batched where the stack allows (same numbers, faster)
        "output": {"progress": False, "checkpoint_every": 1000},
    }
