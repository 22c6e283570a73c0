"""Evaluate the model each client would use on its own test split, and the global model.

Clients that use the same parameters (every client under FedAvg) share one forward pass."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedmtl.algorithms.base import Algorithm
from fedmtl.data.federated import FederatedData
from fedmtl.metrics import task_metrics
from fedmtl.training.local import predict
from fedmtl.training.tensors import to_torch


def evaluate_clients(
    algo: Algorithm,
    server: dict[str, Any],
    states: dict[int, dict[str, Any]],
    data: FederatedData,
    round: int,
) -> list[dict[str, Any]]:
    groups: dict[int, tuple[dict, list[int]]] = {}
    for c in data.clients:
        arrays = algo.eval_arrays(server, states.get(c.cid, {}), c.cid)
        groups.setdefault(id(arrays), (arrays, []))[1].append(c.cid)
    rows: dict[int, dict[str, Any]] = {}
    model = algo.ctx.model
    for arrays, cids in groups.values():
        clients = [data.clients[c] for c in cids]
        x = np.concatenate([c.x_test for c in clients]) if len(clients) > 1 else clients[0].x_test
        out = predict(model, to_torch(arrays), x)
        start = 0
        for c in clients:
            part = out[start : start + c.n_test]
            start += c.n_test
            rows[c.cid] = {
                "round": round,
                "kind": "client",
                "client": c.cid,
                "n_test": c.n_test,
                **task_metrics(part, torch.as_tensor(c.y_test), c.task),
            }
    return [rows[c] for c in sorted(rows)]


def evaluate_global(algo: Algorithm, server: dict[str, Any], data: FederatedData) -> dict[str, float]:
    arrays = algo.global_params(server)
    if arrays is None or data.x_global_test is None:
        return {}
    out = predict(algo.ctx.model, to_torch(arrays), data.x_global_test)
    metrics = task_metrics(out, torch.as_tensor(data.y_global_test), data.task)
    return {f"global_{k}": v for k, v in metrics.items()}
