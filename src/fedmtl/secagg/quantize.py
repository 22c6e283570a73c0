"""Fixed-point encoding of (weighted) updates into the ring Z_R, R = 2^(8 * ring_bytes).

Masks only cancel in modular arithmetic, so updates become integers first: each coordinate is
clipped to ``[-clip, clip]`` and scaled to an integer ``q`` in ``[-L, L]``, L = 2^(bits-1) - 1
(stochastic rounding by default: unbiased, so low bit widths do not bias the mean). A client with
integer weight ``w`` (its number of examples for FedAvg) sends ``[w, w*q_1, ..., w*q_d]``; the
first coordinate makes the server learn the total weight of the survivors and nothing per client.

The ring is sized from a public bound on the total weight, so the sum of every subset of clients
fits without wrapping: |sum w*q| <= W*L < R/2. Sums are then exact integers, and dequantising the
sum gives exactly the weighted sum of the quantised updates (the only error is each client's
rounding, at most clip/L per coordinate, and clipping, which the round row reports).
Arithmetic runs in uint64 (wrapping mod 2^64, which R divides); the wire carries only the low
``ring_bytes`` bytes of each element."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedmtl.errors import ConfigError, ProtocolError


@dataclass(frozen=True)
class RingCodec:
    bits: int
    clip: float
    ring_bytes: int
    stochastic: bool = True

    @staticmethod
    def for_weights(bits: int, clip: float, max_total_weight: int, stochastic: bool = True) -> RingCodec:
        """The smallest whole-byte ring that holds the weighted sum of any subset of clients."""
        need = bits + math.ceil(math.log2(max(2, max_total_weight + 1))) + 1
        ring_bytes = math.ceil(need / 8)
        if ring_bytes > 8:
            raise ConfigError(
                f"config: secagg.bits = {bits}: with a total client weight of {max_total_weight} the sum "
                f"needs {need} bits, more than 64; lower secagg.bits or use secagg.weighting: uniform"
            )
        return RingCodec(bits=bits, clip=clip, ring_bytes=ring_bytes, stochastic=stochastic)

    @property
    def levels(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def modulus_mask(self) -> np.uint64:
        return np.uint64(2 ** (8 * self.ring_bytes) - 1) if self.ring_bytes < 8 else np.uint64(2**64 - 1)

    def reduce(self, v: np.ndarray) -> np.ndarray:
        return v & self.modulus_mask if self.ring_bytes < 8 else v

    def encode(self, x: np.ndarray, weight: int, rng: np.random.Generator | None) -> tuple[np.ndarray, int]:
        """(ring vector [w, w*q...] as uint64, number of clipped coordinates)."""
        x = np.asarray(x, dtype=np.float64).ravel()
        clipped = int(np.count_nonzero(np.abs(x) > self.clip))
        y = np.clip(x, -self.clip, self.clip) * (self.levels / self.clip)
        stochastic = self.stochastic and rng is not None
        q = np.floor(y + rng.random(y.shape)) if stochastic else np.rint(y)  # type: ignore[union-attr]
        q = np.clip(q, -self.levels, self.levels).astype(np.int64)
        v = np.empty(q.size + 1, dtype=np.int64)
        v[0] = weight
        np.multiply(q, int(weight), out=v[1:])
        return self.reduce(v.view(np.uint64)), clipped

    def signed(self, s: np.ndarray) -> np.ndarray:
        """Ring elements as signed integers in [-R/2, R/2)."""
        s = self.reduce(np.asarray(s, dtype=np.uint64))
        if self.ring_bytes == 8:
            return s.view(np.int64)
        half = np.uint64(2 ** (8 * self.ring_bytes - 1))
        out = s.astype(np.int64)
        out[s >= half] -= np.int64(2 ** (8 * self.ring_bytes))
        return out

    def decode_sum(self, s: np.ndarray) -> tuple[np.ndarray, int]:
        """(weighted mean of the updates in float64, total weight) from the ring sum."""
        z = self.signed(s)
        total = int(z[0])
        if total <= 0:
            raise ProtocolError(f"secagg: the unmasked total weight is {total}; the sum is corrupt")
        return z[1:].astype(np.float64) * (self.clip / self.levels) / total, total

    def to_wire(self, v: np.ndarray) -> np.ndarray:
        """uint8 array with the low ``ring_bytes`` bytes of each element (little-endian)."""
        b = np.ascontiguousarray(v, dtype="<u8").view(np.uint8).reshape(-1, 8)
        return np.ascontiguousarray(b[:, : self.ring_bytes]).ravel()

    def from_wire(self, w: np.ndarray, length: int) -> np.ndarray:
        w = np.asarray(w)
        if w.dtype != np.uint8 or w.size != length * self.ring_bytes:
            raise ProtocolError(
                f"secagg: masked input must be {length * self.ring_bytes} uint8 bytes, got {w.size} {w.dtype}"
            )
        out = np.zeros((length, 8), dtype=np.uint8)
        out[:, : self.ring_bytes] = w.reshape(length, self.ring_bytes)
        return out.view("<u8").ravel().astype(np.uint64, copy=False)
