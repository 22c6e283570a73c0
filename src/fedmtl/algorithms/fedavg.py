"""FedAvg (McMahan et al. 2017) and FedProx (Li et al. 2020), with an optional server optimizer."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from pydantic import Field

from fedmtl.aggregation import ServerOptParams, server_opt_init, server_opt_step, weighted_mean
from fedmtl.algorithms.base import AlgoContext, AlgoParams, Algorithm, ClientWork, Message
from fedmtl.algorithms.heads import for_task, initial_global, keywise_mean, qualify
from fedmtl.data.federated import ClientData
from fedmtl.training.objectives import Prox
from fedmtl.training.tensors import Arrays
from fedmtl.training.work import Train, Trained


class FedAvgParams(AlgoParams):
    server_optimizer: ServerOptParams = ServerOptParams()


class FedAvg(Algorithm):
    """Clients train the whole model from the global one; the server takes the sample-weighted mean."""

    name = "fedavg"
    Params = FedAvgParams
    sends_update = True
    mean_of_updates = True

    def prox_mu(self) -> float:
        return 0.0

    def init_server(self) -> dict[str, Any]:
        params = initial_global(self.ctx.task_init, self.ctx.init_arrays)
        return {"params": params, "opt": server_opt_init(self.p.server_optimizer, params)}

    def broadcast(self, server: dict[str, Any], cid: int) -> Message:
        return Message(arrays=for_task(server["params"], self.ctx.task_of(cid), self.ctx.multi_task))

    def broadcast_many(self, server: dict[str, Any], cids: list[int]) -> list[Message]:
        """One message per task, shared by its clients (a subclass with its own ``broadcast`` gets
        one call per client)."""
        if type(self).broadcast is not FedAvg.broadcast:
            return super().broadcast_many(server, cids)
        task_of, by_task = self.ctx.task_of, {}
        out = []
        for c in cids:
            task = task_of(c)
            msg = by_task.get(task)
            if msg is None:
                msg = by_task[task] = self.broadcast(server, c)
            out.append(msg)
        return out

    def global_params(self, server: dict[str, Any]) -> Arrays | None:
        return None if self.ctx.multi_task else server["params"]

    def client_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> Generator[Train, Trained, tuple[dict[str, Any], Message]]:
        """Train the received model; FedProx adds the proximal term toward it."""
        mu = self.prox_mu()
        trained = yield self.ctx.train(data, work, msg.arrays, prox=Prox(msg.arrays, mu) if mu > 0 else None)
        return state, Message(arrays=trained.params, scalars=trained.scalars(data))

    def expected_reply(self, server: dict[str, Any], cid: int) -> Arrays:
        """What a valid reply from ``cid`` looks like (same keys and shapes); replies that differ
        are rejected with a logged reason before aggregation (``fedmtl.runtime.validation``)."""
        return self.broadcast(server, cid).arrays

    def server_step(self, server: dict[str, Any], replies: dict[int, Message], round: int) -> dict[str, Any]:
        replies, server = accept_replies(self, server, replies)
        if not replies and not (self.ctx.aggregator is not None and self.ctx.aggregator.releases_when_empty):
            return server
        mean, server = aggregate_into(self.ctx, replies, server, round)
        params, opt = server_opt_step(self.p.server_optimizer, server["params"], mean, server["opt"])
        return {**server, "params": params, "opt": opt}

    def round_info(self, server: dict[str, Any]) -> dict[str, Any]:
        return aggregation_info(server)


def accept_replies(
    algo: Any, server: dict[str, Any], replies: dict[int, Message]
) -> tuple[dict[int, Message], dict[str, Any]]:
    """Replies that match what the server sent (keys, shapes, finite values), and the server state
    with this round's rejections (``{cid: reason}``, shown in the round row) recorded."""
    from fedmtl.runtime.validation import split_valid

    expected_for = lambda c: algo.expected_reply(server, c)  # noqa: E731
    if type(algo).expected_reply is FedAvg.expected_reply:
        # FedAvg's expected reply is what it broadcast: ``broadcast_many`` builds that once per task
        # (a round of thousands of small clients spends a measurable share on the rebuilding).
        cids = list(replies)
        sent = dict(zip(cids, algo.broadcast_many(server, cids), strict=True))
        expected_for = lambda c: sent[c].arrays  # noqa: E731
    ok, rejected = split_valid(replies, expected_for)
    server = {k: v for k, v in server.items() if k not in ("rejected", "agg_info")}
    if rejected:
        server["rejected"] = rejected
    return ok, server


def aggregation_info(server: dict[str, Any]) -> dict[str, Any]:
    """Round-row facts of the aggregation: rejected replies with their reasons, chain diagnostics."""
    out: dict[str, Any] = {}
    if server.get("rejected"):
        out["rejected_reasons"] = {str(c): r for c, r in sorted(server["rejected"].items())}
    if server.get("agg_info"):
        out["aggregation"] = server["agg_info"]
    return out


def aggregate_into(
    ctx: AlgoContext, replies: dict[int, Message], server: dict[str, Any], round: int
) -> tuple[Arrays, dict[str, Any]]:
    """``aggregate_replies`` that also keeps the chain's state and diagnostics in the server state."""
    if ctx.aggregator is None:
        return aggregate_replies(ctx, replies), server
    res = run_chain(ctx, replies, server, round)
    server = {**server, "agg": res.state}
    if res.info:
        server["agg_info"] = res.info
    return res.params, server


def run_chain(ctx: AlgoContext, replies: dict[int, Message], server: dict[str, Any], round: int) -> Any:
    """The ``aggregation:`` chain over the replies (multi-task heads under their task's key names)."""
    cids = sorted(replies)
    return ctx.aggregator.run(
        server["params"],
        {c: qualify(replies[c].arrays, ctx.task_of(c), ctx.multi_task) for c in cids},
        {c: float(replies[c].scalars["num_examples"]) for c in cids},
        seed=ctx.seed,
        round=round,
        state=server.get("agg"),
        scalars={c: replies[c].scalars for c in cids},
    )


def aggregate_replies(
    ctx: AlgoContext, replies: dict[int, Message], server: dict[str, Any] | None = None, round: int = 0
) -> Arrays:
    """New values of the aggregated keys. With no ``aggregation:`` chain: the sample-weighted mean
    (in multi-task federations each head only over its task's clients); otherwise the chain, run
    against ``server["params"]`` (its state is not kept: use ``aggregate_into`` for that)."""
    cids = sorted(replies)
    if ctx.aggregator is not None:
        if server is None:
            raise ValueError("aggregate_replies: an aggregation chain needs the server state")
        return run_chain(ctx, replies, server, round).params
    weights = [float(replies[c].scalars["num_examples"]) for c in cids]
    if not ctx.multi_task:
        return weighted_mean([replies[c].arrays for c in cids], weights)
    return keywise_mean([qualify(replies[c].arrays, ctx.task_of(c), True) for c in cids], weights)


class FedProxParams(FedAvgParams):
    mu: float = Field(0.01, ge=0)


class FedProx(FedAvg):
    """FedAvg plus the proximal term (mu/2)||w - w_global||^2 in every client's objective."""

    name = "fedprox"
    Params = FedProxParams

    def prox_mu(self) -> float:
        return float(self.p.mu)
