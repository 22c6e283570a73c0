"""FDRMFL (Wu 2025, arXiv 2512.02076): federated multi-modal feature extraction for regression.

Clients train the whole network (modality encoders, fusion, regression head) on
``MSE + mu * (w_mi L_MI + w_kl L_KL + w_cl L_CL)`` (``fedmtl.fdrmfl.losses``), starting from the
global model; the round reduces the clients' models to their (sample-weighted) mean, through any
chain the run configures, and the server blends it with the previous global model:
``new = retention * previous + (1 - retention) * mean`` (``fedmtl.aggregation.retention``).

Two readings of the KL and contrastive terms (``formulation``):

- ``described`` (the paper's abstract): L_KL is the symmetric KL between the client's Z
  distribution and the received global model's Z distribution on the same batch (client-to-global
  consensus), L_CL an InfoNCE between two modalities of the same sample against the batch's other
  samples (``consensus_kl``, ``cross_modal_infonce``).
- ``notebook`` (the authors' notebooks, this project's first implementation): L_KL aligns the
  modality embeddings of one client with each other, L_CL is MOON-style against older global models
  (``kl_alignment``, ``contrastive_loss``). It needs older global models: each client keeps the last
  ``negatives`` global models it received in its own state (they never travel back), so the
  algorithm talks only through ``Message``s and runs unchanged on the Flower runtime.

The algorithm builds its network from the dataset's modality layout (``fedmtl.fdrmfl.data``) and
puts it in the context, so evaluation and the Flower apps use it like any other model; sizes are
under ``algorithm.net``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from fedmtl.aggregation.retention import retain
from fedmtl.algorithms.base import AlgoContext, AlgoParams, Algorithm, ClientWork, Message
from fedmtl.algorithms.reduce import Aggregate, Reduce
from fedmtl.data.federated import ClientData
from fedmtl.errors import ConfigError
from fedmtl.fdrmfl.data import Layout, layout_for
from fedmtl.fdrmfl.losses import (
    consensus_kl,
    contrastive_loss,
    cross_modal_infonce,
    kl_alignment,
    mi_loss,
    phase_weights,
)
from fedmtl.fdrmfl.model import MIProbe, NetParams, build_net, encode, head
from fedmtl.training import batch_schedule, num_local_steps, optim, to_numpy, to_torch
from fedmtl.training.tensors import Arrays, Params, model_arrays

PROBE_SEED = 1234  # the MI probe is fixed data of the method, identical everywhere


class FDRMFLParams(AlgoParams):
    net: NetParams = NetParams()
    formulation: Literal["described", "notebook"] = Field(
        "described",
        description="described: client-to-global KL + cross-modal InfoNCE (the paper's abstract); "
        "notebook: modality-to-modality KL + MOON-style contrast (the authors' notebooks)",
    )
    mu: float = Field(1e-3, ge=0, description="weight of all auxiliary terms together (authors: 1e-3)")
    mi_weight: float = Field(1.0, ge=0, description="mutual-information preservation term (0: off)")
    kl_weight: float = Field(1.0, ge=0, description="symmetric-KL term (0: off)")
    cl_weight: float = Field(1.0, ge=0, description="contrastive term (0: off)")
    schedule: Literal["constant", "halves"] = "constant"
    kl_sigma: float = Field(0.1, gt=0, description="notebook: std of the Gaussians in the KL term")
    kl_mean: Literal["batch", "sample"] = "batch"
    kl_var_floor: float = Field(1e-4, gt=0, description="described: added to each batch variance of Z")
    tau: float = Field(0.5, gt=0, description="contrastive temperature")
    negatives: int = Field(3, ge=1, description="notebook: older global models kept as negatives")
    retention: float = Field(0.1, ge=0, le=1, description="share of the previous global model kept")
    weighting: Literal["samples", "uniform"] = "samples"
    clip_norm: float | None = Field(5.0, gt=0, description="gradient norm clip (null: none)")
    layout: str | None = Field(None, description="dataset whose modality layout to use (default: the data's)")


class FDRMFL(Algorithm):
    name = "fdrmfl"
    Params = FDRMFLParams
    batchable = False

    def __init__(self, params: FDRMFLParams, ctx: AlgoContext) -> None:  # type: ignore[override]
        super().__init__(params, ctx)
        if ctx.multi_task:
            raise ConfigError(
                "config: data.tasks: algorithm 'fdrmfl' solves one regression task; remove data.tasks"
            )
        if ctx.task.is_classification:
            raise ConfigError(
                f"config: data.dataset = {ctx.task.name!r}: algorithm 'fdrmfl' needs a regression task"
            )
        self.layout: Layout = layout_for(params.layout or ctx.task.name)
        self.net = build_net(self.layout, params.net, ctx.seed)
        init = model_arrays(self.net)
        # Evaluation and the Flower apps predict with ctx.model: make it this network.
        ctx.model = self.net
        ctx.init_arrays = init
        ctx.models = {name: self.net for name in (ctx.models or {ctx.task.name: None})}
        ctx.task_init = {name: init for name in ctx.models}
        self.probe = MIProbe(params.net.feature_dim, seed=PROBE_SEED)

    # --- server ---------------------------------------------------------------------------------
    def init_server(self) -> dict[str, Any]:
        return {"params": {k: v.copy() for k, v in self.ctx.init_arrays.items()}}

    def reduction(self, server: dict[str, Any], replies: dict[int, Message], round: int) -> Reduce:
        weights = None if self.p.weighting == "samples" else dict.fromkeys(replies, 1.0)
        return Reduce(replies, server["params"], weights=weights)

    def server_update(self, server: dict[str, Any], aggregate: Aggregate, round: int) -> dict[str, Any]:
        """The retention blend of the previous model and the round's mean."""
        if aggregate.empty:
            return server
        return {**server, "params": retain(server["params"], aggregate.params, self.p.retention)}

    # --- client ---------------------------------------------------------------------------------
    def client_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> tuple[dict[str, Any], Message]:
        history: list[Arrays] = list(state.get("history", []))
        params, stats, steps = self.local_train(msg.arrays, history, data, work)
        reply = Message(
            arrays=to_numpy(params),
            scalars={"num_examples": data.n_train, "steps": steps, "samples": stats.pop("samples"), **stats},
        )
        # The global model just received becomes the newest negative for the next round (only the
        # notebook's contrastive term uses older global models).
        if self.p.formulation == "notebook":
            history = [{k: v.copy() for k, v in msg.arrays.items()}, *history][: self.p.negatives]
        return {**state, "history": history}, reply

    def local_train(
        self, start: Arrays, history: list[Arrays], data: ClientData, work: ClientWork
    ) -> tuple[Params, dict[str, float], int]:
        """Local steps on the FDRMFL objective; returns (params, mean loss terms, steps)."""
        p = self.p
        spec = self.ctx.local.with_lr(work.lr)
        steps = num_local_steps(data.n_train, spec, work.fraction)
        x = torch.as_tensor(data.x_train)
        y = torch.as_tensor(data.y_train)
        described = p.formulation == "described"
        use_cl = not described and p.mu > 0 and p.cl_weight > 0 and bool(history)
        use_consensus = described and p.mu > 0 and p.kl_weight > 0
        with torch.no_grad():  # fixed models' features, one pass each: the received global model's
            # (notebook: the contrastive positive; described: the KL consensus) and older ones
            z_global = encode(self.net, to_torch(start), x).z if use_cl or use_consensus else None
            negatives = [encode(self.net, to_torch(h), x).z for h in history] if use_cl else []
        current = {k: v.clone() for k, v in to_torch(start).items()}
        opt_state = optim.init_state(spec.optimizer, current)
        sums = dict.fromkeys(("train_loss", "loss_mi", "loss_kl", "loss_cl", "loss_total"), 0.0)
        seen = 0
        for i, idx in enumerate(batch_schedule(len(y), spec.batch_size, steps, work.rng)):
            leaves = {k: v.requires_grad_(True) for k, v in current.items()}
            enc = encode(self.net, leaves, x[idx])
            pred = head(self.net, leaves, enc.z).reshape(-1)
            mse = torch.nn.functional.mse_loss(pred, y[idx])
            w_mi, w_kl, w_cl = phase_weights(p.mi_weight, p.kl_weight, p.cl_weight, p.schedule, i, steps)
            zero = mse.new_zeros(())
            l_mi = mi_loss(self.probe(enc.z), y[idx]) if p.mu > 0 and w_mi > 0 else zero
            l_kl = l_cl = zero
            if described:
                if use_consensus and w_kl > 0:
                    l_kl = consensus_kl(enc.z, z_global[idx], p.kl_var_floor)  # type: ignore[index]
                if p.mu > 0 and w_cl > 0:
                    l_cl = cross_modal_infonce(enc.h, enc.mask, p.tau)
            else:
                if p.mu > 0 and w_kl > 0:
                    l_kl = kl_alignment(enc.h, enc.mask, p.kl_sigma, p.kl_mean)
                if use_cl and w_cl > 0:
                    l_cl = contrastive_loss(enc.z, z_global[idx], [n[idx] for n in negatives], p.tau)  # type: ignore[index]
            total = mse + p.mu * (w_mi * l_mi + w_kl * l_kl + w_cl * l_cl)
            grads = dict(zip(leaves, torch.autograd.grad(total, list(leaves.values())), strict=True))
            if p.clip_norm is not None:
                norm = torch.sqrt(sum((g * g).sum() for g in grads.values()))
                if float(norm) > p.clip_norm:
                    grads = {k: g * (p.clip_norm / float(norm)) for k, g in grads.items()}
            current = optim.step(spec.optimizer, leaves, grads, opt_state)
            n = len(idx)
            for key, val in zip(sums, (mse, l_mi, l_kl, l_cl, total), strict=True):
                sums[key] += float(val.detach()) * n
            seen += n
        stats = {k: v / max(seen, 1) for k, v in sums.items()}
        stats["samples"] = seen
        return {k: v.detach() for k, v in current.items()}, stats, steps
