"""LEAF data as users download it: ``train/`` and ``test/`` shards with LEAF's own per-user split,
images given a shape, text (Shakespeare's layout) as token ids for a recurrent model. The files are
written by ``tests/leaf_files.py`` from data on this machine, never downloaded."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.datasets import load_digits

import fedmtl
from fedmtl.data import DataConfig, load_federated
from fedmtl.errors import ConfigError, DataError
from tests.leaf_files import image_writers, text_roles


@pytest.fixture(scope="module")
def digit_writers(tmp_path_factory) -> Path:
    d = load_digits()
    return image_writers(tmp_path_factory.mktemp("leaf") / "digits", d.images / 16.0, d.target, writers=24)


@pytest.fixture(scope="module")
def roles(tmp_path_factory) -> Path:
    return text_roles(tmp_path_factory.mktemp("leaf") / "shakespeare", roles=6, samples=300)


def _leaf(path: Path, **data) -> dict:
    return {
        "data": {"dataset": "leaf", "file": str(path), **data},
        "output": {"progress": False},
    }


def _docs(root: Path, split: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / split).glob("*.json"))]


# ------------------------------------------------------------------------------------ loading
def test_a_leaf_directory_keeps_leafs_own_split_and_user_order(digit_writers):
    data = load_federated(DataConfig.model_validate(_leaf(digit_writers, normalize="none")["data"]), 0)
    train, test = _docs(digit_writers, "train"), _docs(digit_writers, "test")
    users = [u for doc in train for u in doc["users"]]
    assert [c.name for c in data.clients] == users  # shard order, then file order
    by_user = {u: n for doc in train for u, n in zip(doc["users"], doc["num_samples"], strict=True)}
    tests = {u: n for doc in test for u, n in zip(doc["users"], doc["num_samples"], strict=True)}
    assert [c.n_train for c in data.clients] == [by_user[u] for u in users]
    assert [c.n_test for c in data.clients] == [tests[u] for u in users]
    first = train[0]["user_data"][users[0]]
    assert np.allclose(data.clients[0].x_train.reshape(len(first["y"]), -1), first["x"], atol=1e-6)
    assert data.clients[0].y_train.tolist() == first["y"]
    assert data.info["partition"] == "natural" and data.info["test_fraction"] is None
    assert data.task.num_outputs == 10  # from the labels present


def test_input_shape_makes_leaf_images_images_and_says_how_they_are_scaled(digit_writers, tmp_path):
    cfg = _leaf(digit_writers, input_shape=[1, 8, 8])
    cfg.update(
        model={"name": "cnn", "channels": [8, 16], "fc": 32},
        train={"rounds": 8, "local_epochs": 2, "lr": 0.01, "optimizer": "adam"},
    )
    res = fedmtl.run(cfg, out=tmp_path / "r")
    assert res.summary["data"]["input_shape"] == [1, 8, 8]
    assert res.final["accuracy_mean"] > 0.3  # chance is 0.1
    ran = yaml.safe_load((res.run_dir / "config.yaml").read_text())
    assert ran["data"]["normalize"] == "channel"  # images: per channel, whatever their background
    assert ran["data"]["partition"]["kind"] == "natural"
    resumed = fedmtl.resume(res.run_dir)  # the resolved config reloads to the same run
    assert resumed.final["accuracy_mean"] == res.final["accuracy_mean"]


def test_vectors_are_standardised_by_default_and_that_is_recorded(digit_writers, tmp_path):
    res = fedmtl.run({**_leaf(digit_writers), "train": {"rounds": 1}}, out=tmp_path / "r")
    ran = yaml.safe_load((res.run_dir / "config.yaml").read_text())
    assert ran["data"]["normalize"] == "standardize"
    data = load_federated(DataConfig.model_validate(_leaf(digit_writers)["data"]), seed=0)
    x = np.concatenate([c.x_train for c in data.clients])
    assert np.allclose(x.mean(axis=0), 0, atol=1e-5)
    raw = load_federated(DataConfig.model_validate(_leaf(digit_writers, normalize="none")["data"]), 0)
    assert raw.clients[0].x_train.max() <= 1.0 and raw.info["normalize"] == "none"


def test_leaf_text_trains_a_recurrent_model_beyond_the_majority_character(roles, tmp_path):
    cfg = _leaf(roles)
    cfg.update(
        model={"name": "rnn", "cell": "gru", "embed": 8, "hidden": 64, "layers": 1},
        train={"rounds": 10, "local_epochs": 1, "batch_size": 16, "lr": 0.01, "optimizer": "adam"},
    )
    data = load_federated(DataConfig.model_validate(cfg["data"]), seed=0)
    assert data.input_shape == (80,) and data.vocab is not None
    assert data.task.num_outputs == len(data.vocab)
    first = _docs(roles, "train")[0]["user_data"]["THE_PLAY_ROLE0"]
    ids = data.clients[0].x_train[0].astype(int)
    assert "".join(data.vocab[i - 1] for i in ids) == first["x"][0]  # ids 1..V, 0 is padding
    assert data.vocab[int(data.clients[0].y_train[0])] == first["y"][0]
    y = np.concatenate([c.y_test for c in data.clients])
    majority = np.bincount(y).max() / len(y)
    res = fedmtl.run(cfg, out=tmp_path / "r")
    assert res.final["accuracy_mean"] > majority + 0.05
    assert yaml.safe_load((res.run_dir / "config.yaml").read_text())["data"]["normalize"] == "none"


def test_one_leaf_file_is_still_split_by_test_fraction(tmp_path):
    doc = {
        "users": ["a", "b"],
        "num_samples": [8, 4],
        "user_data": {
            "a": {"x": [[i, 1.0] for i in range(8)], "y": [0, 1] * 4},
            "b": {"x": [[1.0, i] for i in range(4)], "y": [1, 0, 1, 0]},
        },
    }
    path = tmp_path / "one.json.gz"
    path.write_bytes(gzip.compress(json.dumps(doc).encode()))
    data = load_federated(DataConfig(dataset="leaf", file=str(path), test_fraction=0.25), seed=0)
    assert [(c.n_train, c.n_test) for c in data.clients] == [(6, 2), (3, 1)]


def test_natural_datasets_need_no_partition_kind(shared_data):
    data = load_federated(DataConfig(dataset="landmine"), seed=0)
    assert data.num_clients == 29 and data.info["partition"] == "natural"
    assert DataConfig(dataset="digits").partition.kind == "dirichlet"


# ------------------------------------------------------------------------------------ errors
def _leaf_dir(root: Path, train: dict[str, int], test: dict[str, int]) -> Path:
    for split, users in (("train", train), ("test", test)):
        (root / split).mkdir(parents=True)
        doc = {
            "users": list(users),
            "num_samples": list(users.values()),
            "user_data": {u: {"x": [[0.5, 0.5]] * n, "y": [0] * n} for u, n in users.items()},
        }
        (root / split / f"{split}.json").write_text(json.dumps(doc))
    return root


def _load_error(path: Path, **data) -> str:
    with pytest.raises((DataError, ConfigError)) as exc:
        load_federated(DataConfig.model_validate(_leaf(path, **data)["data"]), seed=0)
    return str(exc.value)


def test_a_user_without_training_data_is_named(tmp_path):
    root = _leaf_dir(tmp_path / "d", {"a": 3}, {"a": 1, "ghost": 2})
    assert _load_error(root) == (
        f"data file {root / 'test' / 'test.json'}: user 'ghost' has test samples but no training data "
        "(in no file of train/)"
    )
    root = _leaf_dir(tmp_path / "e", {"a": 3, "b": 0}, {"a": 1, "b": 1})
    assert _load_error(root) == f"data file {root / 'train' / 'train.json'}: user 'b' has no training samples"
    root = _leaf_dir(tmp_path / "f", {"a": 3, "b": 2}, {"a": 1})
    assert _load_error(root) == (
        f"data file {root / 'train' / 'train.json'}: user 'b' has no test samples in test/ "
        "(LEAF's split gives every user both)"
    )


def test_layout_and_shape_errors(tmp_path, digit_writers):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _load_error(empty) == (
        f"dataset 'leaf': {empty} holds no train data: a LEAF data directory has train/ with JSON "
        "shards (or train.json); for one file of users give its path as data.file"
    )
    assert _load_error(digit_writers, input_shape=[1, 28, 28]) == (
        "config: data.input_shape = [1, 28, 28]: 784 values per sample, but dataset 'leaf' has 64"
    )
    assert _load_error(digit_writers, normalize="scale") == (
        "config: data.normalize = 'scale': divides images by their pixel maximum, and dataset 'leaf' "
        "has vector samples [64]; use 'standardize', 'none' or 'auto' (or data.input_shape for "
        "flattened images)"
    )
    dup = _leaf_dir(tmp_path / "dup", {"a": 2}, {"a": 1})
    (dup / "train" / "more.json").write_text((dup / "train" / "train.json").read_text())
    assert _load_error(dup) == (
        f"data file {dup / 'train' / 'train.json'}: user 'a' is also in {dup / 'train' / 'more.json'}; "
        "a user has one shard per split"
    )


def test_models_say_which_inputs_they_need(digit_writers, roles, tmp_path):
    with pytest.raises(ConfigError) as exc:
        fedmtl.run({**_leaf(digit_writers), "model": {"name": "cnn"}}, out=tmp_path / "a")
    assert str(exc.value) == (
        "config: model.name = 'cnn': needs image inputs (C, H, W), this dataset has (64,); for "
        "flattened images set data.input_shape (e.g. [1, 28, 28])"
    )
    with pytest.raises(ConfigError) as exc:
        fedmtl.run({**_leaf(digit_writers), "model": {"name": "rnn"}}, out=tmp_path / "b")
    assert str(exc.value) == (
        "config: model.name = 'rnn': needs token inputs (text such as LEAF Shakespeare), this "
        "dataset has numeric samples of shape (64,)"
    )
    with pytest.raises(ConfigError) as exc:
        load_federated(DataConfig.model_validate(_leaf(roles, normalize="standardize")["data"]), 0)
    assert str(exc.value) == (
        "config: data.normalize = 'standardize': dataset 'leaf' holds text as token ids; use 'none' or 'auto'"
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_reports_a_leaf_error_in_one_line(tmp_path):
    root = _leaf_dir(tmp_path / "d", {"a": 3}, {"a": 1, "ghost": 2})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_leaf(root)))
    out = subprocess.run(
        [sys.executable, "-m", "fedmtl.cli", "run", str(cfg), "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "user 'ghost'" in out.stderr
    assert not (tmp_path / "r").exists()


def test_fedmtl_datasets_states_what_normalize_does(capsys):
    from fedmtl.cli import main

    assert main(["datasets"]) == 0
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line}
    assert "channel" in lines["mnist"] and "channel" in lines["digits"]
    assert "standardize" in lines["landmine"]
    assert "scale" in lines["mnist_dense"]  # its derived targets are defined on [0, 1] pixels
    assert " ".join(lines["leaf"]).count("vectors standardize, images (data.input_shape) channel, text none")
    assert "channel: per-channel (x - mean) / std from the clients' federated mean and variance" in " ".join(
        lines["normalize:"]
    )


def test_a_federation_exported_as_leaf_reads_back_with_its_split(tmp_path, roles):
    from fedmtl.data.export import write_leaf

    raw = {"dataset": "digits", "partition": {"kind": "dirichlet", "num_clients": 6}}
    data = load_federated(DataConfig.model_validate(raw), seed=0)
    write_leaf(data, tmp_path / "leaf")
    back = load_federated(DataConfig(dataset="leaf", file=str(tmp_path / "leaf"), input_shape=[1, 8, 8]), 0)
    assert [c.name for c in back.clients] == [c.name for c in data.clients]
    for a, b in zip(data.clients, back.clients, strict=True):
        assert np.allclose(a.x_train, b.x_train, atol=1e-5) and np.array_equal(a.y_test, b.y_test)
    text = load_federated(DataConfig(dataset="leaf", file=str(roles)), 0)
    write_leaf(text, tmp_path / "text")
    again = load_federated(DataConfig(dataset="leaf", file=str(tmp_path / "text")), 0)
    assert again.vocab == text.vocab
    assert np.array_equal(again.clients[2].x_test, text.clients[2].x_test)
