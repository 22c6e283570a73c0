"""DP-SGD (Abadi et al. 2016) for local training: Poisson-sampled mini-batches, per-sample gradients
(``torch.func``: ``vmap`` of ``grad``), each clipped to L2 norm ``clip``, summed, Gaussian noise of
std ``noise_multiplier * clip`` added, divided by the expected batch size. Same optimizer and
return values as ``local_train``, so an executor can run either."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import grad, vmap

from fedmtl.data.federated import TaskSpec
from fedmtl.training import optim
from fedmtl.training.device import to_device, to_host
from fedmtl.training.local import LocalSpec
from fedmtl.training.objectives import TASK_LOSS, Objective, add_prox_grad
from fedmtl.training.shuffle import Randomness
from fedmtl.training.tensors import Params


def per_sample_grads(
    model: nn.Module,
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    task: TaskSpec,
    frozen: Params | None = None,
    objective: Objective = TASK_LOSS,
) -> Params:
    """Gradient of the objective of every sample separately, w.r.t. ``params`` (``frozen`` keys
    enter the model but get no gradient): each value has a leading batch axis."""
    fixed = frozen or {}

    def one(p: Params, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return objective.batch(model, {**fixed, **p}, xi.unsqueeze(0), yi.unsqueeze(0), task)[0]

    return vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)


def clip_and_noise(
    grads: Params, clip: float, noise_multiplier: float, batch: int, gen: torch.Generator
) -> tuple[Params, int]:
    """(noisy mean of the clipped per-sample gradients, number of samples clipped)."""
    sq = sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads.values())
    norms = sq.sqrt()
    factor = (clip / norms.clamp_min(1e-12)).clamp(max=1.0)
    out = {}
    for k, g in grads.items():
        s = torch.einsum("b,b...->...", factor.to(g.dtype), g)
        if noise_multiplier > 0:
            # drawn on the host from the client's generator: the same noise on every device
            s = s + to_device(noise_multiplier * clip * torch.randn(s.shape, generator=gen, dtype=s.dtype))
        out[k] = s / batch
    return out, int((norms > clip).sum())


def dp_local_train(
    model: nn.Module,
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    task: TaskSpec,
    spec: LocalSpec,
    steps: int,
    rng: np.random.Generator,
    clip: float,
    noise_multiplier: float,
    noise_rng: np.random.Generator,
    trainable: Iterable[str] | None = None,
    prox_center: Params | None = None,
    prox_mu: float = 0.0,
    objective: Objective = TASK_LOSS,
    bounds: Sequence[tuple[str, float, float]] = (),
) -> tuple[Params, float, int]:
    """``local_train`` with DP-SGD steps; returns (params, mean training loss, samples processed).

    Every step draws a Poisson batch (``poisson_batches``: each sample independently with
    probability q = min(batch_size, n) / n, so the batch size varies and may be 0), the mechanism
    the accountant composes; the noisy sum is divided by the expected batch size q n, not the drawn
    one, which would depend on the data. The proximal term is data-independent, so it is added to
    the privatised gradient without cost to privacy."""
    keys = list(params) if trainable is None else [k for k in params if k in set(trainable)]
    params = {k: to_device(v) for k, v in params.items()}
    frozen = {k: v for k, v in params.items() if k not in keys}
    current = {k: params[k].detach().clone() for k in keys}
    state = optim.init_state(spec.optimizer, current)
    xt, yt = to_device(torch.as_tensor(x)), to_device(torch.as_tensor(y))
    gen = torch.Generator().manual_seed(int(noise_rng.integers(2**62)))
    expected = min(spec.batch_size, len(y))
    center = {k: to_device(c) for k, c in (prox_center or {}).items() if k in current}
    bounds = [b for b in bounds if b[0] in current]
    total, seen = 0.0, 0
    for idx in poisson_batches(len(y), spec.batch_size, steps, rng):
        xb, yb = xt[idx], yt[idx]
        if len(idx):
            with torch.no_grad():
                total += float(objective.batch(model, {**frozen, **current}, xb, yb, task)[1]) * len(idx)
            per_sample = per_sample_grads(model, current, xb, yb, task, frozen, objective)
        else:  # an empty batch: the step is the noise alone
            per_sample = {k: v.new_zeros((0, *v.shape)) for k, v in current.items()}
        g, _ = clip_and_noise(per_sample, clip, noise_multiplier, expected, gen)
        add_prox_grad(g, current, center, prox_mu)
        current = optim.step(spec.optimizer, current, g, state)
        for key, low, high in bounds:
            current[key] = current[key].clamp(low, high)
        seen += len(idx)
    result = {**frozen, **current}
    return {k: to_host(result[k]) for k in params}, total / max(seen, 1), seen


def poisson_batches(n: int, batch_size: int, steps: int, rng: Randomness) -> list[np.ndarray]:
    """``steps`` Poisson-sampled mini-batches of ``range(n)``: each sample in each batch
    independently with probability min(batch_size, n) / n (what DP-SGD's accountant assumes; a
    shuffled fixed-size batch is a different mechanism, Chua et al. 2024). Drawn from ``rng``, so a
    client draws the same batches in every executor and on a Flower node."""
    if n == 0:
        return [np.zeros(0, dtype=np.int64) for _ in range(steps)]
    q = min(batch_size, n) / n
    return [np.flatnonzero(rng.random(n) < q) for _ in range(steps)]
