"""load_federated / list_datasets on the embedded and shared real datasets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedmtl.config import DataConfig
from fedmtl.data import FederatedData, list_datasets, load_federated, resolve_data_dir
from fedmtl.data.datasets import REGISTRY
from fedmtl.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def data_dir() -> Path:
    root = resolve_data_dir(None)
    if root is None:
        pytest.skip("shared data folder (../shared/data) not present")
    return root


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDMTL_DATA", raising=False)


def _cfg(
    dataset: str, kind: str = "natural", partition: dict[str, Any] | None = None, **kw: Any
) -> DataConfig:
    raw = {"dataset": dataset, "partition": {"kind": kind, **(partition or {})}, **kw}
    return DataConfig.model_validate(raw)


def _check_dtypes(data: FederatedData) -> None:
    for c in data.clients:
        assert c.x_train.dtype == c.x_test.dtype == np.float32
        assert c.x_train.shape[1:] == data.input_shape
        assert len(c.x_train) == len(c.y_train) and len(c.x_test) == len(c.y_test)
        want = np.int64 if data.task.is_classification else np.float32
        assert c.y_train.dtype == c.y_test.dtype == want and c.y_train.ndim == 1
        assert c.task == data.task
    assert data.x_global_test is not None and data.y_global_test is not None
    assert data.x_global_test.dtype == np.float32


def test_digits_dirichlet() -> None:
    data = load_federated(_cfg("digits", "dirichlet", partition={"num_clients": 8}), seed=0)
    _check_dtypes(data)
    assert data.num_clients == 8 and data.input_shape == (1, 8, 8)
    assert data.task.kind == "classification" and data.task.num_outputs == 10
    assert data.source == "embedded (scikit-learn)"
    s = data.summary()
    assert s["global_test_samples"] == round(1797 * 0.2)
    assert s["train_samples"] + s["test_samples"] + s["global_test_samples"] == 1797
    assert min(c.n_train + c.n_test for c in data.clients) >= 10
    x = np.concatenate([c.x_train for c in data.clients])  # per channel over the clients' rows
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1.0) < 1e-4
    assert np.bincount(data.y_global_test).min() >= 30  # stratified holdout keeps every class


def test_seeds() -> None:
    cfg = _cfg("digits", "dirichlet")
    a, b, c = load_federated(cfg, 1), load_federated(cfg, 1), load_federated(cfg, 2)
    for x, y in zip(a.clients, b.clients, strict=True):
        assert np.array_equal(x.x_train, y.x_train) and np.array_equal(x.y_test, y.y_test)
    assert np.array_equal(a.x_global_test, b.x_global_test)  # type: ignore[arg-type]
    assert [x.n_train for x in a.clients] != [x.n_train for x in c.clients]


def test_diabetes_regression() -> None:
    data = load_federated(_cfg("diabetes", "dirichlet", partition={"num_clients": 5}), seed=0)
    _check_dtypes(data)
    assert data.task.kind == "regression" and data.task.num_outputs == 1
    assert data.input_shape == (10,)
    y = np.concatenate([c.y_train for c in data.clients])
    assert abs(y.mean()) < 1e-5 and abs(y.std() - 1) < 1e-4
    assert 100 < data.task.target_mean < 200 and data.task.target_std > 10
    x = np.concatenate([c.x_train for c in data.clients])
    assert np.allclose(x.mean(axis=0), 0, atol=1e-5) and np.allclose(x.std(axis=0), 1, atol=1e-4)


def test_mnist_shards(data_dir: Path) -> None:
    data = load_federated(_cfg("mnist", "shards", partition={"num_clients": 20}), seed=0)
    _check_dtypes(data)
    assert data.num_clients == 20 and data.input_shape == (1, 28, 28)
    assert data.x_global_test.shape == (10000, 1, 28, 28)  # type: ignore[union-attr]
    s = data.summary()
    assert s["train_samples"] + s["test_samples"] == 60000
    for c in data.clients:
        assert len(np.unique(np.concatenate([c.y_train, c.y_test]))) == 2
    x = np.concatenate([c.x_train for c in data.clients])  # per channel over the clients' rows
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1.0) < 1e-3
    assert np.unique(x.reshape(len(x), -1)[:, 0]).size == 1  # a blank corner: one value, not spread
    assert data.source == str(data_dir / "mnist")


def test_landmine(data_dir: Path) -> None:
    data = load_federated(_cfg("landmine"), seed=0)
    _check_dtypes(data)
    assert data.num_clients == 29 and data.input_shape == (9,) and data.task.num_outputs == 2
    s = data.summary()
    assert s["train_samples"] + s["test_samples"] == 14820
    assert s["global_test_samples"] == s["test_samples"]  # natural: global test = clients' tests
    y = np.concatenate([np.concatenate([c.y_train, c.y_test]) for c in data.clients])
    assert int(y.sum()) == 904
    x = np.concatenate([c.x_train for c in data.clients])
    assert np.allclose(x.mean(axis=0), 0, atol=1e-4) and np.allclose(x.std(axis=0), 1, atol=1e-3)
    capped = load_federated(_cfg("landmine", max_clients=5), seed=0)
    assert capped.num_clients == 5 and capped.clients[4].name == data.clients[4].name == "task_004"


def test_landmine_small_labels(data_dir: Path) -> None:
    data = load_federated(_cfg("landmine_small"), seed=0)
    y = np.concatenate([np.concatenate([c.y_train, c.y_test]) for c in data.clients])
    assert set(np.unique(y).tolist()) == {0, 1} and int(y.sum()) == 89


def test_school(data_dir: Path) -> None:
    data = load_federated(_cfg("school"), seed=0)
    _check_dtypes(data)
    assert data.num_clients == 139 and data.input_shape == (28,)
    assert data.task.kind == "regression"
    assert data.summary()["train_samples"] + data.summary()["test_samples"] == 15362
    y = np.concatenate([c.y_train for c in data.clients])
    assert abs(y.mean()) < 1e-4 and abs(y.std() - 1) < 1e-3


def test_vehicle(data_dir: Path) -> None:
    data = load_federated(_cfg("vehicle"), seed=0)
    _check_dtypes(data)
    assert data.num_clients == 23 and data.input_shape == (100,)
    assert data.clients[0].name == "f_00000"
    y = np.concatenate([c.y_train for c in data.clients])
    assert set(np.unique(y).tolist()) == {0, 1}


def test_leaf_file(tmp_path: Path) -> None:
    doc = {
        "users": ["u1", "u2"],
        "num_samples": [4, 3],
        "user_data": {
            "u1": {"x": [[1, 2], [3, 4], [5, 6], [7, 8]], "y": [[-1], [1], [1], [-1]]},
            "u2": {"x": [[0, 1], [1, 0], [2, 2]], "y": [[1], [-1], [1]]},
        },
    }
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(doc))
    data = load_federated(_cfg("leaf", file=str(path)), seed=0)
    assert data.num_clients == 2 and data.task.num_outputs == 2 and data.input_shape == (2,)
    assert [c.name for c in data.clients] == ["u1", "u2"]
    with pytest.raises(ConfigError, match="data.file is required for dataset 'leaf'"):
        load_federated(_cfg("leaf"), seed=0)
    with pytest.raises(DataError, match="dataset 'leaf': file not found"):
        load_federated(_cfg("leaf", file=str(tmp_path / "nope.json")), seed=0)


def test_partition_kind_errors() -> None:
    with pytest.raises(ConfigError) as info:
        load_federated(_cfg("landmine", "dirichlet"), seed=0)
    assert str(info.value) == (
        "config: data.partition.kind = 'dirichlet': dataset 'landmine' has one task per client; use 'natural'"
    )
    with pytest.raises(ConfigError) as info:
        load_federated(_cfg("digits", "natural"), seed=0)
    assert str(info.value) == (
        "config: data.partition.kind = 'natural': dataset 'digits' has no natural clients; "
        "use one of iid, dirichlet, shards, quantity, target, covariate, resample"
    )
    with pytest.raises(ConfigError, match="data.dataset = 'nope': unknown dataset; available: digits"):
        load_federated(_cfg("nope"), seed=0)


def test_list_datasets(data_dir: Path, tmp_path: Path) -> None:
    rows = {r["name"]: r for r in list_datasets(None)}
    assert set(rows) == set(REGISTRY)
    assert rows["digits"]["location"] == "embedded (scikit-learn)" and rows["digits"]["samples"] == 1797
    assert rows["mnist"]["found"] and rows["mnist"]["samples"] == 70000 and rows["mnist"]["features"] == 784
    assert rows["school"]["tasks"] == 139 and rows["school"]["kind"] == "natural"
    assert rows["vehicle"]["location"] == str(data_dir / "mocha" / "vehicle_train_subset.json.gz")
    empty = {r["name"]: r for r in list_datasets(str(tmp_path))}
    assert (
        empty["mnist"]["location"]
        == f"missing: {tmp_path.resolve() / 'mnist' / 'train-images-idx3-ubyte.gz'}"
    )
    assert not empty["landmine"]["found"] and empty["digits"]["found"]


def test_env_dir_missing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMTL_DATA", str(tmp_path))
    with pytest.raises(DataError) as info:
        load_federated(_cfg("mnist", "iid"), seed=0)
    want = tmp_path.resolve() / "mnist" / "train-images-idx3-ubyte.gz"
    assert str(info.value) == (
        f"dataset 'mnist': file not found: {want} (set data.dir, --data-dir or FEDMTL_DATA)"
    )
    monkeypatch.setenv("FEDMTL_DATA", str(tmp_path / "absent"))
    with pytest.raises(DataError, match="from environment variable FEDMTL_DATA"):
        resolve_data_dir(None)
    with pytest.raises(DataError, match=r"absent2 \(from data.dir / --data-dir\) does not exist"):
        load_federated(_cfg("landmine", dir=str(tmp_path / "absent2")), seed=0)
    assert resolve_data_dir(str(tmp_path)) == tmp_path.resolve()  # explicit beats the environment


def test_file_only_for_leaf() -> None:
    with pytest.raises(
        ConfigError,
        match="data.file = 'x.json': only used by datasets 'leaf', 'store' and 'federation', not 'digits'",
    ):
        load_federated(_cfg("digits", "iid", file="x.json"), seed=0)
