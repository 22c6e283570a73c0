"""Reusable memory for the tensors batched training stacks every round.

A batched round writes each group's parameters into fresh [clients, ...] tensors. Fresh blocks of
megabytes come from the kernel as untouched pages, and faulting them in costs more than the copy
itself (measured: a 16 MiB stack took 9 ms to fill from new memory, under 1 ms from reused memory).
With full participation the same shapes return every round, so the pool hands out memory a
previous round used once nothing refers to it any more.

Whether a buffer is still in use is read off its reference count: every tensor, view or numpy
array made from a buffer keeps the buffer alive (``torch.from_numpy`` storages and numpy views hold
a reference to it), so a buffer that only the pool refers to cannot be seen by anyone else."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import numpy as np
import torch

#: Upper bound on the memory the pool keeps (in use or free), in bytes: enough for every stack of
#: a round of 1000 sampled 784-200-10 MLPs (0.6 GiB) or of 100 sampled FEMNIST CNNs (2.4 GiB of
#: parameters and 0.7 GiB of low-rank rows), so that such rounds reuse the memory of the last one
#: (fresh memory faults its pages in again every round: at the 9 ms per 16 MiB measured on the
#: development VM, 2.4 GiB take 1.4 s).
#: The memory is what the round holds anyway; the pool only keeps it until the next round.
POOL_BYTES = 4 * 2**30
#: Buffers below this size are allocated as usual (small blocks are recycled by malloc anyway).
MIN_BYTES = 32 * 2**10

_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.int64: np.int64}
_ITEMSIZE = {dtype: dtype.itemsize for dtype in _DTYPES}


class BufferPool:
    def __init__(self, max_bytes: int = POOL_BYTES) -> None:
        self.max_bytes = max_bytes
        self._bufs: dict[tuple, list[np.ndarray]] = {}  # (shape, dtype) -> buffers of that shape
        self._next: dict[tuple, int] = {}  # where to start looking: after the last one handed out
        self._bytes = 0

    @staticmethod
    def _free(bufs: list[np.ndarray], i: int) -> bool:
        # One reference from the list, one for getrefcount's argument: nothing else holds it.
        return sys.getrefcount(bufs[i]) <= 2

    def empty(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An uninitialised tensor of ``shape``, on memory that an earlier caller let go of when
        there is such memory of exactly this shape."""
        np_dtype = _DTYPES.get(dtype)
        shape = tuple(int(s) for s in shape)
        if np_dtype is None:
            return torch.empty(shape, dtype=dtype)
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]  # np.prod and a probe tensor: 4 us, 30 in a round
        if nbytes < MIN_BYTES or nbytes > self.max_bytes:
            return torch.empty(shape, dtype=dtype)
        key = (shape, np_dtype)
        bufs = self._bufs.setdefault(key, [])
        # A round takes buffers one after another and lets them all go at its end: looking from
        # just after the last one handed out finds a free one at once instead of after every
        # buffer this round already holds (a 10,000-client round holds 37 per shape).
        start = self._next.get(key, 0)
        n = len(bufs)
        for j in range(n):
            i = (start + j) % n
            if self._free(bufs, i):
                self._next[key] = i + 1
                return torch.from_numpy(bufs[i])
        if self._bytes + nbytes > self.max_bytes:
            self._evict(self._bytes + nbytes - self.max_bytes)
        # Memory from torch's allocator, seen through a numpy array the pool can count references
        # to. (numpy's own allocator asks for transparent huge pages on large blocks, which made
        # first-touch page faults 9x slower on the development VM.)
        buf = torch.empty(shape, dtype=dtype).numpy()
        if self._bytes + nbytes <= self.max_bytes:
            bufs.append(buf)
            self._next[key] = len(bufs)
            self._bytes += nbytes
        return torch.from_numpy(buf)

    def _evict(self, need: int) -> None:
        """Drop free buffers (any shape) until ``need`` bytes are released or none is left."""
        for bufs in self._bufs.values():
            i = 0
            while i < len(bufs) and need > 0:
                if self._free(bufs, i):
                    size = bufs.pop(i).nbytes
                    self._bytes -= size
                    need -= size
                else:
                    i += 1

    def zeros(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.empty(shape, dtype).zero_()

    @property
    def nbytes(self) -> int:
        return self._bytes


#: The process's pool for batched training.
POOL = BufferPool()
