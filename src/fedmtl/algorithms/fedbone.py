"""FedBone (Chen et al. 2023): split learning with a server-side general model and GPAggregation.

Each client keeps a light embedding, a task-adaptation module and its task head; the server keeps
the large general model every client's features pass through. A round is a multi-step protocol:
the server's ``server_round`` yields one exchange per protocol step, which the runtime delivers
(the simulator runs the client actions in-process, the Flower runtime sends ``train.<action>``
messages):

==========  ==============================  ===============================================
action      server -> client                client -> server
==========  ==============================  ===============================================
embed       step 0                          activations z = E(x) of its first batch, steps
head        features f = G(z)               dL/df (the client steps its adapter and head)
backward    dL/dz (server back-propagated)  next batch's activations (the client steps E)
==========  ==============================  ===============================================

Labels and raw inputs never leave the client: its replies carry ``z``, ``df`` and scalars (step
count, data size, loss). The server collects each client's general-model gradient (its VJP of
``df``), aggregates them with GPAggregation (or a plain mean) and steps the general model, per
batch (default) or once per round. Client parts are never averaged.

Open choices the paper leaves unverified are config values: ``aggregation`` (gp/mean), ``rescale``,
``project``, ``weighting``, ``server_update`` (per_batch/per_round) and the server optimizer."""

from __future__ import annotations

from collections.abc import Generator, Mapping
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch.func import functional_call

from fedmtl.aggregation.gradient_projection import GPOptions, gp_aggregate
from fedmtl.algorithms.base import (
    AlgoContext,
    AlgoParams,
    Algorithm,
    ClientAction,
    ClientWork,
    Exchange,
    Expected,
    Message,
    ServerRound,
)
from fedmtl.algorithms.message import OptionalKey
from fedmtl.data.federated import ClientData
from fedmtl.errors import ConfigError, ProtocolError
from fedmtl.fedbone.flops import TRAIN_FACTOR, hook_flops, part_flops
from fedmtl.fedbone.model import CLIENT_PARTS, SERVER_PART, FedBoneNet, part_of
from fedmtl.training import batch_schedule, num_local_steps
from fedmtl.training import optim as fopt
from fedmtl.training.objectives import task_loss
from fedmtl.training.tensors import Arrays

GP_RNG = 51  # rng purpose for the projection order


class FedBoneParams(AlgoParams):
    aggregation: Literal["gp", "mean"] = Field("gp", description="gp: GPAggregation; mean: plain average")
    rescale: bool = Field(True, description="gp: history attention rescaling of client gradients")
    project: bool = Field(True, description="gp: project out conflicting (negative-cosine) components")
    weighting: Literal["uniform", "samples"] = "uniform"
    server_update: Literal["per_batch", "per_round"] = "per_batch"
    server_optimizer: Literal["sgd", "adam"] = "adam"
    server_lr: float = Field(3e-3, gt=0)
    server_momentum: float = Field(0.0, ge=0, lt=1)
    server_weight_decay: float = Field(0.0, ge=0)
    client_sharing: Literal["none", "task"] = Field(
        "none", description="task: average client parts within each task group after every round"
    )


def _strip(arrays: Mapping[str, Any], part: str) -> dict[str, Any]:
    n = len(part) + 1
    return {k[n:]: v for k, v in arrays.items() if part_of(k) == part}


def _tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v) for k, v in arrays.items()}


def _numpy(tree: Any) -> Any:
    """Optimizer state (nested dicts of tensors and ints) -> numpy, for checkpoints and the wire."""
    if isinstance(tree, dict):
        return {k: _numpy(v) for k, v in tree.items()}
    if isinstance(tree, torch.Tensor):
        return tree.detach().numpy().copy()
    return tree


def _torch(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _torch(v) for k, v in tree.items()}
    if isinstance(tree, np.ndarray):
        return torch.from_numpy(np.array(tree))
    return int(tree) if isinstance(tree, np.integer) else tree


