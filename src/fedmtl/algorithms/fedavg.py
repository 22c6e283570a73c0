"""FedAvg (McMahan et al. 2017) and FedProx (Li et al. 2020), with an optional server optimizer."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from fedmtl.aggregation import ServerOptParams, server_opt_init, server_opt_step, weighted_mean
from fedmtl.algorithms.base import AlgoParams, Algorithm, ClientWork, Message, torch_params
from fedmtl.data.federated import ClientData
from fedmtl.training import local_train, num_local_steps, to_numpy


class FedAvgParams(AlgoParams):
    server_optimizer: ServerOptParams = ServerOptParams()


class FedAvg(Algorithm):
    """Clients train the whole model from the global one; the server takes the sample-weighted mean."""

    name = "fedavg"
    Params = FedAvgParams

    def prox_mu(self) -> float:
        return 0.0

    def init_server(self) -> dict[str, Any]:
        state = super().init_server()
        state["opt"] = server_opt_init(self.p.server_optimizer, state["params"])
        return state

    def client_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> tuple[dict[str, Any], Message]:
        start = torch_params(msg.arrays)
        spec = self.ctx.local.with_lr(work.lr)
        steps = num_local_steps(data.n_train, spec, work.fraction)
        mu = self.prox_mu()
        params, loss, seen = local_train(
            self.ctx.model,
            start,
            data.x_train,
            data.y_train,
            data.task,
            spec,
            steps,
            work.rng,
            prox_center=start if mu > 0 else None,
            prox_mu=mu,
        )
        reply = Message(
            arrays=to_numpy(params),
            scalars={"num_examples": data.n_train, "train_loss": loss, "steps": steps, "samples": seen},
        )
        return state, reply

    def server_step(self, server: dict[str, Any], replies: dict[int, Message], round: int) -> dict[str, Any]:
        if not replies:
            return server
        msgs = [replies[c] for c in sorted(replies)]
        mean = weighted_mean([m.arrays for m in msgs], [float(m.scalars["num_examples"]) for m in msgs])
        params, opt = server_opt_step(self.p.server_optimizer, server["params"], mean, server["opt"])
        return {**server, "params": params, "opt": opt}


class FedProxParams(FedAvgParams):
    mu: float = Field(0.01, ge=0)


class FedProx(FedAvg):
    """FedAvg plus the proximal term (mu/2)||w - w_global||^2 in every client's objective."""

    name = "fedprox"
    Params = FedProxParams

    def prox_mu(self) -> float:
        return float(self.p.mu)
