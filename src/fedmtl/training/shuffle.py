"""Mini-batch orders hashed from (seed, purpose, round, client), for a whole round in one sort.

A numpy ``Generator`` per client costs about 1.5 us to build and 2 us per ``permutation``; with
10,000 clients of 30 samples that is most of a batched round's bookkeeping. Here a client's
epoch-e order is its samples sorted by a counter-based hash: sample i's rank key is the top 32
bits of the (i + 1)-th SplitMix64 output seeded by hashing the client's words and e, ties broken
by i. No state is carried from draw to draw, so the orders of every client in a round come from
a few array operations and one sort, and a single client (sequential execution, a Flower node)
gets exactly the same order on its own.

``Stream`` carries the words. It also stands in for a numpy Generator: any other draw (noise,
dropout) goes to ``np.random.default_rng(words)``, built on first use, so clients that draw
nothing else never pay for one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

_MASK = 2**64 - 1
_GAMMA = 0x9E3779B97F4A7C15
_MUL_A, _MUL_B = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_U = np.uint64
#: Rank keys use this many hash bits; sample indices and segment numbers share the other 32.
RANK_BITS = 32
_PACK_BITS = 64 - RANK_BITS


def _fmix(z: int) -> int:
    """SplitMix64's output function on a Python int (mod 2**64)."""
    z = ((z ^ (z >> 30)) * _MUL_A) & _MASK
    z = ((z ^ (z >> 27)) * _MUL_B) & _MASK
    return z ^ (z >> 31)


def _fmix_array(z: np.ndarray) -> np.ndarray:
    """``_fmix`` of every element of a uint64 array, in place (the callers' arrays are fresh)."""
    z ^= z >> _U(30)
    z *= _U(_MUL_A)
    z ^= z >> _U(27)
    z *= _U(_MUL_B)
    z ^= z >> _U(31)
    return z


def _absorb(h: int, word: int) -> int:
    return _fmix(((h ^ (word & _MASK)) + _GAMMA) & _MASK)


def _absorb_array(h: np.ndarray, words: np.ndarray) -> np.ndarray:
    return _fmix_array((h ^ words) + _U(_GAMMA))


def words_key(words: Sequence[int]) -> int:
    """The 64-bit key of a word sequence (each word taken mod 2**64)."""
    h = 0
    for w in words:
        h = _absorb(h, int(w))
    return h


class Stream:
    """One client's randomness for one round, keyed by ``words`` (seed, purpose, round, client).

    Batch orders come from ``key`` (see the module doc); attribute access that is not the
    Stream's own (``random``, ``normal``, ``permutation``, ...) goes to ``generator``."""

    __slots__ = ("words", "key", "_generator")

    def __init__(self, *words: int, key: int | None = None) -> None:
        self.words = tuple(int(w) for w in words)
        self.key = words_key(self.words) if key is None else key
        self._generator: np.random.Generator | None = None

    @property
    def generator(self) -> np.random.Generator:
        """``np.random.default_rng(list(words))``, built on first use."""
        if self._generator is None:
            from fedmtl.runtime.seeds import derived_rng  # runtime imports training: import late

            self._generator = derived_rng(*self.words)
        return self._generator

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # pickling and copying probe dunders: do not build a generator
            raise AttributeError(name)
        return getattr(self.generator, name)

    def __repr__(self) -> str:
        return f"Stream{self.words}"


#: What local training takes for its batch order: a Stream, or a numpy Generator drawn from.
Randomness = np.random.Generator | Stream


def streams(seed: int, purpose: int, round: int, clients: Sequence[int]) -> list[Stream]:
    """``[Stream(seed, purpose, round, c) for c in clients]``, keys hashed at once."""
    cids = [int(c) for c in clients]
    if not cids:
        return []
    head = words_key((seed, purpose, round))
    keys = _absorb_array(np.full(len(cids), head, dtype=_U), np.asarray(cids, dtype=np.int64).astype(_U))
    make = Stream.__new__
    out = []
    for c, k in zip(cids, keys.tolist(), strict=True):
        s = make(Stream)
        s.words, s.key, s._generator = (seed, purpose, round, c), k, None
        out.append(s)
    return out


def orders(sizes: Sequence[int], epochs: Sequence[int], keys: Sequence[int]) -> np.ndarray:
    """Client c's ``epochs[c]`` permutations of ``range(sizes[c])`` (epoch 0 first), for every
    client, concatenated."""
    n = np.asarray(sizes, dtype=np.int64)
    e = np.asarray(epochs, dtype=np.int64)
    seg_client = np.repeat(np.arange(len(n)), e)  # one segment per (client, epoch)
    seg_epoch = np.arange(len(seg_client)) - np.repeat(np.cumsum(e) - e, e)
    seeds = _absorb_array(np.asarray(keys, dtype=_U)[seg_client], seg_epoch.astype(_U))
    return _segment_orders(n[seg_client], seeds)


def permutation(n: int, stream: Stream, epoch: int = 0) -> np.ndarray:
    """``stream``'s epoch-``epoch`` order of ``range(n)`` (what ``orders`` gives this client)."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    z = _counters(n)[:n] + _U(_absorb(stream.key, epoch))
    return _sorted_by_rank(z, _INDEX[:n], max(1, (n - 1).bit_length()), None)


_COUNTERS = np.zeros(0, dtype=_U)  # (i + 1) * gamma for i < len, grown on demand
_INDEX = np.zeros(0, dtype=_U)  # arange(len), grown with _COUNTERS


def _counters(n: int) -> np.ndarray:
    global _COUNTERS, _INDEX
    if len(_COUNTERS) < n:
        size = max(n, 2 * len(_COUNTERS), 1024)
        _INDEX = np.arange(size, dtype=_U)
        _COUNTERS = (_INDEX + _U(1)) * _U(_GAMMA)
    return _COUNTERS


def _segment_orders(seg_n: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """For every segment, ``range(seg_n[s])`` sorted by its rank keys under ``seeds[s]``."""
    total = int(seg_n.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    local = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(seg_n) - seg_n, seg_n)
    z = _counters(int(seg_n.max()))[local]
    z += np.repeat(seeds, seg_n)
    seg = np.repeat(np.arange(len(seg_n), dtype=_U), seg_n) if len(seg_n) > 1 else None
    return _sorted_by_rank(z, local.view(_U), max(1, int(seg_n.max() - 1).bit_length()), seg)


def _sorted_by_rank(z: np.ndarray, local: np.ndarray, index_bits: int, seg: np.ndarray | None) -> np.ndarray:
    """``local`` sorted by segment, then rank key (the top bits of SplitMix64's output function
    applied to ``z``, in place), then itself."""
    _fmix_array(z)
    z >>= _U(64 - RANK_BITS)
    seg_bits = 0 if seg is None else int(seg[-1]).bit_length()
    if index_bits + seg_bits > _PACK_BITS:  # does not pack into one word: sort three keys
        keys = (local, z) if seg is None else (local, z, seg)
        return local.view(np.int64)[np.lexsort(keys)]
    z <<= _U(index_bits)
    z |= local
    if seg_bits:
        z |= seg << _U(64 - seg_bits)
    z.sort()  # unique values: the same result whatever sort algorithm numpy picks
    z &= _U((1 << index_bits) - 1)
    return z.view(np.int64)
