"""Clients made on access: a federation's cost follows the clients a round touches.

``ClientList`` is a read-only sequence of ``ClientData`` over shared row arrays: every client's
train rows are ``rows[offsets[c]:offsets[c + 1]]`` of one array (a memory-mapped client store: the
pages a round reads are the only ones loaded), or an index into a pool of samples (a resampled
population of 100,000 clients that holds one pool and the index, not 100,000 copies). A client's
``ClientData`` is built when asked for and kept in a small cache, so within a round the same client
is the same object (batched training recognises its rows by identity)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np

from fedmtl.data.federated import ClientData, TaskSpec

#: ClientData objects kept: a round's sampled clients and an evaluation's, typically; clients
#: whose rows are gathered from a pool (copies) also count against CACHED_BYTES
CACHED_CLIENTS = 4096
CACHED_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Rows:
    """One split of every client: ``x[index[o[c]:o[c+1]]]`` (or ``x[o[c]:o[c+1]]`` without index)."""

    x: np.ndarray
    y: np.ndarray
    offsets: np.ndarray
    index: np.ndarray | None = None

    def of(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[cid]), int(self.offsets[cid + 1])
        if self.index is None:
            return self.x[a:b], self.y[a:b]
        idx = self.index[a:b]
        return self.x[idx], self.y[idx]

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)


class ClientList(Sequence[ClientData]):
    def __init__(
        self,
        train: Rows,
        test: Rows,
        tasks: list[TaskSpec],
        task_ids: np.ndarray | None = None,
        names: list[str] | None = None,
        name_pattern: str = "client_{:06d}",
    ) -> None:
        self.train = train
        self.test = test
        self.tasks = tasks
        self.task_ids = task_ids
        self.names = names
        self.name_pattern = name_pattern
        self._made: OrderedDict[int, ClientData] = OrderedDict()
        self._made_bytes = 0
        #: rows gathered through an index are copies: their memory counts
        self._copies = train.index is not None or test.index is not None
        self.n_train = train.sizes
        self.n_test = test.sizes

    def __len__(self) -> int:
        return len(self.train.offsets) - 1

    def task_of(self, cid: int) -> TaskSpec:
        return self.tasks[0 if self.task_ids is None else int(self.task_ids[cid])]

    def name_of(self, cid: int) -> str:
        return self.names[cid] if self.names is not None else self.name_pattern.format(cid)

    def _make(self, cid: int) -> ClientData:
        hit = self._made.get(cid)
        if hit is not None:
            self._made.move_to_end(cid)
            return hit
        x_tr, y_tr = self.train.of(cid)
        x_te, y_te = self.test.of(cid)
        c = ClientData(cid, x_tr, y_tr, x_te, y_te, self.task_of(cid), self.name_of(cid))
        self._made[cid] = c
        self._made_bytes += self._bytes(c)
        while len(self._made) > 1 and (len(self._made) > CACHED_CLIENTS or self._made_bytes > CACHED_BYTES):
            _, old = self._made.popitem(last=False)
            self._made_bytes -= self._bytes(old)
        return c

    def _bytes(self, c: ClientData) -> int:
        if not self._copies:
            return 0
        return c.x_train.nbytes + c.y_train.nbytes + c.x_test.nbytes + c.y_test.nbytes

    @overload
    def __getitem__(self, i: int) -> ClientData: ...

    @overload
    def __getitem__(self, i: slice) -> list[ClientData]: ...

    def __getitem__(self, i: int | slice) -> ClientData | list[ClientData]:
        if isinstance(i, slice):
            return [self._make(c) for c in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"client {i} out of range (0..{n - 1})")
        return self._make(int(i) % n)

    def __iter__(self) -> Iterator[ClientData]:
        for cid in range(len(self)):
            yield self._make(cid)

    def task_names(self) -> list[str]:
        if self.task_ids is None:
            return [self.tasks[0].name] * len(self)
        return [self.tasks[int(t)].name for t in self.task_ids]
