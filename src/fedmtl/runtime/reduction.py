"""How the round carries out an algorithm's ``Reduce`` request: one place for every algorithm.

A ``Reducer`` turns the request into an ``Aggregate``. It may run exchanges of its own (secure
aggregation's stages), which the round delivers, counts and checks like any other, so it is a
generator of ``Exchange``s that returns ``(aggregate, new chain state)``. The chain state (an
adaptive clip bound, a previous aggregate) is the round's, kept in the server state under
``CHAIN_STATE`` and checkpointed with it; no algorithm reads or writes it.

``ChainReducer`` is the plain one: each reply's arrays under server names (heads under their
group's prefix) minus the reference are the updates; with no chain configured their weighted mean
(each key over the clients that carry it), otherwise the chain: the features' steps (client DP's
clip, mean and noise) or the user's ``aggregation:`` list (robust reducers). Secure aggregation's
reducers are in ``fedmtl.features.secagg``."""

from __future__ import annotations

from collections.abc import Generator, Mapping
from typing import Any, Protocol

import numpy as np

from fedmtl.aggregation.mean import weighted_mean
from fedmtl.aggregation.pipeline import Pipeline
from fedmtl.algorithms.heads import keywise_mean, qualify
from fedmtl.algorithms.message import Exchange, Message
from fedmtl.algorithms.reduce import Aggregate, Reduce
from fedmtl.errors import ProtocolError
from fedmtl.training.tensors import Arrays

#: The server-state key under which the round keeps its chain's state.
CHAIN_STATE = "chain"

Reduction = Generator[Exchange, dict[int, Message], tuple[Aggregate, dict[str, Any] | None]]


class Reducer(Protocol):
    #: What the round guarantees through this reducer beyond a plain weighted mean ("client DP",
    #: "aggregation: [median]", "secure aggregation"), or None: a round whose algorithm uses its
    #: train replies without reducing them is then refused.
    guarantees: str | None

    def reduce(self, request: Reduce, state: dict[str, Any] | None, round: int) -> Reduction: ...


def weights_of(request: Reduce, cids: list[int]) -> list[float]:
    """Each client's weight: the request's, else the ``num_examples`` its reply reports."""
    if request.weights is not None:
        return [float(request.weights[c]) for c in cids]
    out = []
    for c in cids:
        n = request.replies[c].scalars.get("num_examples")
        if n is None:
            raise ProtocolError(f"aggregation: client {c} reported no num_examples to weight its reply by")
        out.append(float(n))
    return out


def split_reply(request: Reduce, cid: int) -> tuple[Arrays, Message]:
    """(the reply's arrays to reduce, under server names; the rest of the reply: scalars and the
    side arrays the request lets through)."""
    reply = request.replies[cid]
    group = None if request.groups is None else request.groups[cid]
    reference = request.reference
    if group is None and all(k in reference for k in reply.arrays):
        # the reply's own dict: a row of a batched round's stacks stays linked to its stack, so the
        # mean takes one product per stack instead of one per client (``fedmtl.aggregation.mean``)
        return reply.arrays, Message(scalars=reply.scalars)
    named = qualify(reply.arrays, group, True) if group is not None else reply.arrays
    reduced: Arrays = {}
    side: Arrays = {}
    for (key, value), (server_key, _) in zip(reply.arrays.items(), named.items(), strict=True):
        if server_key in reference:
            reduced[server_key] = value
        elif key in request.side:
            side[key] = value
        else:
            raise ProtocolError(
                f"aggregation: client {cid} replied with {key!r}, which is neither among the server "
                f"arrays the algorithm reduces nor a side array it declared (Reduce.side)"
            )
    return reduced, Message(arrays=side, scalars=reply.scalars)


class ChainReducer:
    """The weighted mean, or the configured chain, over the replies' updates (see module doc)."""

    def __init__(self, chain: Pipeline | None, seed: int, guarantees: str | None = None) -> None:
        self.chain = chain
        self.seed = seed
        self.guarantees = guarantees

    def reduce(self, request: Reduce, state: dict[str, Any] | None, round: int) -> Reduction:
        cids = sorted(request.replies)
        reported = {c: request.replies[c].scalars for c in cids}
        if request.kind == "each":
            out = Aggregate(accepted=cids, replies=dict(request.replies), reported=reported)
            return out, state
        parts = {c: split_reply(request, c) for c in cids}
        weights = weights_of(request, cids)
        chain = self.chain
        out = Aggregate(
            accepted=cids,
            weight=float(sum(weights)),
            replies={c: parts[c][1] for c in cids},
            reported=reported,
        )
        if request.keep_updates:
            out.updates = {c: _update(parts[c][0], request.reference) for c in cids}
        if not cids and (chain is None or not chain.releases_when_empty):
            return out, state
        if chain is None:
            arrays = [parts[c][0] for c in cids]
            if request.groups is None:
                out.params = weighted_mean(arrays, weights)
            else:
                out.params = keywise_mean(arrays, weights)
        else:
            res = chain.run(
                request.reference,
                {c: parts[c][0] for c in cids},
                dict(zip(cids, weights, strict=True)),
                seed=self.seed,
                round=round,
                state=state,
                scalars={c: parts[c][1].scalars for c in cids},
            )
            out.params, state = res.params, res.state
            if res.info:
                out.info["aggregation"] = res.info
        out.released = True
        return out, state
        yield  # a generator: the plain reduction runs no exchange of its own


def _update(arrays: Mapping[str, np.ndarray], reference: Arrays) -> Arrays:
    return {k: np.asarray(v, dtype=np.float64) - reference[k].astype(np.float64) for k, v in arrays.items()}
