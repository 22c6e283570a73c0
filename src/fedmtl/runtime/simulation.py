"""The in-process simulator: the round (``fedmtl.runtime.round``) over the in-process transport.

Clients of a round train one after another (``runtime.execution: sequential``) or all at once,
their declared local work stacked on a client axis (``batched``; ``auto`` picks batched when the
algorithm and model allow it): ``fedmtl.training.executors``. Sampling, systems draws and
per-client rngs are the round's, the same in both, so they give the same updates to float
tolerance."""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from fedmtl.algorithms.base import Algorithm
from fedmtl.data.federated import FederatedData
from fedmtl.errors import ConfigError
from fedmtl.runtime.inprocess import InProcessTransport
from fedmtl.runtime.round import TRAIN_STREAM, Planner, RoundResult, RoundRunner, round_lr
from fedmtl.runtime.seeds import derived_rng
from fedmtl.runtime.threads import torch_owns_the_cores
from fedmtl.training import device, onednn
from fedmtl.training.batched import batch_support
from fedmtl.training.executors import BatchedExecutor, SequentialExecutor

log = logging.getLogger("fedmtl")

if TYPE_CHECKING:
    from fedmtl.config import Config

#: The purpose of each client's training stream (seed, TRAIN, round, client), as runtimes and
#: nodes build it.
TRAIN = TRAIN_STREAM

__all__ = ["TRAIN", "RoundResult", "Simulator", "derived_rng", "round_lr"]


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside a round. A round allocates a few small acyclic objects
    per client; with thousands of clients, that allocation count triggers full collections that
    walk every object of the federation (measured: a quarter of a 10,000-client batched round).
    Whatever cycles a round creates are collected after it."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class Simulator:
    def __init__(
        self, algo: Algorithm, data: FederatedData, cfg: Config, train_flops_per_sample: float
    ) -> None:
        self.algo = algo
        self.data = data
        self.cfg = cfg
        self.flops = train_flops_per_sample
        self.planner = Planner(cfg, data.train_clients)
        self.runner = RoundRunner(algo, cfg, self.planner, train_flops_per_sample, data)
        #: "sequential" or "batched": ``runtime.execution`` resolved once, before any round runs,
        #: so 'batched' on an unbatchable algorithm fails before a run directory exists.
        with onednn.enabled_as(cfg.runtime.onednn):  # the trial step probes products too
            self.execution = self._resolve_execution()
        #: Budget for what batched execution stacks at once (``runtime.batch_memory_gib``).
        gib = cfg.runtime.batch_memory_gib
        self.executor = (
            BatchedExecutor(int(gib * 2**30)) if self.execution == "batched" else SequentialExecutor()
        )
        self.transport = InProcessTransport(algo, data, self.executor, cfg.seed)
        #: ``runtime.device`` resolved (a CUDA request on a machine without one fails here)
        self.device = device.resolve(cfg.runtime.device)

    # --- execution backend ------------------------------------------------------------------
    def batched_unsupported(self) -> str | None:
        """Why this run's algorithm or model cannot train its clients batched (None if it can)."""
        if not self.algo.batchable:
            return f"algorithm {self.algo.name!r} trains with its own solver, not declared local work"
        sizes = self.data.train_sizes()
        client = self.data.clients[int(sizes.argmax())] if len(sizes) and sizes.max() > 0 else None
        if client is None:
            return "no client has training data"
        model = self.algo.ctx.model_for(client.task.name)
        return batch_support(model, client.task, client.x_train, client.y_train)

    def _resolve_execution(self) -> str:
        wanted = self.cfg.runtime.execution
        if wanted == "sequential":
            return "sequential"
        reason = self.batched_unsupported()
        if reason is None:
            return "batched"
        if wanted == "batched":
            raise ConfigError(f"config: runtime.execution = 'batched': {reason}; use 'auto' or 'sequential'")
        log.warning(f"runtime.execution = 'auto': training clients sequentially ({reason})")
        return "sequential"

    # --- one round ----------------------------------------------------------------------------
    def run_round(self, round: int, server: dict[str, Any], states: dict[int, dict[str, Any]]) -> RoundResult:
        """One synchronous round; ``states`` (client id -> client state) is updated in place."""
        self.transport.states = states
        onednn_on = onednn.enabled_as(self.cfg.runtime.onednn)
        with _gc_paused(), torch_owns_the_cores(), onednn_on, device.using(self.device):
            return self.runner.run(round, server, self.transport)
