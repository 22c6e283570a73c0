"""Hierarchical aggregation: heads averaged within a group, the body across all groups.

Groups are the known task ids (``grouping: task``) or are discovered (``grouping: cluster``) by
clustered FL (Sattler et al.): a group whose clients sit near a stationary point of the group
objective (norm of the mean update < eps1) while some still move a lot (largest update norm > eps2)
is split in two by complete-linkage clustering of the cosine similarity of their updates. The
discovered grouping is logged every round. Groups smaller than ``min_group_size`` in a round do not
release a head aggregate that round (the privacy rule of the personalisation spec)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from fedmtl.aggregation import server_opt_init, server_opt_step
from fedmtl.algorithms.base import Message
from fedmtl.algorithms.fedavg import FedAvg, FedAvgParams
from fedmtl.algorithms.heads import SEP, body_of, for_task, head_of, is_head, task_part
from fedmtl.algorithms.reduce import Aggregate, Reduce
from fedmtl.data.federated import TaskSpec
from fedmtl.training.tensors import Arrays


class HierarchicalParams(FedAvgParams):
    grouping: Literal["task", "cluster"] = "task"
    body_weighting: Literal["samples", "groups"] = "samples"
    min_group_size: int = Field(1, ge=1)
    #: cluster: when a group splits. relative (scale-free, the default): its members' updates largely
    #: cancel (||mean update|| < split_ratio x their mean norm) while they still pull as hard as when
    #: the group was first seen (largest norm > split_pull x that round's mean norm), so the rule does
    #: not depend on learning rate or local steps; absolute: CFL's eps1 / eps2 on raw norms.
    split_rule: Literal["relative", "absolute"] = "relative"
    split_ratio: float = Field(0.8, gt=0, le=1)
    split_pull: float = Field(1.0, gt=0)
    eps1: float = Field(
        0.4, ge=0, description="absolute rule: split when the group's mean update norm is below"
    )
    eps2: float = Field(
        1.6, ge=0, description="absolute rule: ...and its largest client update norm is above"
    )
    warmup_rounds: int = Field(10, ge=0)
    max_groups: int = Field(8, ge=1)
    cluster_on: Literal["head", "all"] = "head"


def _shape_key(task: TaskSpec) -> str:
    """What the server may know without task ids: the head's loss and size."""
    return f"{task.kind[:3]}{task.num_outputs}"


