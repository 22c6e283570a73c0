"""Normalisation statistics from per-client summaries, never from pooled rows.

Each client contributes its row count, mean and sum of squared deviations, which is what it could
send in one message; combining them (the pairwise update of Chan, Golub and LeVeque) gives the mean
and variance of all clients' rows exactly. The simulator computes what a real federation could, and
a Flower split normalises its nodes' files with the same numbers."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Summary:
    """One client's contribution: how many values per statistic, their mean and squared spread."""

    count: float
    mean: np.ndarray
    m2: np.ndarray

    def __add__(self, other: Summary) -> Summary:
        if self.count == 0:
            return other
        if other.count == 0:
            return self
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return Summary(n, mean, m2)


def summarize(x: np.ndarray, channels: int | None) -> Summary:
    """A client's summary: per feature (``channels=None``) or per channel of (C, ...) samples."""
    a = np.asarray(x, dtype=np.float64)
    per_row = int(np.prod(a.shape[1:]))
    if channels is None:
        a = a.reshape(len(a), per_row)
        axes: tuple[int, ...] = (0,)
    else:
        a = a.reshape(len(a), channels, per_row // channels)
        axes = (0, 2)
    if len(a) == 0:
        return Summary(0.0, np.zeros(a.shape[1]), np.zeros(a.shape[1]))
    count = float(np.prod([a.shape[i] for i in axes]))
    mean = a.mean(axis=axes)
    shape = (1, -1) if channels is None else (1, -1, 1)
    m2 = np.square(a - mean.reshape(shape)).sum(axis=axes)
    return Summary(count, mean, m2)


def standardiser(parts: Iterable[np.ndarray], channels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (constant features: 1) over every client's rows, from their
    summaries alone."""
    total: Summary | None = None
    for part in parts:
        s = summarize(part, channels)
        total = s if total is None else total + s
    if total is None or total.count == 0:
        raise ValueError("no rows to normalise with")
    std = np.sqrt(total.m2 / total.count)
    constant = std <= 1e-12 * np.maximum(1.0, np.abs(total.mean))  # rounding, not spread
    return total.mean, np.where(constant, 1.0, std)


#: rows normalised at a time: float64 arithmetic on a slice, float32 stored (bounded memory)
CHUNK = 8192


def statistics(mode: str, mean: np.ndarray, std: np.ndarray) -> dict[str, object]:
    """What a federation records about its normalisation (``data.info["normalization"]``): enough
    for a node reading raw files to apply the very same map."""
    mean = np.asarray(mean, dtype=np.float64).ravel()
    std = np.asarray(std, dtype=np.float64).ravel()
    std = np.where(std <= 1e-12 * np.maximum(1.0, np.abs(mean)), 1.0, std)  # no spread: divide by one
    return {"mode": mode, "mean": mean.tolist(), "std": std.tolist()}


def normalise(x: np.ndarray, stats: dict[str, object], shape: tuple[int, ...]) -> np.ndarray:
    """``(x - mean) / std`` per feature (``standardize``) or per channel (``channel``) as float32
    samples of ``shape``, one array owning its memory (clients' rows are later views of it)."""
    n = len(x)
    mean = np.asarray(stats["mean"], dtype=np.float64)
    std = np.asarray(stats["std"], dtype=np.float64)
    out = np.empty((n, *shape), dtype=np.float32)
    groups = len(mean)
    src, dst = np.asarray(x).reshape(n, groups, -1), out.reshape(n, groups, -1)
    mean, std = mean.reshape(1, groups, 1), std.reshape(1, groups, 1)
    for i in range(0, n, CHUNK):
        dst[i : i + CHUNK] = (src[i : i + CHUNK] - mean) / std
    return out
