"""Evaluate the model each client would use on its own test split, and the global model.

Clients that use the same parameters (every client under FedAvg) share one forward pass. Where an
algorithm has both a personalised and a shared model, both are evaluated on the same split and the
difference is the client's personalisation gain. Held-out clients never train: they are evaluated
after a few head fine-tuning steps from what they would receive (new-client evaluation)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedmtl.algorithms.base import Algorithm, ClientWork
from fedmtl.algorithms.heads import head_of
from fedmtl.data.federated import ClientData, FederatedData
from fedmtl.metrics import primary_metric, summarize_clients, task_metrics
from fedmtl.training.executors import train_one
from fedmtl.training.local import predict
from fedmtl.training.tensors import Arrays, to_torch

NEW_CLIENT = 8  # rng purpose for new-client fine-tuning


def _split(c: ClientData, split: str) -> tuple[np.ndarray, np.ndarray]:
    if split == "val":
        assert c.x_val is not None and c.y_val is not None
        return c.x_val, c.y_val
    return c.x_test, c.y_test


def _metrics_by_client(
    algo: Algorithm, picks: list[tuple[ClientData, Arrays]], split: str = "test"
) -> dict[int, dict[str, float]]:
    groups: dict[tuple[int, str], tuple[Arrays, list[ClientData]]] = {}
    for c, arrays in picks:
        groups.setdefault((id(arrays), c.task.name), (arrays, []))[1].append(c)
    out: dict[int, dict[str, float]] = {}
    for (_, task), (arrays, clients) in groups.items():
        parts = [_split(c, split) for c in clients]
        x = np.concatenate([p[0] for p in parts]) if len(clients) > 1 else parts[0][0]
        pred = predict(algo.ctx.model_for(task), to_torch(arrays), x)
        start = 0
        for c, (_, y) in zip(clients, parts, strict=True):
            out[c.cid] = task_metrics(_rows(pred, start, start + len(y)), torch.as_tensor(y), c.task)
            start += len(y)
    return out


def _rows(pred: torch.Tensor | dict[str, torch.Tensor], start: int, stop: int) -> Any:
    """Rows ``start:stop`` of a prediction (of every task's, for a model with a head per task)."""
    if isinstance(pred, dict):
        return {k: v[start:stop] for k, v in pred.items()}
    return pred[start:stop]


def evaluate_clients(
    algo: Algorithm,
    server: dict[str, Any],
    states: dict[int, dict[str, Any]],
    data: FederatedData,
    round: int,
    clients_to_evaluate: list[int] | None = None,
) -> list[dict[str, Any]]:
    """One row per client (every training client, or ``clients_to_evaluate``)."""
    ids = data.train_clients if clients_to_evaluate is None else clients_to_evaluate
    clients = [data.clients[c] for c in ids]
    personal = []
    shared = []
    for c in clients:
        state = states.get(c.cid, {})
        personal.append((c, algo.eval_arrays(server, state, c.cid, c if algo.needs_eval_data else None)))
        other = algo.shared_eval_arrays(server, state, c.cid)
        if other is not None:
            shared.append((c, other))
    mine = _metrics_by_client(algo, personal)
    theirs = _metrics_by_client(algo, shared) if shared else {}
    # validation rows (data.val_fraction): the same models, for choosing the best round and tuning
    valued = [(c, a) for c, a in personal if c.y_val is not None and len(c.y_val)]
    val = _metrics_by_client(algo, valued, "val") if valued else {}
    rows = []
    for c in clients:
        row: dict[str, Any] = {
            "round": round,
            "kind": "client",
            "client": c.cid,
            "task": c.task.name,
            "n_test": c.n_test,
            **mine[c.cid],
        }
        if c.cid in val:
            row.update({f"val_{k}": v for k, v in val[c.cid].items()})
        if c.cid in theirs:
            metric, higher = primary_metric(c.task)
            row.update({f"shared_{k}": v for k, v in theirs[c.cid].items()})
            gain = mine[c.cid][metric] - theirs[c.cid][metric]
            row["gain"] = float(gain if higher else -gain)
        rows.append(row)
    return rows


def evaluate_new_clients(
    algo: Algorithm, server: dict[str, Any], data: FederatedData, round: int, steps: int, lr: float | None
) -> list[dict[str, Any]]:
    """Accuracy of held-out clients before and after ``steps`` head-only fine-tuning steps."""
    rows = []
    for cid in data.holdout:
        c = data.clients[cid]
        start = algo.new_client_arrays(server, cid)
        work = ClientWork(
            round=round,
            fraction=1.0,
            rng=np.random.default_rng([algo.ctx.seed, NEW_CLIENT, cid]),
            lr=lr if lr is not None else algo.ctx.local.optimizer.lr,
        )
        tuned = train_one(algo.ctx.train(c, work, start, trainable=head_of(start), steps=steps)).params
        before = _metrics_by_client(algo, [(c, start)])[cid]
        after = _metrics_by_client(algo, [(c, tuned)])[cid]
        rows.append(
            {
                "round": round,
                "kind": "new_client",
                "client": cid,
                "task": c.task.name,
                "n_test": c.n_test,
                **{f"before_{k}": v for k, v in before.items()},
                **{f"after_{k}": v for k, v in after.items()},
            }
        )
    return rows


def evaluate_global(algo: Algorithm, server: dict[str, Any], data: FederatedData) -> dict[str, float]:
    arrays = algo.global_params(server)
    if arrays is None or data.x_global_test is None:
        return {}
    out = predict(algo.ctx.model, to_torch(arrays), data.x_global_test)
    metrics = task_metrics(out, torch.as_tensor(data.y_global_test), data.task)
    return {f"global_{k}": v for k, v in metrics.items()}


def eval_sample(population: list[int], wanted: int | float | None, seed: int, round: int) -> list[int]:
    """The clients an evaluation round evaluates: all, or ``wanted`` (a count, or a fraction of the
    population) drawn without replacement from (seed, round), the same on every runtime."""
    if wanted is None:
        return population
    n = int(wanted) if isinstance(wanted, int) else max(1, round_half(wanted * len(population)))
    if n >= len(population):
        return population
    rng = np.random.default_rng([seed, EVAL_SAMPLE, round])
    return sorted(int(c) for c in rng.choice(population, size=n, replace=False))


def round_half(x: float) -> int:
    return int(np.floor(x + 0.5))


EVAL_SAMPLE = 15  # rng purpose of the evaluated clients' draw


def sample_interval(rows: list[dict[str, Any]], population: int) -> dict[str, float]:
    """Half-widths of 95% confidence intervals for the population means of a sample of client
    metrics (normal approximation with the finite-population correction)."""
    n = len(rows)
    out: dict[str, float] = {}
    if n < 2:
        return out
    fpc = np.sqrt(max(population - n, 0) / max(population - 1, 1))
    keys = dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, float))
    for key in keys:
        vals = np.array([r[key] for r in rows if key in r], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        if len(vals) > 1:
            out[f"{key}_ci95"] = float(1.96 * vals.std(ddof=1) / np.sqrt(len(vals)) * fpc)
    return out


def release_client_eval(
    algo: Algorithm, client_rows: list[dict[str, Any]], rnd: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The client rows to record and the round-row summary of one evaluation round.

    Exact by default; with DP-aggregated evaluation (``privacy.eval_noise_multiplier``) only the
    noisy metric means leave the clients, so no client row is recorded."""
    released = algo.release_eval(client_rows, rnd)
    if released is None:
        return client_rows, summarize_clients(client_rows)
    return [], released
