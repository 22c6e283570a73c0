"""Local training as the personalised algorithms use it: arrays in, arrays out, honest step counts."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from fedmtl.algorithms.base import AlgoContext, ClientWork
from fedmtl.data.federated import ClientData
from fedmtl.training import local_train, num_local_steps, to_numpy, to_torch
from fedmtl.training.tensors import Arrays


def train_arrays(
    ctx: AlgoContext,
    data: ClientData,
    arrays: Arrays,
    work: ClientWork,
    epochs: float | None = None,
    trainable: Iterable[str] | None = None,
    prox_center: Arrays | None = None,
    prox_mu: float = 0.0,
    steps: int | None = None,
) -> tuple[Arrays, float, int, int]:
    """Train ``arrays`` on the client's data; returns (arrays, mean loss, steps, samples seen).

    ``epochs`` overrides ``train.local_epochs`` for one phase (FedRep's head/body phases, Ditto's
    personal model); the client's work fraction scales every phase alike."""
    spec = ctx.local.with_lr(work.lr)
    if epochs is not None:
        spec = replace(spec, epochs=epochs, steps=None)
    n_steps = steps if steps is not None else num_local_steps(data.n_train, spec, work.fraction)
    params, loss, seen = local_train(
        ctx.model_for(data.task.name),
        to_torch(arrays),
        data.x_train,
        data.y_train,
        data.task,
        spec,
        n_steps,
        work.rng,
        trainable=trainable,
        prox_center=to_torch(prox_center) if prox_center is not None else None,
        prox_mu=prox_mu,
    )
    return to_numpy(params), loss, n_steps, seen
