"""Evaluate the model each client would use on its own test split, and the global model.

Clients that use the same parameters (every client under FedAvg) share one forward pass. Where an
algorithm has both a personalised and a shared model, both are evaluated on the same split and the
difference is the client's personalisation gain. Held-out clients never train: they are evaluated
after a few head fine-tuning steps from what they would receive (new-client evaluation).

With ``eval.serve: better_on_val`` a client serves whichever of its personal and shared model
scores better on its own validation rows (``serve_better_on_val``); rows then hold the served
model's metrics, the personal model's (``personal_*``) and which one was served."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedmtl.algorithms.base import Algorithm, ClientWork
from fedmtl.algorithms.heads import head_of
from fedmtl.data.federated import ClientData, FederatedData
from fedmtl.errors import ConfigError
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
    own: dict[int, dict[str, float]] = {}  # the personal model's metrics, where another is served
    kept: dict[int, bool] = {}
    if algo.ctx.serve == "better_on_val" and shared:
        personal, kept = serve_better_on_val(algo, personal, shared)
        own, mine = mine, _metrics_by_client(algo, personal)
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
            if c.cid in kept:
                row.update({f"personal_{k}": v for k, v in own[c.cid].items()})
                gain = own[c.cid][metric] - theirs[c.cid][metric]
                row["personal_gain"] = float(gain if higher else -gain)
                row["served_personal"] = float(kept[c.cid])
        rows.append(row)
    return rows


def check_serve(serve: str, algo_cls: type[Algorithm], val_fraction: float) -> None:
    """``eval.serve: better_on_val`` needs two models to choose between and rows to choose on."""
    if serve != "better_on_val":
        return
    if _only_personal(algo_cls):
        from fedmtl.algorithms import algorithm_names, get_algorithm

        both = [n for n in algorithm_names() if not _only_personal(get_algorithm(n))]
        raise ConfigError(
            f"config: eval.serve = 'better_on_val': algorithm {algo_cls.name!r} has no shared model to "
            f"fall back to; allowed with: {', '.join(both)}"
        )
    if val_fraction <= 0:
        raise ConfigError(
            "config: eval.serve = 'better_on_val': needs data.val_fraction > 0 (each client's own "
            "validation rows are what it chooses on)"
        )


def _only_personal(algo_cls: type[Algorithm]) -> bool:
    return algo_cls.shared_eval_arrays is Algorithm.shared_eval_arrays


def serve_better_on_val(
    algo: Algorithm, personal: list[tuple[ClientData, Arrays]], shared: list[tuple[ClientData, Arrays]]
) -> tuple[list[tuple[ClientData, Arrays]], dict[int, bool]]:
    """Each client's served model: its personal one unless its shared one scores better on the
    client's own validation rows (the task's primary metric; a tie keeps the personal model; a
    client without validation rows or without a shared model keeps it too). Returns the served
    (client, arrays) pairs and, per client that had the choice, whether it kept the personal one.

    The choice is made on validation rows only, so it never looks at the test rows it is scored on:
    a client can still lose on test where its validation rows misled it (the rows report it)."""
    other = {c.cid: a for c, a in shared}
    able = [(c, a) for c, a in personal if c.cid in other and c.y_val is not None and len(c.y_val)]
    mine = _metrics_by_client(algo, able, "val") if able else {}
    theirs = _metrics_by_client(algo, [(c, other[c.cid]) for c, _ in able], "val") if able else {}
    served, kept = [], {}
    for c, arrays in personal:
        if c.cid not in mine:
            served.append((c, arrays))
            continue
        metric, higher = primary_metric(c.task)
        p, q = mine[c.cid][metric], theirs[c.cid][metric]
        kept[c.cid] = bool(p >= q if higher else p <= q)
        served.append((c, arrays if kept[c.cid] else other[c.cid]))
    return served, kept


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
        row = {
            "round": round,
            "kind": "new_client",
            "client": cid,
            "task": c.task.name,
            "n_test": c.n_test,
            **{f"before_{k}": v for k, v in before.items()},
            **{f"after_{k}": v for k, v in after.items()},
        }
        if algo.ctx.serve == "better_on_val" and steps > 0:
            adapted = serve_adapted_on_train(algo, c, start, tuned)
            row.update({f"served_{k}": v for k, v in (after if adapted else before).items()})
            row["served_adapted"] = float(adapted)
        rows.append(row)
    return rows


def serve_adapted_on_train(algo: Algorithm, c: ClientData, start: Arrays, tuned: Arrays) -> bool:
    """A new client has no validation rows of its own: it keeps its adapted model unless the model
    it received scores better on the rows it adapted on (its training rows); ties keep the adapted."""
    metric, higher = primary_metric(c.task)
    x, y = c.x_train, c.y_train
    model = algo.ctx.model_for(c.task.name)
    scores = [
        task_metrics(predict(model, to_torch(a), x), torch.as_tensor(y), c.task)[metric]
        for a in (tuned, start)
    ]
    return bool(scores[0] >= scores[1] if higher else scores[0] <= scores[1])


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
