"""Counter-based batch orders: one sort for a whole round gives each client's own order."""

from __future__ import annotations

import numpy as np
import pytest

from fedmtl.training import shuffle
from fedmtl.training.local import batch_order, batch_orders, batch_schedule
from fedmtl.training.shuffle import Stream, orders, permutation, streams


def test_bulk_streams_have_the_keys_of_streams_built_one_by_one():
    bulk = streams(7, 3, 2, [0, 5, 2**31, 99])
    assert [s.key for s in bulk] == [Stream(7, 3, 2, c).key for c in [0, 5, 2**31, 99]]
    assert bulk[1].words == (7, 3, 2, 5) and repr(bulk[1]) == "Stream(7, 3, 2, 5)"
    assert len({s.key for s in streams(0, 3, 1, range(1000))}) == 1000


def test_one_sort_gives_every_client_its_own_permutations():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 60, 200)
    epochs = rng.integers(1, 4, 200)
    st = streams(0, 3, 4, range(200))
    got = orders(sizes, epochs, [s.key for s in st])
    at = 0
    for n, e, s in zip(sizes.tolist(), epochs.tolist(), st, strict=True):
        for epoch in range(e):
            part = got[at : at + n]
            np.testing.assert_array_equal(part, permutation(n, s, epoch))
            assert sorted(part.tolist()) == list(range(n))
            at += n
    assert at == len(got)
    assert not np.array_equal(permutation(50, st[0], 0), permutation(50, st[0], 1))
    assert not np.array_equal(permutation(50, st[0]), permutation(50, st[1]))


def test_the_unpacked_sort_gives_the_same_orders(monkeypatch):
    sizes, keys = [70, 3, 41], [11, 12, 13]
    packed = orders(sizes, [2, 1, 1], keys)
    monkeypatch.setattr(shuffle, "_PACK_BITS", 0)  # too few bits to pack: the three-key sort
    np.testing.assert_array_equal(orders(sizes, [2, 1, 1], keys), packed)


def test_every_position_is_equally_likely():
    st = streams(1, 3, 1, range(20000))
    perms = orders([5] * 20000, [1] * 20000, [s.key for s in st]).reshape(-1, 5)
    where_zero = np.bincount(np.argmax(perms == 0, axis=1), minlength=5)
    assert np.abs(where_zero - 4000).max() < 300  # 5 sigma of a binomial(20000, 1/5)


def test_a_stream_draws_like_a_numpy_generator_built_only_when_asked():
    s = Stream(0, 3, 5, 7)
    batch_order(40, 16, 3, s)
    assert s._generator is None  # batch orders never build the generator
    assert s.random() == np.random.default_rng([0, 3, 5, 7]).random()
    assert s.generator is s.generator


def test_batch_schedule_and_orders_agree_for_streams_and_generators():
    sizes, steps = [30, 7, 50], [2, 3, 1]  # client 1 runs three epochs of one batch of 7 each
    for make in (lambda c: Stream(0, 3, 1, c), lambda c: np.random.default_rng([0, 3, 1, c])):
        schedules = [
            batch_schedule(n, 16, t, make(c)) for c, (n, t) in enumerate(zip(sizes, steps, strict=True))
        ]
        assert [len(b) for b in schedules[0]] == [16, 14] and [len(b) for b in schedules[1]] == [7, 7, 7]
        order, lengths = batch_orders(sizes, 16, steps, [make(c) for c in range(3)])
        np.testing.assert_array_equal(order, np.concatenate([np.concatenate(s) for s in schedules]))
        assert lengths.tolist() == [30, 21, 16]
    mixed = [Stream(0, 3, 1, 0), np.random.default_rng(1), Stream(0, 3, 1, 2)]
    order, lengths = batch_orders(sizes, 16, steps, mixed)
    alone = [Stream(0, 3, 1, 0), np.random.default_rng(1), Stream(0, 3, 1, 2)]
    np.testing.assert_array_equal(
        order, np.concatenate([batch_order(n, 16, t, r) for n, t, r in zip(sizes, steps, alone, strict=True)])
    )
    assert lengths.tolist() == [30, 21, 16]


@pytest.mark.parametrize("n", [1, 2, 33])
def test_tiny_and_odd_sizes(n):
    assert sorted(permutation(n, Stream(3, 3, 3, 3)).tolist()) == list(range(n))
    assert len(permutation(0, Stream(3, 3, 3, 3))) == 0
