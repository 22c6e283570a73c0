"""The data-only state format: exact round trips of what algorithms keep, and nothing but data read back."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from fedmtl import treefile
from fedmtl.treefile import TreeFormatError, decode, encode


def _same(a, b) -> bool:
    """Equal values of equal types, all the way down (dtypes, shapes, 0-d vs scalar, key types)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return (
            a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
        )
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and (a == b or (a != a and b != b))
    if isinstance(a, dict):
        return (
            list(a) == list(b)
            and all(type(k) is type(j) for k, j in zip(a, b, strict=True))
            and all(_same(a[k], b[k]) for k in a)
        )
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and a != a:
        return b != b
    return a == b


STATE = {
    "params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(0, np.float64)},
    "groups": {0: 1, 1: 0, 7: 2},  # {client_id: group}: int keys stay ints
    "by_name": {"0": "str key", 0: "int key", 1.5: "float key", True: "bool key", None: "none key"},
    (1, "a"): [True, False, None, 3, -2.5, "x", float("nan"), float("inf"), -0.0, 2**80],
    "tuple": (np.float64(1.5), np.int32(-7), np.bool_(True), np.array(3.0), np.array(2, np.uint8)),
    "nested": [[(), []], {}, ({"k": (1,)},)],
    "sets": ({1, 2}, frozenset({"a"})),
    "bytes": b"\x00\x80raw",
    "dtypes": [
        np.arange(4, dtype=">i4"),
        np.array(["ab", "c"]),
        np.array([b"x", b"yz"]),
        np.ones((2, 2), np.float16),
        np.array([1 + 2j], np.complex64),
        np.arange(6, dtype=np.int64).reshape(2, 3).T,  # not C-contiguous
        np.array(["2024-01-01"], dtype="datetime64[D]"),
    ],
}


def test_every_kind_of_state_round_trips_exactly():
    back = decode(encode(STATE))
    assert _same(STATE, back)
    assert back["params"]["w"].flags.writeable  # states are updated in place by algorithms
    assert type(back["tuple"][3]) is np.ndarray and back["tuple"][3].shape == ()


def test_a_pickle_and_other_files_are_refused_without_being_loaded(tmp_path):
    marker = tmp_path / "ran"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with pytest.raises(TreeFormatError, match="a pickle, which fedmtl never loads"):
        decode(pickle.dumps({"x": Boom()}))
    assert not marker.exists()
    with pytest.raises(TreeFormatError, match="not a fedmtl state file"):
        decode(b"PK\x03\x04 a zip")
    data = encode(STATE)
    with pytest.raises(TreeFormatError, match="truncated"):
        decode(data[: len(data) - 10])
    bumped = data[: len(treefile.MAGIC)] + (2).to_bytes(4, "little") + data[len(treefile.MAGIC) + 4 :]
    with pytest.raises(TreeFormatError, match="format version 2; this fedmtl reads version 1"):
        decode(bumped)


def test_object_arrays_are_neither_written_nor_read():
    with pytest.raises(TreeFormatError, match="dtype object"):
        encode({"x": np.array([{}, 1], dtype=object)})
    forged = encode({"x": np.zeros(2)}).replace(b'"<f8"', b'"|O8"')
    with pytest.raises(TreeFormatError, match="not allowed"):
        decode(forged)


def test_values_that_are_not_data_are_refused_with_where_they_are():
    with pytest.raises(TreeFormatError, match=r"value at '/model/opt' has type function"):
        encode({"model": {"opt": lambda: 0}})


def test_deep_or_malformed_skeletons_are_one_error():
    deep = b'{"tree":' + b'{"l":[' * 100_000 + b"]}" * 100_000 + b',"arrays":[]}'
    data = treefile.MAGIC + treefile._HEAD.pack(1, len(deep)) + deep
    with pytest.raises(TreeFormatError):
        decode(data)
    bad = b'{"tree":{"a":5},"arrays":[]}'
    with pytest.raises(TreeFormatError, match="bad array reference"):
        decode(treefile.MAGIC + treefile._HEAD.pack(1, len(bad)) + bad)