class FedBone(Algorithm):
    name = "fedbone"
    Params = FedBoneParams
    has_global_model = False
    batchable = False
    reduces = "own"
    reduces_why = (
        "its split rounds aggregate general-model gradients inside their own exchanges "
        "(algorithm.aggregation: gp or mean)"
    )

    def __init__(self, params: FedBoneParams, ctx: AlgoContext) -> None:
        super().__init__(params, ctx)
        models = ctx.models or {ctx.task.name: ctx.model}
        for model in models.values():
            if not isinstance(model, FedBoneNet):
                raise ConfigError(
                    f"config: algorithm.name = 'fedbone': needs model.name = 'fedbone_net' (client "
                    f"embedding/adapter/head around a server general model), not {type(model).__name__}"
                )
        self.general = ctx.model.general
        first = ctx.init_for(ctx.task.name)
        for task in models:
            other = ctx.init_for(task)
            if any(not np.array_equal(v, other[k]) for k, v in first.items() if part_of(k) == SERVER_PART):
                raise ConfigError(f"config: task {task!r} starts from a different general model")
        self._client_flops: dict[tuple[str, tuple[int, ...]], float] = {}
        self._server_flops: dict[tuple[int, ...], float] = {}

    # --- helpers --------------------------------------------------------------------------------
    def model(self, task: str) -> FedBoneNet:
        return self.ctx.model_for(task)  # type: ignore[return-value]

    def client_flops(self, task: str, input_shape: tuple[int, ...]) -> float:
        """Training FLOPs per sample of a ``task`` client's parts (embed, adapter, head)."""
        key = (task, tuple(input_shape))
        if key not in self._client_flops:
            f = part_flops(self.model(task), input_shape)
            self._client_flops[key] = TRAIN_FACTOR * (f["embed"] + f["adapter"] + f["head"])
        return self._client_flops[key]

    def server_flops(self, z_shape: tuple[int, ...]) -> float:
        """Training FLOPs per sample of the general model on activations of shape ``z_shape``."""
        if z_shape not in self._server_flops:
            fl, _ = hook_flops(self.general, torch.zeros((1, *z_shape)))
            self._server_flops[z_shape] = TRAIN_FACTOR * fl
        return self._server_flops[z_shape]

    def _opt(self, lr: float) -> fopt.OptimizerSpec:
        return fopt.OptimizerSpec(
            name=self.ctx.local.optimizer.name,
            lr=lr,
            momentum=self.ctx.local.optimizer.momentum,
            weight_decay=self.ctx.local.optimizer.weight_decay,
        )

    def _server_opt(self) -> fopt.OptimizerSpec:
        p = self.p
        return fopt.OptimizerSpec(
            name=p.server_optimizer,
            lr=p.server_lr,
            momentum=p.server_momentum,
            weight_decay=p.server_weight_decay,
        )

    def _schedule(self, data: ClientData, work: ClientWork, step: int) -> list[np.ndarray]:
        """This round's mini-batches (the schedule ``local_train`` draws from the same rng); every
        message brings a fresh copy of the round's rng, so each action draws it once."""
        spec = self.ctx.local.with_lr(work.lr)
        steps = num_local_steps(data.n_train, spec, work.fraction)
        if not 0 <= step < steps:
            raise ProtocolError(f"fedbone: step {step} out of range: this client does {steps} steps")
        return batch_schedule(data.n_train, spec.batch_size, steps, work.rng)

    # --- server -------------------------------------------------------------------------------
    def init_server(self) -> dict[str, Any]:
        params = {k: v.copy() for k, v in self.ctx.init_arrays.items() if part_of(k) == SERVER_PART}
        opt = fopt.init_state(self._server_opt(), _tensors(params))
        return {"params": params, "opt": _numpy(opt), "history": {}, "info": {}}

    def broadcast(self, server: dict[str, Any], cid: int) -> Message:
        return Message()  # the round's messages all travel in server_round's exchanges

    def _aggregate(
        self,
        grads: dict[int, dict[str, torch.Tensor]],
        sizes: dict[int, float],
        history: Arrays,
        rng: np.random.Generator,
    ) -> tuple[Arrays, dict[str, float]]:
        cids = sorted(grads)
        arrays = [{k: v.numpy() for k, v in grads[c].items()} for c in cids]
        p = self.p
        gp = p.aggregation == "gp"
        weights = [sizes[c] for c in cids] if p.weighting == "samples" else None
        opts = GPOptions(rescale=gp and p.rescale, project=gp and p.project, weights=weights)
        res = gp_aggregate(arrays, history or None, opts, rng)
        stats = {"conflicts": res.conflicts, "pairs": res.pairs, "projections": res.projections}
        if res.attention:
            stats["attention_max"] = max(res.attention)
            stats["attention_min"] = min(res.attention)
        return res.aggregate, stats

    def client_actions(self) -> dict[str, ClientAction]:
        return {
            "embed": self.client_embed,
            "head": self.client_head,
            "backward": self.client_backward,
            "upload": self.client_upload,
            "download": self.client_download,
        }

    def server_round(self, server: dict[str, Any], round: int, clients: list[int]) -> ServerRound:
        """One round of split training: an ``embed`` exchange, then ``head``/``backward`` exchanges
        per batch (and ``upload``/``download`` with ``client_sharing: task``); returns the new state
        and, per client that took part, a summary reply (loss, steps, samples) for the records."""
        if not clients:
            return server, {}
        theta = {k: torch.tensor(v) for k, v in server["params"].items()}
        sopt = self._server_opt()
        opt_state = _torch(server["opt"])
        history: Arrays = dict(server.get("history") or {})
        per_round = self.p.server_update == "per_round"
        accum: dict[int, dict[str, torch.Tensor]] = {}
        sizes: dict[int, float] = {}
        losses: dict[int, list[tuple[float, int]]] = {}
        totals = {"conflicts": 0, "pairs": 0, "projections": 0, "aggregations": 0}
        att: list[float] = []

        def update(grads: dict[int, dict[str, torch.Tensor]], step: int) -> None:
            """GPAggregation of the clients' general-model gradients, then one server step."""
            nonlocal theta, history
            rng = np.random.default_rng([self.ctx.seed, GP_RNG, round, step])
            agg, stats = self._aggregate(grads, sizes, history, rng)
            theta = fopt.step(sopt, theta, _tensors(agg), opt_state)
            history = agg
            for k in ("conflicts", "pairs", "projections"):
                totals[k] += int(stats[k])
            totals["aggregations"] += 1
            att.extend([stats.get("attention_min", 1.0), stats.get("attention_max", 1.0)])

        # What each reply must look like; the round refuses any other (a diverged client's
        # non-finite gradients included) and takes that client out of the rest of the round.
        activations: Expected = {"z": (None, None, None, None)}
        replies = yield Exchange(
            "embed", {c: Message(scalars={"step": 0}) for c in clients}, dict.fromkeys(clients, activations)
        )
        z = {}
        flops: dict[int, tuple[float, float]] = {}
        for c, r in sorted(replies.items()):
            z[c] = self._activations(c, r)
            sizes[c] = float(r.scalars.get("num_examples", 1))
            flops[c] = (float(r.scalars.get("flops_per_sample", 0.0)), self.server_flops(z[c].shape[1:]))
        t = 0
        while z:
            active = sorted(z)
            leaves = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
            params = _strip(leaves, SERVER_PART)
            outs = {}
            for c in active:
                zc = torch.as_tensor(z[c]).requires_grad_(True)
                outs[c] = (zc, functional_call(self.general, params, (zc,)))
            heads = yield Exchange(
                "head",
                {c: Message(arrays={"f": outs[c][1].detach().numpy()}, scalars={"step": t}) for c in active},
                {c: {"df": tuple(outs[c][1].shape)} for c in active},
            )
            grads: dict[int, dict[str, torch.Tensor]] = {}
            dz: dict[int, np.ndarray] = {}
            for c in sorted(heads):
                zc, fc = outs[c]
                df = heads[c].arrays["df"]
                g = torch.autograd.grad(fc, [zc, *leaves.values()], grad_outputs=torch.as_tensor(df))
                dz[c] = g[0].numpy()
                grads[c] = dict(zip(leaves, g[1:], strict=True))
                loss = float(heads[c].scalars.get("loss", float("nan")))
                losses.setdefault(c, []).append((loss, int(fc.shape[0])))
            if per_round:
                for c, g in grads.items():
                    accum[c] = g if c not in accum else {k: accum[c][k] + g[k] for k in g}
            elif grads:
                update(grads, t)
            back = yield Exchange(
                "backward",
                {c: Message(arrays={"dz": dz[c]}, scalars={"step": t}) for c in dz},
                dict.fromkeys(dz, {"z": OptionalKey((None, None, None, None))}),
            )
            z = {c: self._activations(c, r) for c, r in back.items() if "z" in r.arrays}
            t += 1
        if per_round and accum:
            update(accum, 0)
        if self.p.client_sharing == "task":
            yield from self._share_within_tasks(sorted(losses))
        info = self._round_facts(totals, att, losses, flops)
        new = {
            "params": {k: v.detach().numpy().copy() for k, v in theta.items()},
            "opt": _numpy(opt_state),
            "history": history,
            "info": info,
        }
        summary = {}
        for c, ls in losses.items():
            seen = sum(n for _, n in ls)
            summary[c] = Message(
                scalars={
                    "num_examples": sizes[c],
                    "train_loss": sum(v * n for v, n in ls) / max(seen, 1),
                    "steps": len(ls),
                    "samples": seen,
                    "client_flops": seen * flops[c][0],
                }
            )
        return new, summary

    def _share_within_tasks(self, cids: list[int]) -> Generator[Exchange, dict[int, Message], None]:
        """FedAvg of the client parts among this round's clients of each task (an open option of the
        spec: whether same-task clients share their adapter and head); weighted by data size."""
        if not cids:
            return
        ups = yield Exchange("upload", {c: Message() for c in cids})
        groups: dict[str, list[int]] = {}
        for c in sorted(ups):
            groups.setdefault(self.ctx.task_of(c), []).append(c)
        down: dict[int, Message] = {}
        for members in groups.values():
            w = np.array([float(ups[c].scalars.get("num_examples", 1)) for c in members])
            keys = sorted(ups[members[0]].arrays)
            for c in members:
                if sorted(ups[c].arrays) != keys:
                    raise ProtocolError(f"fedbone: client {c} uploaded keys unlike its task group's")
            mean = {
                k: (
                    sum(wi * ups[c].arrays[k].astype(np.float64) for wi, c in zip(w, members, strict=True))
                    / w.sum()
                ).astype(ups[members[0]].arrays[k].dtype)
                for k in keys
            }
            down.update({c: Message(arrays=mean) for c in members})
        yield Exchange("download", down)

    def _activations(self, cid: int, reply: Message) -> np.ndarray:
        z = reply.arrays.get("z")
        if z is None or z.ndim != 4:
            raise ProtocolError(f"fedbone: client {cid} sent no 4-d activations 'z'")
        return z

    def _round_facts(
        self,
        totals: dict[str, int],
        att: list[float],
        losses: dict[int, list[tuple[float, int]]],
        flops: dict[int, tuple[float, float]],
    ) -> dict[str, Any]:
        """Conflict rate over the round's aggregations, attention range, client vs. server FLOPs."""
        client_flops = server_flops = 0.0
        for c, ls in losses.items():
            seen = sum(n for _, n in ls)
            client_flops += seen * flops[c][0]
            server_flops += seen * flops[c][1]
        info: dict[str, Any] = {
            "conflict_rate": totals["conflicts"] / totals["pairs"] if totals["pairs"] else float("nan"),
            "projections": totals["projections"],
            "aggregations": totals["aggregations"],
            "client_flops": client_flops,
            "server_flops": server_flops,
            "client_flops_per_client": client_flops / max(len(losses), 1),
        }
        if att:
            info["attention_min"] = float(min(att))
            info["attention_max"] = float(max(att))
        return info

    def round_info(self, server: dict[str, Any]) -> dict[str, Any]:
        return dict(server.get("info") or {})

    # --- client -------------------------------------------------------------------------------
    def init_client(self, cid: int) -> dict[str, Any]:
        init = self.ctx.init_for(self.ctx.task_of(cid))
        return {"params": {k: v.copy() for k, v in init.items() if part_of(k) in CLIENT_PARTS}}

    def _front(self, task: str, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model(task).embed, _strip(params, "embed"), (x,))

    def _back(self, task: str, params: Mapping[str, torch.Tensor], f: torch.Tensor) -> torch.Tensor:
        m = self.model(task)
        a = functional_call(m.adapter, _strip(params, "adapter"), (f,))
        return functional_call(m.head, _strip(params, "head"), (a,))

    def client_embed(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> tuple[dict[str, Any], Message]:
        """Round start: fresh local optimizer state, activations of the first batch."""
        state = state or self.init_client(data.cid)
        batches = self._schedule(data, work, 0)
        idx, steps = batches[0], len(batches)
        params = _tensors(state["params"])
        spec = self._opt(work.lr)
        front = {k: v for k, v in params.items() if part_of(k) == "embed"}
        back = {k: v for k, v in params.items() if part_of(k) != "embed"}
        state = {
            "params": state["params"],
            "opt_front": _numpy(fopt.init_state(spec, front)),
            "opt_back": _numpy(fopt.init_state(spec, back)),
        }
        with torch.no_grad():
            z = self._front(data.task.name, params, torch.as_tensor(data.x_train[idx]))
        return state, Message(
            arrays={"z": z.numpy()},
            scalars={
                "steps": steps,
                "num_examples": data.n_train,
                "flops_per_sample": self.client_flops(data.task.name, tuple(data.x_train.shape[1:])),
            },
        )

    def client_head(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> tuple[dict[str, Any], Message]:
        """Adapter + head on the server's features; step them; return dL/df."""
        step = int(msg.scalars["step"])
        idx = self._schedule(data, work, step)[step]
        f = torch.as_tensor(msg.arrays["f"]).requires_grad_(True)
        if f.shape[0] != len(idx):
            raise ProtocolError(f"fedbone: features for {f.shape[0]} samples, the batch has {len(idx)}")
        params = _tensors(state["params"])
        back = {k: v.requires_grad_(True) for k, v in params.items() if part_of(k) != "embed"}
        out = self._back(data.task.name, back, f)
        loss = task_loss(out, torch.as_tensor(data.y_train[idx]), data.task)
        g = torch.autograd.grad(loss, [f, *back.values()])
        opt_state = _torch(state["opt_back"])
        new = fopt.step(self._opt(work.lr), back, dict(zip(back, g[1:], strict=True)), opt_state)
        arrays = {**state["params"], **{k: v.detach().numpy().copy() for k, v in new.items()}}
        state = {**state, "params": arrays, "opt_back": _numpy(opt_state)}
        return state, Message(
            arrays={"df": g[0].numpy()}, scalars={"loss": float(loss.detach()), "n": len(idx)}
        )

    def client_backward(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> tuple[dict[str, Any], Message]:
        """Finish the backward pass into the embedding, step it, send the next batch's activations."""
        step = int(msg.scalars["step"])
        batches = self._schedule(data, work, step)
        idx, steps = batches[step], len(batches)
        params = _tensors(state["params"])
        front = {k: v.requires_grad_(True) for k, v in params.items() if part_of(k) == "embed"}
        z = self._front(data.task.name, front, torch.as_tensor(data.x_train[idx]))
        dz = torch.as_tensor(msg.arrays["dz"])
        if dz.shape != z.shape:
            raise ProtocolError(f"fedbone: dz of shape {tuple(dz.shape)}, activations are {tuple(z.shape)}")
        g = torch.autograd.grad(z, list(front.values()), grad_outputs=dz)
        opt_state = _torch(state["opt_front"])
        new = fopt.step(self._opt(work.lr), front, dict(zip(front, g, strict=True)), opt_state)
        arrays = {**state["params"], **{k: v.detach().numpy().copy() for k, v in new.items()}}
        state = {**state, "params": arrays, "opt_front": _numpy(opt_state)}
        if step + 1 >= steps:
            return {"params": arrays}, Message(scalars={"done": 1})
        nxt = batches[step + 1]
        with torch.no_grad():
            z2 = self._front(data.task.name, _tensors(arrays), torch.as_tensor(data.x_train[nxt]))
        return state, Message(arrays={"z": z2.numpy()})

    def client_upload(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> tuple[dict[str, Any], Message]:
        """``client_sharing: task``: this client's parts (embedding, adapter, head) for its group mean."""
        return state, Message(arrays=dict(state["params"]), scalars={"num_examples": data.n_train})

    def client_download(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> tuple[dict[str, Any], Message]:
        if set(msg.arrays) != set(state["params"]):
            raise ProtocolError("fedbone: shared client parts do not match this client's parameters")
        return {**state, "params": {k: v.copy() for k, v in msg.arrays.items()}}, Message()

    # --- evaluation -------------------------------------------------------------------------------
    def eval_arrays(
        self, server: dict[str, Any], state: dict[str, Any], cid: int, data: ClientData | None = None
    ) -> Arrays:
        mine = (state or {}).get("params") or self.init_client(cid)["params"]
        return {**mine, **server["params"]}

    def new_client_arrays(self, server: dict[str, Any], cid: int) -> Arrays:
        return {**self.init_client(cid)["params"], **server["params"]}
