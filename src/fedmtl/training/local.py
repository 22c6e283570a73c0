"""Local training of one client's parameters, written functionally over parameter dicts."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from fedmtl.data.federated import TaskSpec
from fedmtl.training import optim
from fedmtl.training.device import on_cpu, to_device, to_host
from fedmtl.training.objectives import TASK_LOSS, Objective, add_prox_grad
from fedmtl.training.optim import OptimizerSpec
from fedmtl.training.shuffle import Randomness, Stream, orders, permutation
from fedmtl.training.tensors import Params


@dataclass(frozen=True)
class LocalSpec:
    optimizer: OptimizerSpec
    batch_size: int = 32
    epochs: float = 1.0
    steps: int | None = None

    def with_lr(self, lr: float) -> LocalSpec:
        return replace(self, optimizer=replace(self.optimizer, lr=lr))

    def with_epochs(self, epochs: float | None) -> LocalSpec:
        """``epochs`` local epochs instead of the run's epochs or steps (None: unchanged)."""
        return self if epochs is None else replace(self, epochs=epochs, steps=None)


def num_local_steps(n: int, spec: LocalSpec, work: float = 1.0) -> int:
    """Steps a client does this round; a straggler with work fraction < 1 does proportionally fewer."""
    full = spec.steps if spec.steps else max(1, math.ceil(spec.epochs * math.ceil(n / spec.batch_size)))
    return full if work >= 1.0 else max(1, math.floor(full * work))


def batch_schedule(n: int, batch_size: int, steps: int, rng: Randomness) -> list[np.ndarray]:
    """Mini-batch indices: fresh permutation each epoch, the last batch of an epoch may be short.

    Derived only from (n, batch size, steps, rng) so sequential and batched execution see the same
    batches. A ``Stream`` (what the runtime hands clients) gives its hashed orders
    (``fedmtl.training.shuffle``); a numpy Generator gives ``rng.permutation(n)`` per epoch."""
    order = batch_order(n, batch_size, steps, rng)
    ends = np.cumsum(batch_lengths(np.array([n]), batch_size, np.array([steps]))[0]).tolist()
    return [order[a:b] for a, b in zip([0, *ends], ends, strict=False)]  # one batch per end


