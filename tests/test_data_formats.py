"""The low-level readers: real shared files parse to their documented shapes, broken ones fail clearly."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from fedmtl.data import resolve_data_dir
from fedmtl.data.formats import read_idx_gz, read_leaf_json, read_mat_tasks
from fedmtl.errors import DataError


@pytest.fixture(scope="module")
def data_dir() -> Path:
    root = resolve_data_dir(None)
    if root is None:
        pytest.skip("shared data folder (../shared/data) not present")
    return root


def _fails(fn: Callable[[Path], object], path: Path, problem: str) -> None:
    with pytest.raises(DataError) as info:
        fn(path)
    assert str(info.value) == f"data file {path}: {problem}"


def _cells(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty((1, len(arrays)), dtype=object)
    for i, a in enumerate(arrays):
        out[0, i] = a
    return out


# ------------------------------------------------------------------------------ real files


def test_landmine(data_dir: Path) -> None:
    xs, ys = read_mat_tasks(data_dir / "landmine" / "LandmineData.mat")
    assert len(xs) == len(ys) == 29
    assert sum(len(x) for x in xs) == 14820
    assert {x.shape[1] for x in xs} == {9}
    assert int(sum((y == 1).sum() for y in ys)) == 904
    assert all(x.dtype == np.float64 and y.ndim == 1 for x, y in zip(xs, ys, strict=True))
    assert min(len(x) for x in xs) == 445 and max(len(x) for x in xs) == 690


def test_landmine_small(data_dir: Path) -> None:
    xs, ys = read_mat_tasks(data_dir / "mocha" / "landmine_small.mat")
    assert len(xs) == 29 and sum(len(x) for x in xs) == 1464
    assert int(sum((y == 1).sum() for y in ys)) == 89
    assert set(np.unique(np.concatenate(ys)).tolist()) == {-1, 1}


def test_school(data_dir: Path) -> None:
    xs, ys = read_mat_tasks(data_dir / "mocha" / "school.mat")
    assert len(xs) == 139 and sum(len(x) for x in xs) == 15362
    assert {x.shape[1] for x in xs} == {28}
    y = np.concatenate(ys)
    assert y.min() >= 1 and y.max() <= 70


def test_vehicle(data_dir: Path) -> None:
    users = read_leaf_json(data_dir / "mocha" / "vehicle_train_subset.json.gz")
    assert len(users) == 23
    assert sum(len(x) for _, x, _ in users) == 1860
    assert {x.shape[1] for _, x, _ in users} == {100}
    assert set(np.unique(np.concatenate([y for _, _, y in users])).tolist()) == {-1, 1}
    assert all(y.ndim == 1 for _, _, y in users)


def test_mnist(data_dir: Path) -> None:
    mnist = data_dir / "mnist"
    images = read_idx_gz(mnist / "train-images-idx3-ubyte.gz")
    labels = read_idx_gz(mnist / "train-labels-idx1-ubyte.gz")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,) and set(np.unique(labels).tolist()) == set(range(10))
    assert read_idx_gz(mnist / "t10k-images-idx3-ubyte.gz").shape == (10000, 28, 28)
    assert read_idx_gz(mnist / "t10k-labels-idx1-ubyte.gz").shape == (10000,)
    assert not images.flags.writeable  # shared through the cache
    assert read_idx_gz(mnist / "train-labels-idx1-ubyte.gz") is labels


# ------------------------------------------------------------------------------ broken files


def test_truncated_gzip(data_dir: Path, tmp_path: Path) -> None:
    raw = (data_dir / "mnist" / "train-labels-idx1-ubyte.gz").read_bytes()
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    _fails(read_idx_gz, bad, "truncated gzip stream")


def test_idx_bad_magic_and_size(tmp_path: Path) -> None:
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(bytes(16)))
    _fails(read_idx_gz, bad, "bad magic number 0x00000000, expected 0x00000803 (idx3 ubyte)")
    short = tmp_path / "t10k-images-idx3-ubyte.gz"
    header = bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    short.write_bytes(gzip.compress(header + bytes(100)))
    _fails(read_idx_gz, short, "header says 10x28x28 = 7840 bytes of data but 100 follow")
    plain = tmp_path / "labels-idx1-ubyte.gz"
    plain.write_bytes(b"not gzip")
    with pytest.raises(DataError, match="corrupt gzip stream"):
        read_idx_gz(plain)


def test_idx_small_valid(tmp_path: Path) -> None:
    path = tmp_path / "tiny-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes([7, 8, 9])))
    assert read_idx_gz(path).tolist() == [7, 8, 9]


def test_mat_row_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "rows.mat"
    x = _cells([np.ones((5, 3)), np.ones((10, 3))])
    y = _cells([np.ones((5, 1)), np.ones((9, 1))])
    scipy.io.savemat(path, {"X": x, "Y": y})
    _fails(read_mat_tasks, path, "task 1 has 10 rows in X but 9 in Y")


def test_mat_without_cells(tmp_path: Path) -> None:
    path = tmp_path / "nocells.mat"
    scipy.io.savemat(path, {"A": np.ones((3, 3))})
    _fails(read_mat_tasks, path, "expected cell arrays 'X'/'Y' or 'feature'/'label'")
    plain = tmp_path / "plain.mat"
    scipy.io.savemat(plain, {"X": np.ones((3, 3)), "Y": np.ones(3)})
    _fails(read_mat_tasks, plain, "'X' is not a cell array")


def test_mat_feature_width_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "width.mat"
    x = _cells([np.ones((4, 3)), np.ones((4, 2))])
    y = _cells([np.zeros((4, 1)), np.zeros((4, 1))])
    scipy.io.savemat(path, {"feature": x, "label": y})
    _fails(read_mat_tasks, path, "task 1 has 2 features but task 0 has 3")


def test_malformed_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"users" 1}')
    _fails(read_leaf_json, path, "malformed JSON at line 1 column 10")


def test_leaf_num_samples_disagree(tmp_path: Path) -> None:
    path = tmp_path / "leaf.json"
    doc = {"users": ["a"], "num_samples": [3], "user_data": {"a": {"x": [[1, 2], [3, 4]], "y": [0, 1]}}}
    path.write_text(json.dumps(doc))
    _fails(read_leaf_json, path, "user 'a': num_samples says 3 but x has 2 and y 2")
    doc = {"users": ["a"], "user_data": {}}
    path.write_text(json.dumps(doc))
    _fails(read_leaf_json, path, "missing key 'num_samples'")


def test_leaf_text_is_encoded(tmp_path: Path) -> None:
    path = tmp_path / "shakespeare.json.gz"
    doc = {
        "users": ["a", "b"],
        "num_samples": [2, 1],
        "user_data": {"a": {"x": ["ab", "h\u4e2d"], "y": ["c", "d"]}, "b": {"x": ["xyz"], "y": ["q"]}},
    }
    path.write_bytes(gzip.compress(json.dumps(doc).encode()))
    users = read_leaf_json(path)
    assert [u for u, _, _ in users] == ["a", "b"]
    assert users[0][1].tolist() == [[97, 98, 0], [104, 255, 0]]  # padded to the longest string; clipped
    assert users[0][2].tolist() == [99, 100] and users[1][2].tolist() == [113]


def test_missing_file(tmp_path: Path) -> None:
    for fn, name in ((read_idx_gz, "x-idx1-ubyte.gz"), (read_mat_tasks, "x.mat"), (read_leaf_json, "x.json")):
        _fails(fn, tmp_path / name, "file not found")
