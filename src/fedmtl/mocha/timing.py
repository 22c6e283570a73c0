"""The reference's estimated-time model for convergence plots (flops + communication per round).

Per round (N = total training points over all nodes, not the largest node):
    MOCHA    8 * frac * N + comm      frac = sdca_frac * top of the work range (the time budget)
    Mb-SDCA  6 * frac * N + comm
    Mb-SGD   4 * frac * N + comm
    CoCoA    8 * m * max_t steps_t + comm   (everyone waits for the node that took the most steps)
comm is 10 (WiFi), 100 (LTE, the default) or 1000 (3G). Under systems heterogeneity a CoCoA node
with work fraction f_t needs steps_t / f_t of the budget, so its round costs 8 m max_t(steps_t/f_t)
(an extension: the reference charges CoCoA the same with or without stragglers).
"""

from __future__ import annotations

import numpy as np

COMM = {"wifi": 10.0, "lte": 100.0, "3g": 1000.0}
FLOPS_PER_STEP = {"mocha": 8.0, "cocoa": 8.0, "mbsdca": 6.0, "mbsgd": 4.0}


def comm_cost(network: str | float) -> float:
    if isinstance(network, int | float):
        return float(network)
    key = network.lower()
    if key not in COMM:
        raise ValueError(f"unknown network {network!r}; use one of {', '.join(COMM)} or a number")
    return COMM[key]


def round_costs(
    method: str,
    rounds: int,
    *,
    total_n: int,
    m: int,
    network: str | float = "lte",
    frac: float = 1.0,
    steps: np.ndarray | None = None,
    speeds: np.ndarray | None = None,
) -> np.ndarray:
    """Estimated time of each of ``rounds`` rounds (``steps``/``speeds``: rounds x m, CoCoA only)."""
    comm = comm_cost(network)
    if method == "cocoa":
        if steps is None:
            raise ValueError("CoCoA's time needs the steps each node took in each round")
        load = np.asarray(steps, dtype=np.float64)
        if speeds is not None:
            load = load / np.asarray(speeds, dtype=np.float64)
        return FLOPS_PER_STEP["cocoa"] * m * load.max(axis=1) + comm
    return np.full(rounds, FLOPS_PER_STEP[method] * frac * total_n + comm)


def elapsed(costs: np.ndarray, recorded_rounds: np.ndarray) -> np.ndarray:
    """Estimated time at which each recorded round (state after r rounds) was reached."""
    clock = np.concatenate([[0.0], np.cumsum(costs)])
    return clock[np.asarray(recorded_rounds, dtype=np.int64)]
