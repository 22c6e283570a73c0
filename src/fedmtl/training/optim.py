"""Functional SGD (momentum, weight decay) and Adam over parameter dicts.

Written out rather than using ``torch.optim`` so the same update runs on one client's parameters
or on parameters stacked across clients (batched execution) and gives identical numbers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedmtl.training.tensors import Params


@dataclass(frozen=True)
class OptimizerSpec:
    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


def init_state(
    spec: OptimizerSpec, params: Params, zeros: Callable[[torch.Tensor], torch.Tensor] = torch.zeros_like
) -> dict[str, Params | int]:
    """Empty optimizer state; ``zeros`` makes each zero tensor (batched training reuses memory)."""
    if spec.name == "adam":
        return {
            "m": {k: zeros(v) for k, v in params.items()},
            "v": {k: zeros(v) for k, v in params.items()},
            "t": 0,
        }
    if spec.momentum > 0:
        return {"buf": {k: zeros(v) for k, v in params.items()}}
    return {}


@torch.no_grad()
def step(spec: OptimizerSpec, params: Params, grads: Params, state: dict) -> Params:
    """One optimizer step; returns new parameter tensors and mutates ``state`` in place."""
    out: Params = {}
    if spec.name == "adam":
        state["t"] += 1
        t = state["t"]
        c1 = 1 - spec.beta1**t
        c2 = 1 - spec.beta2**t
        for k, p in params.items():
            g = grads[k] + spec.weight_decay * p if spec.weight_decay else grads[k]
            m = state["m"][k].mul_(spec.beta1).add_(g, alpha=1 - spec.beta1)
            v = state["v"][k].mul_(spec.beta2).addcmul_(g, g, value=1 - spec.beta2)
            out[k] = p - spec.lr * (m / c1) / ((v / c2).sqrt() + spec.eps)
        return out
    for k, p in params.items():
        g = grads[k] + spec.weight_decay * p if spec.weight_decay else grads[k]
        if spec.momentum > 0:
            g = state["buf"][k].mul_(spec.momentum).add_(g)
        out[k] = p - spec.lr * g
    return out


@torch.no_grad()
def step_(spec: OptimizerSpec, params: Params, grads: Params, state: dict) -> None:
    """``step`` in place: updates ``params`` (and ``state``) without new parameter-sized tensors.

    Batched execution passes views of stacked client parameters, so only the clients still
    training change. Same arithmetic as ``step`` up to fused multiply-add rounding (one pass over
    the parameters instead of three matters when they are stacked for hundreds of clients).
    ``grads`` are consumed."""
    if spec.name == "adam":
        state["t"] += 1
        t = state["t"]
        c1 = 1 - spec.beta1**t
        c2 = 1 - spec.beta2**t
        for k, p in params.items():
            g = grads[k].add_(spec.weight_decay * p) if spec.weight_decay else grads[k]
            m = state["m"][k].mul_(spec.beta1).add_(g, alpha=1 - spec.beta1)
            v = state["v"][k].mul_(spec.beta2).addcmul_(g, g, value=1 - spec.beta2)
            p.sub_(spec.lr * (m / c1) / ((v / c2).sqrt() + spec.eps))
        return
    for k, p in params.items():
        g = grads[k].add_(spec.weight_decay * p) if spec.weight_decay else grads[k]
        if spec.momentum > 0:
            g = state["buf"][k].mul_(spec.momentum).add_(g)
        p.add_(g, alpha=-spec.lr)
