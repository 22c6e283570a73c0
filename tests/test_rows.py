"""Replies that stay in their batched stacks: they behave as plain dicts, and the stack-wide checks
and mean give exactly what the per-client ones give."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from fedmtl.aggregation.mean import weighted_mean
from fedmtl.algorithms.base import Message
from fedmtl.config import parse_config
from fedmtl.experiment.run import build
from fedmtl.runtime.validation import reply_problem, reply_problems
from fedmtl.training.buffers import BufferPool
from fedmtl.training.rows import StackedRows, group_rows, linked_stack
from tests.conftest import digits_config


def _stack(n: int = 6, seed: int = 0) -> StackedRows:
    rng = np.random.default_rng(seed)
    return StackedRows(
        ["w", "b", "frozen"],
        {"w": rng.normal(size=(n, 4, 3)).astype(np.float32), "b": rng.normal(size=(n, 4)).astype(np.float32)},
        {"frozen": np.ones(2, dtype=np.float32)},
    )


def test_all_rows_at_once_are_the_rows_one_by_one():
    st = _stack()
    bulk = st.rows()
    assert len(bulk) == st.n
    for r, view in enumerate(bulk):
        single = st.row(r)
        assert type(view) is type(single) and list(view) == list(single) == st.keys
        assert linked_stack(view) is st and view.row == r
        for key in st.keys:
            np.testing.assert_array_equal(view[key], single[key])
            assert np.shares_memory(view[key], single[key])
        assert view["frozen"] is st.shared["frozen"]
    bulk[3]["w"] = np.zeros((4, 3))  # rows are independent dicts: editing one unlinks only it
    assert linked_stack(bulk[3]) is None and linked_stack(bulk[4]) is st


def test_a_row_is_a_dict_of_views_until_edited():
    st = _stack()
    view = st.row(2)
    assert list(view) == ["w", "b", "frozen"] and linked_stack(view) is st
    assert np.shares_memory(view["w"], st.stacked["w"]) and view["frozen"] is st.shared["frozen"]
    view["w"] *= 2  # in place: the stack sees it, so the link stays true
    assert linked_stack(view) is st and np.array_equal(st.stacked["w"][2], view["w"])
    assert pickle.loads(pickle.dumps(view)).__class__ is dict
    for edit in (
        lambda v: v.__setitem__("w", np.zeros((4, 3))),
        lambda v: v.update(b=np.zeros(4)),
        lambda v: v.pop("b"),
        lambda v: v.__delitem__("b"),
        lambda v: v.setdefault("extra", 1),
        lambda v: v.clear(),
    ):
        other = st.row(1)
        edit(other)
        assert linked_stack(other) is None  # rebinding a key cuts the link
    assert group_rows([st.row(0), {"w": 1}]) is None


def test_stacked_mean_equals_the_per_client_mean():
    a, b = _stack(6, 0), _stack(5, 1)
    rows = [a.row(i) for i in (0, 2, 5)] + [b.row(i) for i in (4, 1)] + [a.row(3)]
    weights = [3.0, 1.0, 7.0, 2.0, 5.0, 0.5]
    fast = weighted_mean(rows, weights)
    slow = weighted_mean([dict(r) for r in rows], weights)
    for k in slow:
        np.testing.assert_allclose(fast[k], slow[k], rtol=1e-6, atol=1e-7)
        assert fast[k].dtype == slow[k].dtype


@pytest.mark.parametrize("summed_by", ["numpy", "torch"])
def test_stack_wide_checks_give_the_per_reply_verdicts(summed_by, monkeypatch):
    import fedmtl.training.rows as rows_mod

    monkeypatch.setattr(rows_mod, "_TORCH_SUM_ELEMS", 2**40 if summed_by == "numpy" else 0)
    st = _stack(8)
    st.stacked["w"][3, 1, 2] = np.nan
    st.stacked["b"][6, 0] = np.inf
    big = _stack(2, 3)
    big.stacked["b"][:] = 3e38  # finite, but the float32 row sum overflows: checked exactly
    replies = [Message(arrays=st.row(i)) for i in range(8)] + [Message(arrays=big.row(0))]
    plain = [Message(arrays=dict(r.arrays)) for r in replies]
    assert reply_problems(replies) == [reply_problem(r) for r in plain]
    assert reply_problems(replies)[3] == "non-finite values in 'w'"
    assert reply_problems(replies)[6] == "non-finite values in 'b'"
    assert reply_problems(replies)[8] is None
    want = {"w": np.zeros((4, 3)), "b": np.zeros(5), "frozen": np.zeros(2)}
    expected = [want] * len(replies)
    assert reply_problems(replies, expected) == [reply_problem(r, want) for r in plain]
    assert reply_problems(replies, expected)[0] == "key 'b' has shape (4,), expected (5,)"
    # Replies of one stack answering different broadcasts: a verdict per expected structure.
    right = {"w": np.zeros((4, 3)), "b": np.zeros(4), "frozen": np.zeros(2)}
    mixed = [right if i % 2 else want for i in range(len(replies))]
    assert reply_problems(replies, mixed) == [reply_problem(r, w) for r, w in zip(plain, mixed, strict=True)]
    assert reply_problems(replies, mixed)[1] is None and reply_problems(replies, mixed)[2] is not None


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_row_sums_carry_every_nonfinite_value(dtype):
    from fedmtl.training.rows import _row_sums

    flat = np.ones((5, 7), dtype=dtype)
    flat[1, 3] = np.nan
    flat[2, 0] = np.inf
    flat[3, 5], flat[3, 6] = np.inf, -np.inf
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(_row_sums(flat)).tolist()
    assert finite == [True, False, False, False, True]
    assert _row_sums(np.ones((3, 0), dtype=dtype)).tolist() == [0, 0, 0]


def test_batched_round_rejects_one_diverged_client_by_name():
    """A NaN in one client's row of a batched stack rejects that client only, with its reason."""
    _, algo, sim = build(parse_config({**digits_config(), "runtime": {"execution": "batched"}}))
    inner = sim.executor.run

    def poisoned(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        outcomes = inner(*args, **kwargs)
        outcomes[1][1].arrays["head.bias"][0] = np.nan  # in place: still a row of its stack
        return outcomes

    sim.executor.run = poisoned
    res = sim.run_round(1, algo.init_server(), {})
    bad = [r for r in res.train_rows if "rejected" in r]
    assert [r["rejected"] for r in bad] == ["non-finite values in 'head.bias'"]
    assert res.info["rejected_clients"] == [bad[0]["client"]] and bad[0]["client"] not in res.replies
    assert all(np.isfinite(v).all() for v in res.server["params"].values())


def test_pool_reuses_only_memory_nobody_holds():
    pool = BufferPool(max_bytes=8 * 2**20)
    first = pool.empty((512, 256))
    ptr = first.data_ptr()
    assert pool.empty((512, 256)).data_ptr() != ptr  # the first is still held
    view = first[3].numpy()
    del first
    assert pool.empty((512, 256)).data_ptr() != ptr  # a numpy view of it is still alive
    del view
    assert pool.empty((512, 256)).data_ptr() == ptr
    assert pool.nbytes <= pool.max_bytes


def test_the_pool_hands_a_round_back_the_memory_of_the_last_one():
    pool = BufferPool(max_bytes=8 * 2**20)
    first_round = [pool.empty((256, 64)) for _ in range(5)]
    ptrs = {t.data_ptr() for t in first_round}
    assert len(ptrs) == 5  # distinct while held
    del first_round
    second_round = [pool.empty((256, 64)) for _ in range(5)]
    assert {t.data_ptr() for t in second_round} == ptrs  # the same five, none allocated anew
    held = second_round[2]
    del second_round
    third = [pool.empty((256, 64)) for _ in range(5)]
    assert held.data_ptr() not in {t.data_ptr() for t in third}  # a held one is skipped
    assert len({t.data_ptr() for t in third}) == 5 and pool.nbytes == 6 * 256 * 64 * 4
