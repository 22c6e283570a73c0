"""Server-side checks on client replies, shared by every runtime and by the aggregation.

A client whose local training diverged sends NaN or inf; a buggy or malicious node may send arrays
of the wrong shape or under the wrong names. Averaged in, one such update poisons the shared model
of every client (or crashes the server). Such replies are rejected (the round goes on without
them) and the reason is logged in the round row, the way a malformed message from a real node
would be. The runtimes check what needs no context (finite values); the FedAvg-family server step
also checks each reply against what it sent that client (same keys, same shapes)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from fedmtl.algorithms.base import Message
from fedmtl.training.rows import group_rows


def reply_problem(
    reply: Message, expected: Mapping[str, np.ndarray] | None = None, finite_known: bool = False
) -> str | None:
    """Why ``reply`` cannot be aggregated, or None when it can.

    ``expected``: the arrays the reply must match key for key and shape for shape (for FedAvg-family
    algorithms, what the server broadcast to that client). ``finite_known``: the values were
    already found finite (``reply_problems`` checks whole stacks at once)."""
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
        if finite_known:
            continue
        if kind == "f" and not _finite_sum(arr) and not np.isfinite(arr).all():
            return f"non-finite values in {key!r}"
    return None


def _finite_sum(arr: np.ndarray) -> bool:
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowing sum is checked exactly
        return bool(np.isfinite(arr.sum()))


def reply_problems(
    replies: Sequence[Message], expected: Sequence[Mapping[str, np.ndarray]] | None = None
) -> list[str | None]:
    """``reply_problem`` for each reply. Replies that are rows of a batched round's stacks are
    checked per stack: one finite-value reduction per array for all of them, and their keys and
    shapes (the same for every row of a stack) once per stack and expected structure."""
    out: list[str | None] = [None] * len(replies)
    todo = list(range(len(replies)))
    groups = group_rows([r.arrays for r in replies])
    if groups is not None:
        todo = []
        for stack, positions, rows in groups:
            flagged = stack.maybe_nonfinite(np.asarray(rows))
            finite = positions
            if flagged.any():
                marks = flagged.tolist()
                todo += [pos for pos, bad in zip(positions, marks, strict=True) if bad]
                finite = [pos for pos, bad in zip(positions, marks, strict=True) if not bad]
            if expected is None:
                continue
            # id(expected) -> problem of this stack's structure (``expected`` keeps those ids alive)
            verdicts: dict[int, str | None] = {}
            for pos in finite:
                want = expected[pos]
                if id(want) not in verdicts:
                    verdicts[id(want)] = reply_problem(replies[pos], want, finite_known=True)
                out[pos] = verdicts[id(want)]
        todo.sort()
    for pos in todo:
        out[pos] = reply_problem(replies[pos], None if expected is None else expected[pos])
    return out


def split_valid(
    replies: Mapping[int, Message], expected_for: Callable[[int], Mapping[str, np.ndarray]]
) -> tuple[dict[int, Message], dict[int, str]]:
    """(replies that pass ``reply_problem`` against ``expected_for(cid)``, {cid: reason} of the rest)."""
    ok: dict[int, Message] = {}
    rejected: dict[int, str] = {}
    cids = sorted(replies)
    problems = reply_problems([replies[c] for c in cids], [expected_for(c) for c in cids])
    for cid, problem in zip(cids, problems, strict=True):
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
