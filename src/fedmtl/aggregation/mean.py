"""Sample-weighted mean of client arrays, key by key."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedmtl.errors import ProtocolError
from fedmtl.training.rows import group_rows


def weighted_mean(
    updates: Sequence[dict[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """Average in float64 so the result does not depend on client order beyond rounding of the sum."""
    if not updates:
        raise ProtocolError("aggregation: no client updates to average")
    keys = list(updates[0])
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ProtocolError(f"aggregation: weights must be >= 0 with a positive sum, got {w.tolist()}")
    w = w / w.sum()
    fast = _stacked_mean(updates, w, keys)  # rows of stacks: their keys are checked per stack
    if fast is not None:
        return fast
    for i, u in enumerate(updates[1:], start=1):
        if list(u) != keys:
            missing = sorted(set(keys) ^ set(u))
            raise ProtocolError(f"aggregation: update {i} has different keys than update 0: {missing}")
    out = {}
    for k in keys:
        acc = np.zeros(updates[0][k].shape, dtype=np.float64)
        for wi, u in zip(w, updates, strict=True):
            if u[k].shape != acc.shape:
                raise ProtocolError(f"aggregation: key {k!r} has shape {u[k].shape}, expected {acc.shape}")
            acc += wi * u[k]
        out[k] = acc.astype(updates[0][k].dtype)
    return out


#: Clients summed per float32 product before the float64 accumulator takes the partial sum.
_BLOCK_ROWS = 256


def _stacked_mean(
    updates: Sequence[dict[str, np.ndarray]], w: np.ndarray, keys: list[str]
) -> dict[str, np.ndarray] | None:
    """The same mean when every update is a row of a batched round's stacks: one matrix-vector
    product per block of 256 clients and key instead of one multiply-add per client (None
    otherwise). Blocks are summed in the arrays' own precision (float32: relative error ~1e-7)
    and accumulated across blocks in float64, so the result depends on client order only through
    that rounding."""
    groups = group_rows(updates)
    if groups is None or any(stack.keys != keys for stack, _, _ in groups):
        return None
    first = groups[0][0]
    out = {}
    for k in keys:
        ref = first.stacked[k][0] if k in first.stacked else first.shared[k]
        acc = np.zeros(ref.shape, dtype=np.float64)
        for stack, positions, rows in groups:
            ws = w[positions]
            if k in stack.shared:
                part = stack.shared[k]
                if part.shape != acc.shape:
                    raise ProtocolError(
                        f"aggregation: key {k!r} has shape {part.shape}, expected {acc.shape}"
                    )
                acc += ws.sum() * part
                continue
            arr = stack.stacked[k]
            if arr.shape[1:] != acc.shape:
                raise ProtocolError(f"aggregation: key {k!r} has shape {arr.shape[1:]}, expected {acc.shape}")
            flat = acc.reshape(-1)
            idx = np.asarray(rows)
            whole = stack.is_every_row(idx)
            wcast = ws.astype(arr.dtype) if arr.dtype.kind == "f" else ws
            for lo in range(0, len(idx), _BLOCK_ROWS):
                sel = slice(lo, lo + _BLOCK_ROWS)
                part = arr[sel] if whole else arr[idx[sel]]
                flat += wcast[sel] @ part.reshape(len(part), -1)
        out[k] = acc.astype(ref.dtype)
    return out
