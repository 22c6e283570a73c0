"""Sample-weighted mean of client arrays, key by key."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedmtl.errors import ProtocolError


def weighted_mean(
    updates: Sequence[dict[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """Average in float64 so the result does not depend on client order beyond rounding of the sum."""
    if not updates:
        raise ProtocolError("aggregation: no client updates to average")
    keys = list(updates[0])
    for i, u in enumerate(updates[1:], start=1):
        if list(u) != keys:
            missing = sorted(set(keys) ^ set(u))
            raise ProtocolError(f"aggregation: update {i} has different keys than update 0: {missing}")
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ProtocolError(f"aggregation: weights must be >= 0 with a positive sum, got {w.tolist()}")
    w = w / w.sum()
    out = {}
    for k in keys:
        acc = np.zeros(updates[0][k].shape, dtype=np.float64)
        for wi, u in zip(w, updates, strict=True):
            if u[k].shape != acc.shape:
                raise ProtocolError(f"aggregation: key {k!r} has shape {u[k].shape}, expected {acc.shape}")
            acc += wi * u[k]
        out[k] = acc.astype(updates[0][k].dtype)
    return out
