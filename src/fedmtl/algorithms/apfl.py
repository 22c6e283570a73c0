"""APFL (Deng, Kamani & Mahdavi 2020, "Adaptive Personalized Federated Learning").

Each client keeps a personal model v and a mixing weight alpha in [0, 1]; its personalised model
is the mixture v_bar = alpha v + (1 - alpha) w of v and the global model w. Per local step, on
the same mini-batch (the paper's Algorithm 1):

- w takes a gradient step on the client's loss f(w) (w is then averaged by the server, as FedAvg);
- v takes a step on f(v_bar), whose gradient in v is alpha * grad f(v_bar);
- alpha takes a step on f(v_bar), whose gradient is <v - w, grad f(v_bar)>, then is projected
  onto [0, 1] (``adaptive: false`` keeps it fixed).

All three come from one objective, f(w) + f(alpha v + (1 - alpha) sg(w)) with the stop-gradient
sg on w inside the mixture, so any executor computes the paper's simultaneous updates from one
backward pass. v and alpha never leave the client. This is the parameter mixture of the paper's
algorithm; some implementations (FL-bench, the authors' FedTorch code) mix the two models'
outputs instead.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call

from fedmtl.algorithms.base import AlgoContext, ClientWork, Message
from fedmtl.algorithms.fedavg import FedAvg, FedAvgParams
from fedmtl.algorithms.reduce import Aggregate
from fedmtl.data.federated import ClientData, TaskSpec
from fedmtl.training.fused import MixtureChainStep
from fedmtl.training.objectives import Objective, per_sample_loss
from fedmtl.training.optim import OptimizerSpec
from fedmtl.training.tensors import Arrays
from fedmtl.training.work import Train, Trained

PERSONAL = "apfl.v/"  # prefix of the personal model's keys while it trains beside w
ALPHA = "apfl.alpha"


class APFLParams(FedAvgParams):
    alpha: float = Field(0.5, ge=0, le=1, description="initial mixing weight of the personal model")
    adaptive: bool = Field(True, description="learn alpha per client (false: keep it fixed)")


class Mixture(Objective):
    """f(w) + f(alpha v + (1 - alpha) sg(w)) per sample; reports f(w), the global model's loss."""

    is_task_loss = False

    def __init__(self, keys: list[str]) -> None:
        self.keys = list(keys)

    def per_sample(
        self,
        model: nn.Module,
        params: Mapping[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        task: TaskSpec,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        w = {k: params[k] for k in self.keys}
        alpha = params[ALPHA]
        mixed = {k: alpha * params[PERSONAL + k] + (1 - alpha) * w[k].detach() for k in self.keys}
        global_loss = per_sample_loss(functional_call(model, w, (x,)), y, task)
        mixed_loss = per_sample_loss(functional_call(model, mixed, (x,)), y, task)
        return global_loss + mixed_loss, global_loss

    def chain_step(
        self,
        chain: list[Any],
        task: TaskSpec,
        opt: OptimizerSpec,
        trainable: set[str],
        mu: float,
        bounds: Sequence[tuple[str, float, float]],
    ) -> MixtureChainStep | None:
        """The hand-written step of this objective for MLPs under plain SGD (the usual setting);
        anything else trains on the generic autograd step."""
        plain_sgd = opt.name == "sgd" and opt.momentum == 0 and opt.weight_decay == 0 and mu == 0
        if not plain_sgd or not trainable >= {PERSONAL + k for k in self.keys} | set(self.keys):
            return None
        return MixtureChainStep(chain, task, opt, PERSONAL, ALPHA, learn_alpha=ALPHA in trainable)


def mix(alpha: float, personal: Arrays, global_: Mapping[str, np.ndarray]) -> Arrays:
    """alpha v + (1 - alpha) w, key by key, in each key's dtype."""
    return {k: (alpha * personal[k] + (1 - alpha) * w).astype(w.dtype) for k, w in global_.items()}


class APFL(FedAvg):
    name = "apfl"
    Params = APFLParams

    def __init__(self, params: APFLParams, ctx: AlgoContext) -> None:
        super().__init__(params, ctx)
        self.objective = Mixture(list(ctx.init_arrays))

    def init_client(self, cid: int) -> dict[str, Any]:
        init = self.ctx.init_for(self.ctx.task_of(cid))
        return {
            "personal": {k: v.copy() for k, v in init.items()},
            "alpha": np.array([self.p.alpha], np.float32),
        }

    def client_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> Generator[Train, Trained, tuple[dict[str, Any], Message]]:
        personal = state["personal"]
        start = {**msg.arrays, **{PERSONAL + k: v for k, v in personal.items()}, ALPHA: state["alpha"]}
        trainable = None if self.p.adaptive else [k for k in start if k != ALPHA]
        trained = yield self.ctx.train(
            data, work, start, trainable=trainable, objective=self.objective, bounds=[(ALPHA, 0.0, 1.0)]
        )
        out = trained.params
        reply = Message(arrays={k: out[k] for k in msg.arrays}, scalars=trained.scalars(data))
        alpha = np.array(out[ALPHA], dtype=np.float32)
        reply.scalars["alpha"] = float(alpha[0])
        mine = {k: np.array(out[PERSONAL + k]) for k in personal}
        return {"personal": mine, "alpha": alpha}, reply

    def server_update(self, server: dict[str, Any], aggregate: Aggregate, round: int) -> dict[str, Any]:
        new = super().server_update(server, aggregate, round)
        alphas = [float(r.scalars["alpha"]) for r in aggregate.replies.values() if "alpha" in r.scalars]
        return {**new, "alpha_mean": float(np.mean(alphas))} if alphas else new

    def round_info(self, server: dict[str, Any]) -> dict[str, Any]:
        info = super().round_info(server)
        if "alpha_mean" in server:
            info["alpha_mean"] = server["alpha_mean"]
        return info

    def eval_arrays(
        self, server: dict[str, Any], state: dict[str, Any], cid: int, data: ClientData | None = None
    ) -> Arrays:
        """The personalised model v_bar = alpha v + (1 - alpha) w with the current global w."""
        w = self.broadcast(server, cid).arrays
        if not state:
            return w
        return mix(float(state["alpha"][0]), state["personal"], w)

    def shared_eval_arrays(self, server: dict[str, Any], state: dict[str, Any], cid: int) -> Arrays | None:
        return self.broadcast(server, cid).arrays