class Hierarchical(FedAvg):
    name = "hierarchical"
    Params = HierarchicalParams
    mean_of_updates = False  # group heads, discovered groups: it needs each update

    # --- server --------------------------------------------------------------------------------
    def _initial_group(self, cid: int) -> str:
        task = self.ctx.task_of(cid)
        if self.p.grouping == "task":
            return task
        return _shape_key(self.ctx.task_specs.get(task, self.ctx.task))

    def init_server(self) -> dict[str, Any]:
        cids = sorted(self.ctx.client_tasks) or list(range(self.ctx.num_clients))
        group_of = {c: self._initial_group(c) for c in cids}
        params = {k: v.copy() for k, v in body_of(self.ctx.init_arrays).items()}
        for c, g in group_of.items():
            for k, v in head_of(self.ctx.init_for(self.ctx.task_of(c))).items():
                params.setdefault(f"{g}{SEP}{k}", v.copy())
        return {
            "params": params,
            "opt": server_opt_init(self.p.server_optimizer, params),
            "group_of": group_of,
            "updates": {},
            "next_id": 1,
            "withheld": 0,
        }

    def broadcast(self, server: dict[str, Any], cid: int) -> Message:
        # Group heads are keyed like task heads, so the task-head view serves groups too.
        return Message(arrays=for_task(server["params"], server["group_of"][cid], multi=True))

    def eval_view(self, server: dict[str, Any], cid: int) -> dict[str, Any]:
        """The body and this client's group head; not the other groups, nor anyone's updates."""
        group = server["group_of"][cid]
        return {"params": task_part(server["params"], group, multi=True), "group_of": {cid: group}}

    def global_params(self, server: dict[str, Any]) -> Arrays | None:
        return None

    def reduction(self, server: dict[str, Any], replies: dict[int, Message], round: int) -> Reduce:
        """Body over every client, heads within their group; ``body_weighting: groups`` weights each
        client by its share of its group's samples, so the body is the mean of the group means (and
        each head is still its group's sample-weighted mean). Clustering keeps each update."""
        group_of = server["group_of"]
        weights = None
        if self.p.body_weighting == "groups":
            n = {c: float(r.scalars.get("num_examples", 1.0)) for c, r in replies.items()}
            totals: dict[str, float] = {}
            for c, k in n.items():
                totals[group_of[c]] = totals.get(group_of[c], 0.0) + k
            weights = {c: k / totals[group_of[c]] for c, k in n.items()}
        return Reduce(
            replies,
            server["params"],
            groups={c: group_of[c] for c in replies},
            weights=weights,
            keep_updates=self.keeps_updates(),
        )

    def keeps_updates(self) -> bool:
        """Discovered groups split on the cosine similarity of each member's update."""
        return self.p.grouping == "cluster"

    def server_update(self, server: dict[str, Any], aggregate: Aggregate, round: int) -> dict[str, Any]:
        """The server step on the aggregate, less the heads of groups below ``min_group_size`` this
        round (withheld); then, for discovered groups, each updated group may split."""
        if not aggregate.accepted:
            return server
        group_of = server["group_of"]
        by_group: dict[str, list[int]] = {}
        for c in aggregate.accepted:
            by_group.setdefault(group_of[c], []).append(c)
        small = {f"{g}{SEP}" for g, m in by_group.items() if len(m) < self.p.min_group_size}
        mean = {k: v for k, v in aggregate.params.items() if not any(k.startswith(p) for p in small)}
        updates = dict(server["updates"])
        ref = dict(server.get("ref_norm", {}))
        fresh: list[str] = []  # groups whose reference scale is taken this round
        if self.p.grouping == "cluster" and aggregate.updates is not None:
            for c in aggregate.accepted:
                got = aggregate.updates[c]
                # client names order the keys, as every member of a group names them alike
                keys = sorted(
                    (k for k in got if self.p.cluster_on == "all" or is_head(_client_name(k))),
                    key=_client_name,
                )
                updates[c] = np.concatenate([got[k].ravel() for k in keys]).astype(np.float32)
            for g, members in by_group.items():  # each group's update scale when first seen
                if g not in ref:
                    ref[g] = float(np.mean([np.linalg.norm(updates[c].astype(np.float64)) for c in members]))
                    fresh.append(g)
        params, opt = server_opt_step(self.p.server_optimizer, server["params"], mean, server["opt"])
        new = {
            **server,
            "params": params,
            "opt": opt,
            "updates": updates,
            "withheld": server["withheld"] + len(small),
            "ref_norm": ref,
        }
        if self.p.grouping == "cluster" and round >= self.p.warmup_rounds:
            new = self._maybe_split(new, set(fresh))
        return new

    def _should_split(self, mean_norm: float, norms: np.ndarray, ref: float | None) -> bool:
        p = self.p
        if p.split_rule == "absolute":
            return mean_norm < p.eps1 and float(norms.max()) > p.eps2
        scale = float(norms.mean())
        return (
            ref is not None
            and scale > 0
            and mean_norm < p.split_ratio * scale
            and float(norms.max()) > p.split_pull * ref
        )

    def _maybe_split(
        self, server: dict[str, Any], fresh: frozenset[str] | set[str] = frozenset()
    ) -> dict[str, Any]:
        """Bisect each group that meets the split rule. Under the relative rule a group is measured
        against its own first round: both halves of a split start afresh (their reference scale is
        taken the next round they report, and neither splits in that round), so a pure group that has
        reached its own stationary point, where label skew alone makes updates cancel, is not split
        again on the strength of the mixed parent's early, larger updates."""
        ref = dict(server.get("ref_norm", {}))
        group_of = dict(server["group_of"])
        updates = dict(server["updates"])
        params = dict(server["params"])
        next_id = server["next_id"]
        for g in sorted(set(group_of.values())):
            if len(set(group_of.values())) >= self.p.max_groups:
                break
            members = [c for c, gg in group_of.items() if gg == g and c in updates]
            if len(members) < 2 * self.p.min_group_size or len(members) < 2:
                continue
            if self.p.split_rule == "relative" and g in fresh:
                continue
            vecs = np.stack([updates[c] for c in members]).astype(np.float64)
            norms = np.linalg.norm(vecs, axis=1)
            if not self._should_split(float(np.linalg.norm(vecs.mean(0))), norms, ref.get(g)):
                continue
            unit = vecs / np.maximum(norms[:, None], 1e-12)
            dist = np.clip(1.0 - unit @ unit.T, 0.0, 2.0)
            np.fill_diagonal(dist, 0.0)
            labels = fcluster(
                linkage(squareform(dist, checks=False), method="complete"), t=2, criterion="maxclust"
            )
            second = [c for c, lab in zip(members, labels, strict=True) if lab == 2]
            if (
                not second
                or len(second) == len(members)
                or min(len(second), len(members) - len(second)) < self.p.min_group_size
            ):
                continue
            new_g = f"{g.split('.')[0]}.{next_id}"
            next_id += 1
            prefix = f"{g}{SEP}"
            params.update(
                {
                    f"{new_g}{SEP}{k[len(prefix) :]}": v.copy()
                    for k, v in params.items()
                    if k.startswith(prefix)
                }
            )
            for c in second:
                group_of[c] = new_g
            ref.pop(g, None)  # both halves are new groups: measured afresh
            for c in members:
                updates.pop(c, None)
        opt = server["opt"]
        if set(params) != set(server["params"]):
            opt = _extend_opt_state(opt, params)
        return {
            **server,
            "params": params,
            "group_of": group_of,
            "updates": updates,
            "next_id": next_id,
            "opt": opt,
            "ref_norm": ref,
        }

    def round_info(self, server: dict[str, Any]) -> dict[str, Any]:
        group_of = server["group_of"]
        sizes: dict[str, int] = {}
        for g in group_of.values():
            sizes[g] = sizes.get(g, 0) + 1
        return {
            "groups": sizes,
            "group_of": [group_of[c] for c in sorted(group_of)],
            "withheld_groups": server["withheld"],
        }


def _client_name(key: str) -> str:
    """``<group>:head.x`` -> ``head.x``; body keys as they are."""
    return key.partition(SEP)[2] if SEP in key else key


def _extend_opt_state(opt: dict[str, Any], params: Arrays) -> dict[str, Any]:
    """New group heads start with zero server-optimizer state."""
    out = dict(opt)
    for key in ("buf", "m", "v"):
        if key in out:
            out[key] = {k: out[key].get(k, np.zeros_like(v)) for k, v in params.items()}
    return out