def batch_order(n: int, batch_size: int, steps: int, rng: Randomness) -> np.ndarray:
    """``np.concatenate(batch_schedule(n, batch_size, steps, rng))`` from the same draws (one
    permutation per epoch started), without building the per-batch list; the batch lengths
    follow from (n, batch size, steps) alone (``batch_lengths``)."""
    bs = min(batch_size, n)
    per_epoch = -(-n // bs) if n else 1
    if steps <= per_epoch:  # the common case: at most one epoch
        first = permutation(n, rng) if isinstance(rng, Stream) else rng.permutation(n)
        return first[: min(steps * bs, n)]
    epochs = -(-steps // per_epoch)
    if isinstance(rng, Stream):
        order = orders([n], [epochs], [rng.key])
    else:
        order = np.concatenate([rng.permutation(n) for _ in range(epochs)])
    rest = steps - (epochs - 1) * per_epoch  # batches taken from the last epoch
    return order[: (epochs - 1) * n + min(rest * bs, n)]


def _stream_orders(
    n: np.ndarray, batch_size: int, t: np.ndarray, keys: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """``batch_orders`` for clients that all hold Streams: every permutation from one sort."""
    bs = np.maximum(np.minimum(batch_size, n), 1)
    per_epoch = np.maximum(-(-n // bs), 1)
    epochs = np.maximum(-(-t // per_epoch), 1)
    rest = t - (epochs - 1) * per_epoch  # batches taken from the last epoch
    lengths = (epochs - 1) * n + np.minimum(rest * bs, n)
    order = orders(n, epochs, keys)
    blocks = n * epochs
    if bool((blocks == lengths).all()):  # every client uses all it drew (one epoch, all batches)
        return order, lengths
    pos = np.arange(len(order)) - np.repeat(np.cumsum(blocks) - blocks, blocks)
    return order[pos < np.repeat(lengths, blocks)], lengths


def batch_orders(
    sizes: Sequence[int], batch_size: int, steps: Sequence[int], rngs: Sequence[Randomness]
) -> tuple[np.ndarray, np.ndarray]:
    """``batch_order`` of every client, concatenated, and each one's length.

    Clients that all hold Streams get theirs from one sort (``fedmtl.training.shuffle``). With
    numpy Generators, a client that trains at most one epoch draws ``permutation(n)``, which is ``arange(n)``
    shuffled in place: here every such client shuffles its own slice of one shared array of
    aranges, the same draws without a new array (and its Python call) per client. Clients of a
    small federation cost a few microseconds each, so this is a measurable share of a round."""
    n = np.asarray(sizes, dtype=np.int64)
    t = np.asarray(steps, dtype=np.int64)
    try:
        keys = [r.key for r in rngs]  # type: ignore[union-attr]
    except AttributeError:  # numpy Generators among them
        pass
    else:
        return _stream_orders(n, batch_size, t, keys)
    if any(isinstance(r, Stream) for r in rngs):  # a mix: each client on its own
        parts = [batch_order(int(m), batch_size, int(k), r) for m, k, r in zip(n, t, rngs, strict=True)]
        lens = np.array([len(p) for p in parts], dtype=np.int64)
        return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)), lens
    bs = np.minimum(batch_size, n)
    single = t <= -(-n // np.maximum(bs, 1))  # at most one epoch: one permutation of n
    starts = np.cumsum(n) - n
    order = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(starts, n)
    shuffle = [rng.shuffle for rng in rngs]
    multi: dict[int, np.ndarray] = {}
    for i, (s, m, one) in enumerate(zip(starts.tolist(), n.tolist(), single.tolist(), strict=True)):
        if one:
            shuffle[i](order[s : s + m])
        else:
            multi[i] = batch_order(m, batch_size, int(t[i]), rngs[i])
    lengths = np.where(single, np.minimum(t * bs, n), 0)
    for i, o in multi.items():
        lengths[i] = len(o)
    if not multi and bool((lengths == n).all()):  # every client uses its whole permutation
        return order, lengths
    parts = [
        multi[i] if i in multi else order[s : s + k]
        for i, (s, k) in enumerate(zip(starts.tolist(), lengths.tolist(), strict=True))
    ]
    return np.concatenate(parts) if parts else order[:0], lengths


def batch_lengths(n: np.ndarray, batch_size: int, steps: np.ndarray) -> np.ndarray:
    """Length of every mini-batch of ``batch_schedule`` for clients of sizes ``n`` doing ``steps``
    steps each: [clients, max steps], 0 after a client's last step."""
    n = np.asarray(n, dtype=np.int64)
    steps = np.asarray(steps, dtype=np.int64)
    bs = np.minimum(batch_size, n)
    per_epoch = -(-n // bs)
    t = np.arange(int(steps.max()) if len(steps) else 0)[None, :]
    within = t % per_epoch[:, None]  # batch index inside its epoch
    last = within == per_epoch[:, None] - 1
    lens = np.where(last, n[:, None] - bs[:, None] * (per_epoch[:, None] - 1), bs[:, None])
    return np.where(t < steps[:, None], lens, 0)


def local_train(
    model: nn.Module,
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    task: TaskSpec,
    spec: LocalSpec,
    steps: int,
    rng: Randomness,
    trainable: Iterable[str] | None = None,
    prox_center: Params | None = None,
    prox_mu: float = 0.0,
    objective: Objective = TASK_LOSS,
    bounds: Sequence[tuple[str, float, float]] = (),
) -> tuple[Params, float, int]:
    """Run ``steps`` optimizer steps; returns (params, mean training loss, samples processed).

    ``trainable`` freezes every other key (FedRep's phases); ``prox_center``/``prox_mu`` add the
    proximal term (FedProx, Ditto); ``objective`` replaces the task loss (APFL); ``bounds``
    projects keys onto ``[low, high]`` after every step (APFL's mixing weight)."""
    keys = list(params) if trainable is None else [k for k in params if k in set(trainable)]
    params = {k: to_device(v) for k, v in params.items()}
    frozen = {k: v for k, v in params.items() if k not in keys}
    current = {k: params[k].clone() for k in keys}
    state = optim.init_state(spec.optimizer, current)
    xt = to_device(torch.as_tensor(x))
    yt = to_device(torch.as_tensor(y))
    center = {k: to_device(c) for k, c in (prox_center or {}).items() if k in current} if prox_mu > 0 else {}
    bounds = [b for b in bounds if b[0] in current]  # a frozen key keeps its value anyway
    total, seen = 0.0, 0
    for idx in batch_schedule(len(y), spec.batch_size, steps, rng):
        leaves = {k: v.requires_grad_(True) for k, v in current.items()}
        value, loss = objective.batch(model, {**frozen, **leaves}, xt[idx], yt[idx], task)
        grads = dict(zip(leaves, torch.autograd.grad(value, list(leaves.values())), strict=True))
        add_prox_grad(grads, leaves, center, prox_mu)
        current = optim.step(spec.optimizer, leaves, grads, state)
        for key, low, high in bounds:
            current[key] = current[key].clamp(low, high)
        total += float(loss.detach()) * len(idx)
        seen += len(idx)
    result = {**frozen, **{k: to_host(v.detach()) for k, v in current.items()}}
    return {k: to_host(result[k]) for k in params}, total / max(seen, 1), seen


@torch.no_grad()
def predict(model: nn.Module, params: Params, x: np.ndarray, chunk: int = 4096) -> torch.Tensor:
    xt = torch.as_tensor(x)
    if not on_cpu():
        params = {k: to_device(v) for k, v in params.items()}
    outs = [functional_call(model, params, (to_device(xt[i : i + chunk]),)) for i in range(0, len(xt), chunk)]
    if outs and isinstance(outs[0], dict):  # a model with a head per task
        return {k: torch.cat([to_host(o[k]) for o in outs]) for k in outs[0]}  # type: ignore[return-value]
    return torch.cat([to_host(o) for o in outs]) if outs else torch.empty(0)


def evaluate_params(model: nn.Module, params: Params, x: np.ndarray, y: np.ndarray, task: TaskSpec) -> dict:
    from fedmtl.metrics import task_metrics

    return task_metrics(predict(model, params, x), torch.as_tensor(y), task)
