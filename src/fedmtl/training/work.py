"""Local work as an algorithm declares it, and how a client step hands it to an executor.

A client step that trains is a generator: it ``yield``s a ``Train`` request for each piece of
local training (FedRep yields its head phase, then its body phase; Ditto its global model, then
its personal one) and gets back a ``Trained`` result; it ``return``s ``(new state, reply)``::

    def client_step(self, state, data, msg, work):
        trained = yield self.train(data, work, msg.arrays)
        return state, Message(arrays=trained.params, scalars=trained.scalars(data))

An executor carries the requests out: one client after another (``SequentialExecutor``), or all
clients of a round at once, request by request, stacked on a client axis (``BatchedExecutor``).
So an algorithm is written once and runs both ways; a wrapper changes a step with ``yield from``
(``local_work``) or rewrites its requests (``map_requests``). A client step with no training to
declare (MOCHA's SDCA, FedBone's split steps) is a plain function returning the pair."""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from fedmtl.training.local import LocalSpec
from fedmtl.training.objectives import TASK_LOSS, Objective, Prox
from fedmtl.training.shuffle import Randomness

if TYPE_CHECKING:
    from fedmtl.data.federated import ClientData

ArrayMap = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class DPSGD:
    """Sample-level DP-SGD in place of plain gradient steps: per-sample gradients clipped to
    ``clip``, Gaussian noise of std ``noise_multiplier * clip`` on their sum (``training.dp_sgd``)."""

    clip: float
    noise_multiplier: float
    noise_rng: np.random.Generator


@dataclass(slots=True)
class Train:
    """One piece of local training: ``steps`` optimizer steps of ``spec`` from ``start`` on
    ``data``'s training split, mini-batches drawn from ``rng``.

    ``trainable``: the keys that train (None: all; the others stay as given). ``prox``: the
    proximal term toward a centre. ``objective``: what each batch minimises (default: the task
    loss). ``bounds``: ``(key, low, high)`` projections after every step. ``dp``: DP-SGD steps.
    Treat it as immutable (``dataclasses.replace`` makes a changed copy); it is not frozen only
    because a frozen dataclass costs microseconds per field to build, thousands of times a round."""

    model: nn.Module
    start: ArrayMap
    data: ClientData
    spec: LocalSpec
    steps: int
    rng: Randomness
    trainable: tuple[str, ...] | None = None
    prox: Prox | None = None
    objective: Objective = TASK_LOSS
    bounds: tuple[tuple[str, float, float], ...] = ()
    dp: DPSGD | None = None


@dataclass(slots=True)
class Trained:
    """The outcome of a ``Train``: parameters (every key of the start), the mean training loss,
    the samples processed and the steps taken. In batched execution ``params`` are views into the
    round's stacks: ``kept()`` copies them for anything that outlives the round (client state)."""

    params: dict[str, np.ndarray]
    loss: float
    seen: int
    steps: int
    #: the arrays are this result's own (not views into a batched round's stacks)
    owned: bool = False

    def kept(self) -> dict[str, np.ndarray]:
        if self.owned:
            return dict(self.params)
        return {k: np.array(v, copy=True) for k, v in self.params.items()}

    def scalars(self, data: ClientData) -> dict[str, Any]:
        """The reply scalars every training client reports (FedAvg weights by ``num_examples``)."""
        return {
            "num_examples": data.n_train,
            "train_loss": self.loss,
            "steps": self.steps,
            "samples": self.seen,
        }


Step = tuple[dict[str, Any], Any]
#: What ``client_step`` returns: the (state, reply) pair, or a generator of ``Train`` requests
#: that returns it.
StepResult = Step | Generator[Train, Trained, Step]


def local_work(result: StepResult) -> Generator[Train, Trained, Step]:
    """``(yield from local_work(inner.client_step(...)))``: an inner step's (state, reply), its
    requests passed through, whether it declares local work or not."""
    if isinstance(result, Generator):
        return (yield from result)
    return result


def map_requests(result: StepResult, change: Callable[[Train], Train]) -> Generator[Train, Trained, Step]:
    """Like ``local_work``, with every request of the inner step rewritten by ``change`` (sample
    DP turns its steps into DP-SGD steps, whatever the algorithm trains)."""
    if not isinstance(result, Generator):
        return result
    try:
        request = next(result)
        while True:
            request = result.send((yield change(request)))
    except StopIteration as stop:
        return stop.value
