"""What travels between server and clients: messages, and the exchanges a round is made of."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedmtl.training.rows import linked_stack
from fedmtl.training.tensors import Arrays

Scalar = float | int | str | bool

#: The action of a round's main exchange: every addressed client runs ``client_step``.
TRAIN = "train"


@dataclass
class Message:
    """Named arrays plus scalars: maps 1:1 onto Flower's ArrayRecord + MetricRecord/ConfigRecord."""

    arrays: Arrays = field(default_factory=dict)
    scalars: dict[str, Scalar] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        stack = linked_stack(self.arrays)  # a row of a batched stack: every row has the same size
        if stack is not None:
            return stack.row_nbytes
        return int(sum(a.nbytes for a in self.arrays.values()))


#: What a valid reply looks like: key -> the array whose shape it must have (or a shape tuple,
#: ``None`` for any length along that axis; ``OptionalKey(shape)`` for a key a reply may leave
#: out). The round refuses a reply with another key set, shape or a non-numeric or non-finite array.
Expected = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class OptionalKey:
    """An expected key a reply may leave out; when present it has ``shape`` (an array or a tuple)."""

    shape: Any


@dataclass(slots=True)
class Exchange:
    """One step of a round: ``messages[cid]`` goes to each addressed client, which answers by
    running ``action`` (``TRAIN``: its client step; otherwise one of its ``client_actions``).

    ``expect``: what each client's reply must look like (``Expected``); clients it does not name,
    or all when None, are checked for numeric, finite arrays only. A refused reply takes its client
    out of the rest of the round, and its new state is dropped."""

    action: str
    messages: dict[int, Message]
    expect: Mapping[int, Expected | None] | None = None
