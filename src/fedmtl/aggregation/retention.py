"""Retention blend of a new global model with the previous one (FDRMFL's server step).

``new = retention * previous + (1 - retention) * average``: retention 0 is the plain client average
(FedAvg), 1 keeps the previous model unchanged (the clients' work is discarded), values between
damp how far one round of (possibly non-IID) client updates can move the global model. FDRMFL's
authors keep 10% of the old model (retention 0.1). A pure function over parameter dicts, so any
algorithm or pipeline step can use it."""

from __future__ import annotations

import numpy as np

from fedmtl.errors import ConfigError, ProtocolError


def retain(
    previous: dict[str, np.ndarray], average: dict[str, np.ndarray], retention: float
) -> dict[str, np.ndarray]:
    """Blend key by key in float64, keeping each key's dtype; the end points are exact copies."""
    r = float(retention)
    if not 0.0 <= r <= 1.0 or np.isnan(r):
        raise ConfigError(f"aggregation: retention = {retention!r}: allowed: a number in [0, 1]")
    if set(previous) != set(average):
        differ = sorted(set(previous) ^ set(average))
        raise ProtocolError(f"aggregation: retention blend needs the same keys; differing: {differ}")
    out = {}
    for k, avg in average.items():
        prev = previous[k]
        if prev.shape != avg.shape:
            raise ProtocolError(f"aggregation: key {k!r} has shape {avg.shape}, previous {prev.shape}")
        if r == 0.0:
            out[k] = avg.copy()
        elif r == 1.0:
            out[k] = prev.astype(avg.dtype, copy=True)
        else:
            blend = r * prev.astype(np.float64) + (1.0 - r) * avg.astype(np.float64)
            out[k] = blend.astype(avg.dtype)
    return out
