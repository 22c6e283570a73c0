"""The server side of the contract, declared: what an algorithm asks the round to reduce, and what
it gets back.

An algorithm's server round does not combine client replies itself. It hands the round a
``Reduce`` request (which replies, the server arrays they are new values of, heads grouped per
task or per group, the weights) and gets back an ``Aggregate``. The round carries the request out
in one place for every algorithm: the reply checks, then one chain (the features' clip, noise and
robust steps and the user's ``aggregation:`` list) or secure aggregation's extra exchanges. So
differential privacy, robust aggregation and secure aggregation hold for an algorithm nobody here
wrote: it never sees the individual model values it could average around them.

Key spaces: a client names its arrays as its model does; a multi-task federation keeps each task's
head on the server under ``<task>:head.*`` (``fedmtl.algorithms.heads``). ``Reduce.groups`` says
under which prefix each client's heads are reduced (by default its task), so heads of different
tasks or groups never meet in an average."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fedmtl.algorithms.message import Message
from fedmtl.training.tensors import Arrays

#: How an algorithm's server combines its train replies (``Algorithm.reduces``):
#: "mean": the replies are new values of server arrays, reduced toward a (weighted, robust, noised)
#: mean by the round's chain: client DP, robust and secure aggregation apply;
#: "each": the server uses every reply as it is (MOCHA's dual steps, one row of W per client);
#: "none": the replies carry no arrays (local training);
#: "own": a multi-step protocol combines what it needs inside its own exchanges (FedBone).
ReduceKind = Literal["mean", "each", "none", "own"]


@dataclass
class Reduce:
    """What the server asks the round to reduce.

    ``replies``: the replies to reduce (already checked against what the algorithm expects).
    ``reference``: the server arrays (server names) the replies' arrays are new values of: a
    client's update is its reply minus this. Every reply key (under its group's prefix for heads)
    that is in ``reference`` is reduced; other arrays the algorithm declared it expects pass
    through as they came (``Aggregate.replies``), never into the chain.
    ``groups``: client -> the prefix its heads (``head.*``) are reduced under (its task, or its
    group); None: one key space (single-task).
    ``weights``: client -> weight in the mean (default: the reply's ``num_examples``).
    ``keep_updates``: also hand back each client's update (clustering needs them; secure
    aggregation, which reveals only the sum, refuses such algorithms).
    ``side``: reply keys (client names) that are not reduced but handed back as they came (sample
    selection's score vectors); any other key outside ``reference`` is a protocol error.
    ``kind``: "mean" (the chain reduces) or "each" (the replies are handed back as they are)."""

    replies: dict[int, Message]
    reference: Arrays = field(default_factory=dict)
    groups: Mapping[int, str] | None = None
    weights: Mapping[int, float] | None = None
    keep_updates: bool = False
    side: frozenset[str] = frozenset()
    kind: Literal["mean", "each"] = "mean"


@dataclass
class Aggregate:
    """What the round gives back for a ``Reduce``.

    ``params``: new values (server names) of every reduced key some accepted client carried:
    reference + the chain's aggregate update (empty when nothing was released).
    ``accepted``: clients whose replies went in; ``weight``: their total weight.
    ``replies``: each accepted reply without its reduced arrays (its scalars and any other arrays
    it declared), or whole for ``kind: each``.
    ``updates``: each accepted client's update (server names), when the request kept them.
    ``reported``: the scalars of every train reply that reached the server, refused ones included
    (what clients say they did: sample-level DP accounts it).
    ``released``: whether the reduction published a result (a DP release: replies went in, or an
    expected-count chain released its noise over an empty round).
    ``info``: the reduction's facts for the round row (chain diagnostics, secure aggregation)."""

    params: Arrays = field(default_factory=dict)
    accepted: list[int] = field(default_factory=list)
    weight: float = 0.0
    replies: dict[int, Message] = field(default_factory=dict)
    updates: dict[int, Arrays] | None = None
    reported: dict[int, Mapping[str, Any]] = field(default_factory=dict)
    released: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.params
