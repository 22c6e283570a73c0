"""The round's checks on client replies: one place, for every exchange of every algorithm.

A client whose local training diverged sends NaN or inf; a buggy or malicious node may send arrays
of the wrong shape or under the wrong names. Averaged in, one such update poisons the shared model
of every client (or crashes the server). Such a reply is refused (the round goes on without that
client, and its new state is dropped) and the reason is logged in the round row, the way a
malformed message from a real node would be. What a valid reply looks like is what the algorithm
declared (``Exchange.expect``; for the train exchange ``Algorithm.expected_reply``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedmtl.algorithms.message import Message, OptionalKey
from fedmtl.training.rows import group_rows


def _shape(spec: object) -> tuple[int | None, ...]:
    return spec if isinstance(spec, tuple) else tuple(np.shape(spec))


def _fits(shape: tuple[int, ...], want: tuple[int | None, ...]) -> bool:
    return len(shape) == len(want) and all(w is None or s == w for s, w in zip(shape, want, strict=True))


def _few(keys: list[str]) -> str:
    return repr(keys[0]) + (f" (+{len(keys) - 1} more)" if len(keys) > 1 else "")


def reply_problem(
    reply: Message, expected: Mapping[str, object] | None = None, finite_known: bool = False
) -> str | None:
    """Why ``reply`` cannot be used, or None when it can.

    ``expected``: key -> shape spec the reply must match key for key (an array or a tuple with
    ``None`` for any length; ``OptionalKey`` for a key it may leave out); None: any keys. Every
    array must be numeric and finite. ``finite_known``: the values were already found finite
    (``reply_problems`` checks whole stacks at once)."""
    arrays = reply.arrays
    if expected is not None:
        missing = [k for k, v in expected.items() if k not in arrays and not isinstance(v, OptionalKey)]
        if missing:
            return f"missing key {_few(missing)}"
        extra = [k for k in arrays if k not in expected]
        if extra:
            return f"unexpected key {_few(extra)}"
    for key, arr in arrays.items():
        arr = np.asarray(arr)
        kind = arr.dtype.kind  # 'f' float, 'i'/'u' integer; cheaper than issubdtype per array
        if kind not in "fiub":
            return f"key {key!r} has non-numeric dtype {arr.dtype}"
        if expected is not None:
            spec = expected[key]
            want = _shape(spec.shape if isinstance(spec, OptionalKey) else spec)
            if not _fits(arr.shape, want):
                shown = tuple("any" if w is None else w for w in want)
                return f"key {key!r} has shape {arr.shape}, expected {shown}"
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
    replies: Sequence[Message], expected: Sequence[Mapping[str, object] | None] | None = None
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


def check_replies(
    replies: Mapping[int, Message], expect: Mapping[int, Mapping[str, object] | None] | None
) -> tuple[dict[int, Message], dict[int, str]]:
    """(the replies that pass ``reply_problem`` against what ``expect`` says of their client,
    {client: why} of the others)."""
    cids = list(replies)
    problems = reply_problems(
        [replies[c] for c in cids], None if expect is None else [expect.get(c) for c in cids]
    )
    ok: dict[int, Message] = {}
    refused: dict[int, str] = {}
    for cid, problem in zip(cids, problems, strict=True):
        if problem is None:
            ok[cid] = replies[cid]
        else:
            refused[cid] = problem
    return ok, refused
