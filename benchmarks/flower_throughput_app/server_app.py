"""Flower ServerApp: FedAvg over all nodes for ``num-server-rounds``, central test accuracy at the end.

Settings come from the run config (``flwr run``) and, for in-process ``run_simulation`` (which has
no run config), from the JSON in ``FEDMTL_FLOWER_BENCH``. ``ROUND_END`` collects the wall-clock
time at which each round finished, so the benchmark can separate start-up from steady state."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flower_throughput_app.task import accuracy, load_test, make_net

DEFAULTS: dict[str, object] = {
    "num-server-rounds": 5,
    "num-clients": 100,
    "epochs": 1.0,
    "batch-size": 32,
    "lr": 0.05,
    "seed": 0,
    "data-path": "",
    "init-path": "",
    #: the model, as ``task.make_net`` takes it (JSON)
    "model": '{"kind": "mlp"}',
}
ROUND_END: list[float] = []
RESULT: dict[str, float] = {}

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = {**DEFAULTS, **dict(context.run_config), **json.loads(os.environ.get("FEDMTL_FLOWER_BENCH", "{}"))}
    rounds = int(cfg["num-server-rounds"])
    net = make_net(json.loads(str(cfg["model"])))
    if cfg["init-path"]:
        with np.load(str(cfg["init-path"])) as f:
            state = {k: torch.from_numpy(f[k]) for k in net.state_dict()}
        net.load_state_dict(state)
    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=int(cfg["num-clients"]),
        min_available_nodes=int(cfg["num-clients"]),
    )

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        ROUND_END.append(time.perf_counter())
        if server_round < rounds:
            return None
        net.load_state_dict(arrays.to_torch_state_dict())
        x, y = load_test(str(cfg["data-path"]))
        RESULT["accuracy"] = accuracy(net, x, y)
        return MetricRecord({"accuracy": RESULT["accuracy"]})

    train_config = ConfigRecord(
        {k: cfg[k] for k in ("epochs", "batch-size", "lr", "seed", "data-path", "model")}  # type: ignore[misc]
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(net.state_dict()),
        num_rounds=rounds,
        train_config=train_config,
        evaluate_fn=central,
    )
