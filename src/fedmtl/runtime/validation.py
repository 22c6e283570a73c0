"""Server-side checks on client replies, shared by every runtime.

A client whose local training diverged sends NaN or inf; averaged in, one such update poisons the
shared model of every client. Such replies are rejected (the round goes on without them) and named
in the round row, the way a malformed message from a real node would be."""

from __future__ import annotations

import numpy as np

from fedmtl.algorithms.base import Message


def reply_problem(reply: Message) -> str | None:
    """Why ``reply`` cannot be aggregated, or None when it can."""
    for key, arr in reply.arrays.items():
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            return f"non-finite values in {key!r}"
    return None
