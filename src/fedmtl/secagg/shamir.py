"""Shamir secret sharing over a prime field, vectorised with numpy.

A secret is a vector of field elements; each element gets its own random polynomial of degree
``t - 1`` whose constant term is the element, and share ``j`` is the polynomial evaluated at the
holder's public point ``x_j != 0``. Any ``t`` shares determine the polynomial (Lagrange
interpolation at 0); any ``t - 1`` shares are consistent with every possible secret, each by
exactly ``p`` polynomials, so they carry no information about it (tested exhaustively on a small
field).

The default field is GF(2^31 - 1): products of two elements fit in int64, so Horner evaluation and
interpolation run as numpy array operations instead of Python big-int loops, which is what makes
sharing among 1,000 clients affordable. 32-byte secrets (an X25519 private key, a mask seed) are
cut into 3-byte chunks, each below the prime."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from fedmtl.errors import ProtocolError

PRIME = 2**31 - 1
_CHUNK = 3  # bytes per field element (2^24 < PRIME)


def _is_prime(p: int) -> bool:
    if p < 2:
        return False
    i = 2
    while i * i <= p:
        if p % i == 0:
            return False
        i += 1
    return True


class Shamir:
    """``t``-out-of-``n`` sharing of vectors of elements of GF(p), with p < 2^31 prime."""

    def __init__(self, prime: int = PRIME) -> None:
        if not (2 < prime < 2**31) or not _is_prime(prime):
            raise ValueError(f"Shamir: field size must be a prime in (2, 2^31), got {prime}")
        self.p = prime

    def random_elements(self, shape: tuple[int, ...], rng: np.random.Generator | None = None) -> np.ndarray:
        """Uniform field elements by rejection sampling: from the OS's CSPRNG, or from ``rng`` (tests)."""
        count = int(np.prod(shape))
        bits = self.p.bit_length()
        mask = (1 << bits) - 1
        out = np.empty(0, dtype=np.int64)
        while out.size < count:
            need = 2 * (count - out.size) + 8  # acceptance >= 1/2
            if rng is None:
                raw = np.frombuffer(os.urandom(4 * need), dtype="<u4").astype(np.int64)
            else:
                raw = rng.integers(0, 2**32, size=need, dtype=np.int64)
            raw &= mask
            out = np.concatenate([out, raw[raw < self.p]])
        return out[:count].reshape(shape)

    def split(
        self,
        secret: np.ndarray,
        xs: Sequence[int] | np.ndarray,
        t: int,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """Shares of ``secret`` (m field elements) at the points ``xs``: an array (len(xs), m)."""
        secret = np.asarray(secret, dtype=np.int64)
        x = np.asarray(xs, dtype=np.int64)
        if not 1 <= t <= len(x):
            raise ValueError(f"Shamir: threshold {t} must be in 1..{len(x)} (the number of shares)")
        if (x % self.p == 0).any() or len(np.unique(x % self.p)) != len(x):
            raise ValueError("Shamir: share points must be distinct and non-zero in the field")
        if (secret < 0).any() or (secret >= self.p).any():
            raise ValueError("Shamir: secret elements must lie in [0, p)")
        return self.evaluate(secret, self.random_elements((t - 1, secret.size), rng), x)

    def evaluate(self, secret: np.ndarray, coeffs: np.ndarray, xs: Sequence[int] | np.ndarray) -> np.ndarray:
        """f(x) = secret + sum_k coeffs[k-1] x^k at each point (Horner), shape (len(xs), m)."""
        x = (np.asarray(xs, dtype=np.int64) % self.p)[:, None]
        a = [
            np.asarray(secret, dtype=np.int64),
            *np.asarray(coeffs, dtype=np.int64).reshape(-1, np.size(secret)),
        ]
        y = np.broadcast_to(a[-1], (len(x), np.size(secret))).copy()
        for c in a[-2::-1]:  # y <- y x + a_k: below 2^62 + 2^31, so one reduction per step
            y *= x
            y += c
            y %= self.p
        return y

    def lagrange_at_zero(self, xs: Sequence[int] | np.ndarray) -> np.ndarray:
        """Coefficients l_j with f(0) = sum_j l_j f(x_j) for any polynomial of degree < len(xs)."""
        x = np.asarray(xs, dtype=np.int64) % self.p
        k = len(x)
        if len(np.unique(x)) != k or (x == 0).any():
            raise ProtocolError("secagg: Shamir shares must come from distinct non-zero points")
        num = np.ones(k, dtype=np.int64)
        den = np.ones(k, dtype=np.int64)
        for m in range(k):
            # l_j = prod_{m != j} x_m / (x_m - x_j); the m == j factor is replaced by 1.
            fac_num = np.full(k, x[m], dtype=np.int64)
            fac_den = (x[m] - x) % self.p
            fac_num[m] = 1
            fac_den[m] = 1
            num = (num * fac_num) % self.p
            den = (den * fac_den) % self.p
        inv = np.array([pow(int(d), self.p - 2, self.p) for d in den], dtype=np.int64)
        return (num * inv) % self.p

    def combine(
        self, xs: Sequence[int] | np.ndarray, shares: np.ndarray, coeffs: np.ndarray | None = None
    ) -> np.ndarray:
        """The secret from shares (k, m) at points ``xs`` (k >= t); ``coeffs`` may be precomputed."""
        lam = np.asarray(self.lagrange_at_zero(xs) if coeffs is None else coeffs, dtype=np.int64)
        y = np.asarray(shares, dtype=np.int64) % self.p
        # each product is below 2^62 and each reduced term below 2^31, so k < 2^32 terms sum safely
        return ((lam[:, None] * y) % self.p).sum(axis=0) % self.p


def bytes_to_elements(secret: bytes) -> np.ndarray:
    """A byte string as field elements of GF(2^31 - 1), 3 bytes each (little-endian)."""
    pad = (-len(secret)) % _CHUNK
    raw = np.frombuffer(secret + b"\0" * pad, dtype=np.uint8).reshape(-1, _CHUNK).astype(np.int64)
    return raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)


def elements_to_bytes(elements: np.ndarray, length: int) -> bytes:
    """Inverse of ``bytes_to_elements`` for a secret of ``length`` bytes."""
    e = np.asarray(elements, dtype=np.int64)
    if (e < 0).any() or (e >= 1 << (8 * _CHUNK)).any():
        raise ProtocolError("secagg: a reconstructed secret is out of range (inconsistent shares)")
    raw = np.stack([e & 0xFF, (e >> 8) & 0xFF, (e >> 16) & 0xFF], axis=1).astype(np.uint8)
    return raw.tobytes()[:length]


def num_elements(length: int) -> int:
    return -(-length // _CHUNK)
