"""Server optimizers on the aggregated pseudo-gradient (global - mean of client models).

``sgd`` with lr 1 is plain FedAvg; ``momentum`` is FedAvgM; ``adam`` is FedAdam (Reddi et al.)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class ServerOptParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["sgd", "momentum", "adam"] = "sgd"
    lr: float = Field(1.0, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    eps: float = Field(1e-3, gt=0)


def server_opt_init(p: ServerOptParams, params: dict[str, np.ndarray]) -> dict[str, Any]:
    zeros = {k: np.zeros_like(v) for k, v in params.items()}
    if p.name == "momentum":
        return {"buf": zeros}
    if p.name == "adam":
        return {"m": zeros, "v": {k: np.zeros_like(v) for k, v in params.items()}, "t": 0}
    return {}


def server_opt_step(
    p: ServerOptParams, params: dict[str, np.ndarray], mean: dict[str, np.ndarray], state: dict[str, Any]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Apply one server step for the keys in ``mean``; other keys of ``params`` are kept."""
    new = dict(params)
    if p.name == "sgd" and p.lr == 1.0:
        new.update(mean)
        return new, state
    if p.name == "adam":
        state = {**state, "t": state["t"] + 1}
    for k, m in mean.items():
        g = params[k] - m
        if p.name == "sgd":
            new[k] = params[k] - p.lr * g
        elif p.name == "momentum":
            buf = p.momentum * state["buf"][k] + g
            state["buf"][k] = buf
            new[k] = params[k] - p.lr * buf
        else:
            state["m"][k] = p.beta1 * state["m"][k] + (1 - p.beta1) * g
            state["v"][k] = p.beta2 * state["v"][k] + (1 - p.beta2) * g * g
            new[k] = params[k] - p.lr * state["m"][k] / (np.sqrt(state["v"][k]) + p.eps)
        new[k] = new[k].astype(params[k].dtype)
    return new, state
