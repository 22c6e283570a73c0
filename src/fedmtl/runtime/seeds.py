"""Random streams derived from (seed, purpose, round, client), built for a whole round at once.

Every client's training rng is ``np.random.default_rng([seed, purpose, round, client])``: it does
not depend on which other clients were sampled, on their order, or on whether the round runs
sequentially, batched or on a Flower node. Building one costs about 10 us, mostly NumPy's
``SeedSequence`` hashing its four words into PCG64's 128-bit state and increment; a round of 10,000
clients pays that 10,000 times. ``derived_rngs`` computes that hash for all clients with a few
vectorised uint32 operations (the same algorithm, O'Neill's seed_seq variant that NumPy
implements, tested against NumPy for equality) and hands each PCG64 its precomputed state.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.random.bit_generator import ISeedSequence

_U32 = 2**32
_POOL = 4
_INIT_A, _MULT_A = np.uint32(0x43B0D7E5), np.uint32(0x931E8875)
_INIT_B, _MULT_B = np.uint32(0x8B51F9DD), np.uint32(0x58F38DED)
_MIX_L, _MIX_R = np.uint32(0xCA01F9DD), np.uint32(0x4973F715)
_SHIFT = np.uint32(16)


def derived_rng(seed: int, *keys: int) -> np.random.Generator:
    """``np.random.default_rng([seed, *keys])``, built about twice as fast when every key fits in
    32 bits (the same stream: SeedSequence reads such ints as one uint32 word each)."""
    words = (seed, *keys)
    if all(0 <= k < _U32 for k in words):
        seq = np.random.SeedSequence(np.array(words, dtype=np.uint32))
        return np.random.Generator(np.random.PCG64(seq))
    return np.random.default_rng(list(words))


class _Precomputed(ISeedSequence):
    """A seed sequence whose PCG64 state words were computed in bulk by ``derived_rngs``."""

    __slots__ = ("_words",)

    def __init__(self, words: np.ndarray) -> None:
        self._words = words

    def generate_state(self, n_words: int, dtype: type = np.uint32) -> np.ndarray:
        # only PCG64's request was precomputed (it passes np.uint64 itself: no dtype to build)
        if n_words != 4 or (dtype is not np.uint64 and np.dtype(dtype) != np.uint64):
            raise ValueError("precomputed seed sequence: only 4 uint64 words are available")
        return self._words


def _pool_states(entropy: np.ndarray) -> np.ndarray:
    """SeedSequence's mixed pool for each row of ``entropy`` ([n, 4] uint32 words, no spawn key:
    exactly the pool's size, so every word is hashed in once and then cross-mixed)."""
    n = len(entropy)
    hash_a = np.full(n, _INIT_A, dtype=np.uint32)

    def hashmix(value: np.ndarray) -> np.ndarray:
        nonlocal hash_a
        value = value ^ hash_a
        hash_a = hash_a * _MULT_A
        value = value * hash_a
        return value ^ (value >> _SHIFT)

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        out = _MIX_L * x - _MIX_R * y
        return out ^ (out >> _SHIFT)

    pool = [hashmix(entropy[:, i]) for i in range(_POOL)]
    for src in range(_POOL):
        for dst in range(_POOL):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    return np.stack(pool, axis=1)


def _pcg64_words(entropy: np.ndarray) -> np.ndarray:
    """``SeedSequence(row).generate_state(4, np.uint64)`` for every row, as [n, 4] uint64."""
    pool = _pool_states(entropy)
    n = len(pool)
    hash_b = np.full(n, _INIT_B, dtype=np.uint32)
    out = np.empty((n, 8), dtype=np.uint32)
    for i in range(8):
        value = pool[:, i % _POOL] ^ hash_b
        hash_b = hash_b * _MULT_B
        value = value * hash_b
        out[:, i] = value ^ (value >> _SHIFT)
    return out.view(np.uint64)


def derived_rngs(seed: int, purpose: int, round: int, clients: Sequence[int]) -> list[np.random.Generator]:
    """``[derived_rng(seed, purpose, round, c) for c in clients]``, the same streams, built at once."""
    cids = np.asarray(clients, dtype=np.int64).reshape(-1)
    head = (seed, purpose, round)
    if len(cids) == 0 or not all(0 <= k < _U32 for k in head) or cids.min() < 0 or cids.max() >= _U32:
        return [derived_rng(seed, purpose, round, int(c)) for c in cids]
    entropy = np.empty((len(cids), 4), dtype=np.uint32)
    entropy[:, :3] = np.array(head, dtype=np.uint32)
    entropy[:, 3] = cids.astype(np.uint32)
    with np.errstate(over="ignore"):
        words = _pcg64_words(entropy)
    pcg, gen = np.random.PCG64, np.random.Generator
    return [gen(pcg(_Precomputed(w))) for w in words]
