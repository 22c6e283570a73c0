"""FedAvg (McMahan et al. 2017) and FedProx (Li et al. 2020), with an optional server optimizer.

The contract's defaults are FedAvg already (train the received model, reduce the replies to their
sample-weighted mean, heads per task); this adds the server optimizer (FedAvgM, FedAdam) on the
aggregate and FedProx's proximal term."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from pydantic import Field

from fedmtl.aggregation import ServerOptParams, server_opt_init, server_opt_step
from fedmtl.algorithms.base import AlgoParams, Algorithm, ClientWork, Message
from fedmtl.algorithms.reduce import Aggregate
from fedmtl.data.federated import ClientData
from fedmtl.training.objectives import Prox
from fedmtl.training.work import Train, Trained


class FedAvgParams(AlgoParams):
    server_optimizer: ServerOptParams = ServerOptParams()


class FedAvg(Algorithm):
    """Clients train the whole model from the global one; the server takes the sample-weighted mean."""

    name = "fedavg"
    Params = FedAvgParams

    def prox_mu(self) -> float:
        return 0.0

    def init_server(self) -> dict[str, Any]:
        server = super().init_server()
        return {**server, "opt": server_opt_init(self.p.server_optimizer, server["params"])}

    def client_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> Generator[Train, Trained, tuple[dict[str, Any], Message]]:
        """Train the received model; FedProx adds the proximal term toward it."""
        mu = self.prox_mu()
        trained = yield self.ctx.train(data, work, msg.arrays, prox=Prox(msg.arrays, mu) if mu > 0 else None)
        return state, Message(arrays=trained.params, scalars=trained.scalars(data))

    def server_update(self, server: dict[str, Any], aggregate: Aggregate, round: int) -> dict[str, Any]:
        """One server-optimizer step toward the aggregate (plain FedAvg: take it)."""
        if aggregate.empty:
            return server
        params, opt = server_opt_step(
            self.p.server_optimizer, server["params"], aggregate.params, server["opt"]
        )
        return {**server, "params": params, "opt": opt}


class FedProxParams(FedAvgParams):
    mu: float = Field(0.01, ge=0)


class FedProx(FedAvg):
    """FedAvg plus the proximal term (mu/2)||w - w_global||^2 in every client's objective."""

    name = "fedprox"
    Params = FedProxParams

    def prox_mu(self) -> float:
        return float(self.p.mu)
