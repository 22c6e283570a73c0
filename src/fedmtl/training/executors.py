"""Executors: they run a round's client steps and carry out the local work the steps declare.

``SequentialExecutor`` trains one client after another with ``local_train``. ``BatchedExecutor``
advances every client's step together: each time the steps ask for training, the requests that
can share one computation (same model, task, optimizer settings, trainable keys, proximal weight
and objective) are trained as one batched computation (``batched_local_train``), and every client
gets its own result back. Both give the same results to float tolerance, since the requests, the
mini-batch orders and the arithmetic are the same (``tests/test_batched.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from typing import Any

from fedmtl.training.batched import DEFAULT_MEMORY_BYTES, batched_local_train
from fedmtl.training.local import local_train
from fedmtl.training.tensors import to_numpy, to_torch
from fedmtl.training.work import Step, StepResult, Train, Trained

#: One client's job: (state, data, message, work) as a client step takes them.
Job = tuple[dict[str, Any], Any, Any, Any]
StepFn = Callable[..., StepResult]


def train_one(request: Train) -> Trained:
    """Carry out one request on its own (the sequential executor's way)."""
    start = to_torch(dict(request.start))
    prox = request.prox
    center = to_torch(dict(prox.center)) if prox is not None else None
    mu = prox.mu if prox is not None else 0.0
    data = request.data
    if request.dp is not None:
        from fedmtl.training.dp_sgd import dp_local_train

        dp = request.dp
        params, loss, seen = dp_local_train(
            request.model, start, data.x_train, data.y_train, data.task, request.spec, request.steps,
            request.rng, clip=dp.clip, noise_multiplier=dp.noise_multiplier, noise_rng=dp.noise_rng,
            trainable=request.trainable, prox_center=center, prox_mu=mu, objective=request.objective,
            bounds=request.bounds,
        )  # fmt: skip
    else:
        params, loss, seen = local_train(
            request.model, start, data.x_train, data.y_train, data.task, request.spec, request.steps,
            request.rng, trainable=request.trainable, prox_center=center, prox_mu=mu,
            objective=request.objective, bounds=request.bounds,
        )  # fmt: skip
    return Trained(to_numpy(params), loss, seen, request.steps, owned=True)


def run_local(result: StepResult) -> Step:
    """A client step's (state, reply), its requests carried out one by one."""
    if not isinstance(result, Generator):
        return result
    try:
        request = next(result)
        while True:
            request = result.send(train_one(request))
    except StopIteration as stop:
        return stop.value


class SequentialExecutor:
    name = "sequential"

    def run(self, step: StepFn, jobs: Sequence[Job]) -> list[tuple[dict[str, Any], Any, float]]:
        """(new state, reply, compute seconds) of every job, in order."""
        out = []
        for job in jobs:
            t0 = time.perf_counter()
            state, reply = run_local(step(*job))
            out.append((state, reply, time.perf_counter() - t0))
        return out


class BatchedExecutor:
    name = "batched"

    def __init__(self, memory_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        #: budget for what one batched computation stacks at once (further clients: more groups)
        self.memory_bytes = memory_bytes

    def run(self, step: StepFn, jobs: Sequence[Job]) -> list[tuple[dict[str, Any], Any, float]]:
        """(new state, reply, compute seconds) of every job, in order; the seconds are the
        round's total shared equally (the clients trained as one computation)."""
        t0 = time.perf_counter()
        done: list[Step | None] = [None] * len(jobs)
        steps: dict[int, Generator[Train, Trained, Step]] = {}
        pending: dict[int, Train] = {}
        for i, job in enumerate(jobs):
            result = step(*job)
            if isinstance(result, tuple):
                done[i] = result
                continue
            try:
                pending[i] = next(result)
                steps[i] = result
            except StopIteration as stop:
                done[i] = stop.value
        while pending:
            trained = self.train(pending)
            pending = {}
            for i, res in trained.items():
                try:
                    pending[i] = steps[i].send(res)
                except StopIteration as stop:
                    done[i] = stop.value
        wall = (time.perf_counter() - t0) / max(len(jobs), 1)
        return [(state, reply, wall) for state, reply in done]  # type: ignore[misc]

    def train(self, requests: dict[int, Train]) -> dict[int, Trained]:
        """Every request's result; requests that can share a computation are trained together."""
        groups: dict[tuple, list[int]] = {}
        for i, r in requests.items():
            prox = r.prox
            # by identity: a frozen dataclass hashes every field on each lookup
            key = (
                r.model, id(r.data.task), id(r.spec), r.trainable, prox and prox.mu, r.objective, r.bounds,
                r.dp is None,
            )  # fmt: skip
            group = groups.get(key)
            if group is None:
                groups[key] = [i]
            else:
                group.append(i)
        out: dict[int, Trained] = {}
        for idx in groups.values():
            first = requests[idx[0]]
            if first.dp is not None:  # DP-SGD's per-sample clipping runs client by client
                out.update((i, train_one(requests[i])) for i in idx)
                continue
            reqs = [requests[i] for i in idx]
            datas = [r.data for r in reqs]
            prox = first.prox
            res = batched_local_train(
                first.model, [r.start for r in reqs], [d.x_train for d in datas], [d.y_train for d in datas],
                first.data.task, first.spec, [r.steps for r in reqs], [r.rng for r in reqs],
                trainable=first.trainable,
                prox_centers=None if prox is None else [r.prox.center for r in reqs],  # type: ignore[union-attr]
                prox_mu=0.0 if prox is None else prox.mu, memory_bytes=self.memory_bytes,
                objective=first.objective, bounds=first.bounds,
            )  # fmt: skip
            losses, seen = res.loss.tolist(), res.seen.tolist()
            for j, (i, arrays) in enumerate(zip(idx, res.all_arrays(), strict=True)):
                out[i] = Trained(arrays, losses[j], seen[j], reqs[j].steps)
        return out
