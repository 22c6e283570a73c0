"""Server-side checks on client replies, shared by every runtime and by the aggregation.

A client whose local training diverged sends NaN or inf; a buggy or malicious node may send arrays
of the wrong shape or under the wrong names. Averaged in, one such update poisons the shared model
of every client (or crashes the server). Such replies are rejected (the round goes on without
them) and the reason is logged in the round row, the way a malformed message from a real node
would be. The runtimes check what needs no context (finite values); the FedAvg-family server step
also checks each reply against what it sent that client (same keys, same shapes)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedmtl.algorithms.base import Message


def reply_problem(reply: Message, expected: Mapping[str, np.ndarray] | None = None) -> str | None:
    """Why ``reply`` cannot be aggregated, or None when it can.

    ``expected``: the arrays the reply must match key for key and shape for shape (for FedAvg-family
    algorithms, what the server broadcast to that client)."""
    if expected is not None:
        missing = [k for k in expected if k not in reply.arrays]
        if missing:
            return f"missing key {missing[0]!r}" + (
                f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
            )
        extra = [k for k in reply.arrays if k not in expected]
        if extra:
            return f"unexpected key {extra[0]!r}" + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else "")
    for key, arr in reply.arrays.items():
        arr = np.asarray(arr)
        kind = arr.dtype.kind  # 'f' float, 'i'/'u' integer; cheaper than issubdtype per array
        if expected is not None:
            want = np.shape(expected[key])
            if arr.shape != want:
                return f"key {key!r} has shape {arr.shape}, expected {want}"
            if kind not in "fiu":
                return f"key {key!r} has non-numeric dtype {arr.dtype}"
        # NaN and inf always reach the sum, so a finite sum clears the array without a mask
        if kind == "f" and not np.isfinite(arr.sum()) and not np.isfinite(arr).all():
            return f"non-finite values in {key!r}"
    return None


def split_valid(
    replies: Mapping[int, Message], expected_for: Callable[[int], Mapping[str, np.ndarray]]
) -> tuple[dict[int, Message], dict[int, str]]:
    """(replies that pass ``reply_problem`` against ``expected_for(cid)``, {cid: reason} of the rest)."""
    ok: dict[int, Message] = {}
    rejected: dict[int, str] = {}
    for cid in sorted(replies):
        problem = reply_problem(replies[cid], expected_for(cid))
        if problem is None:
            ok[cid] = replies[cid]
        else:
            rejected[cid] = problem
    return ok, rejected


def merge_rejections(row: dict[str, Any]) -> dict[str, Any]:
    """One list of every client whose reply was dropped this round, whichever side rejected it: the
    runtime (non-finite values) or the server step (keys and shapes, in ``rejected_reasons``)."""
    reasons = row.get("rejected_reasons") or {}
    if reasons:
        row["rejected_clients"] = sorted({*row.get("rejected_clients", []), *(int(c) for c in reasons)})
    return row
