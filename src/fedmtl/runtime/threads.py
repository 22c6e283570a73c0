"""One compute thread pool per round: torch's.

numpy and scipy ship their own OpenBLAS, whose worker threads busy-wait for about 0.1 s after
every product before they sleep. A round that trains with torch on every core and does any numpy
product on the server side (a Krum distance matrix, a cosine matrix, a mean) then trains the next
round with one of its cores taken by a spinning OpenBLAS thread: on the 2-core development machine
that made back-to-back batched rounds 20-25% slower than rounds after a pause. While a round runs
and torch uses more than one thread, OpenBLAS is held to one thread (it then never spins), and
its limit is restored after the round."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import torch


@lru_cache(maxsize=1)
def _openblas(modules: int) -> Any | None:
    """threadpoolctl's handle on the loaded OpenBLAS builds that run their own pthreads workers,
    or None without threadpoolctl or such a library. The scan takes milliseconds, so it is
    repeated only when ``modules`` (the number of imported modules) changes, which is when a new
    library can have been loaded. OpenMP builds are left alone: their thread count is the OpenMP
    runtime's, which torch may share (torch's own products would then run on one thread)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # a declared dependency; an environment without it just keeps spinning
        return None
    pools = ThreadpoolController().select(internal_api="openblas", threading_layer="pthreads")
    return pools if pools.lib_controllers else None


@contextmanager
def torch_owns_the_cores() -> Iterator[None]:
    """OpenBLAS on one thread inside the block when torch computes on several (else a no-op)."""
    pools = _openblas(len(sys.modules)) if torch.get_num_threads() > 1 else None
    if pools is None:
        yield
        return
    limiter = pools.limit(limits=1)
    try:
        yield
    finally:
        limiter.restore_original_limits()
