"""Datasets and models plugged in from user code (``register_dataset``, ``register_model``): the
README's example runs as written, and mistakes in a plug-in are one-line errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from torch import nn

import fedmtl
from fedmtl.data import ClientSplits, DataConfig, Pooled, load_federated, register_dataset
from fedmtl.data.datasets import REGISTRY
from fedmtl.errors import ConfigError, DataError
from fedmtl.models import register_model
from fedmtl.models.registry import _MODELS

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_data_and_model.py"


@pytest.fixture
def registries():
    """Whatever a test registers is gone after it."""
    datasets, models = dict(REGISTRY), dict(_MODELS)
    yield
    REGISTRY.clear()
    REGISTRY.update(datasets)
    _MODELS.clear()
    _MODELS.update(models)


def _example():
    spec = importlib.util.spec_from_file_location("custom_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_example_runs_and_personalises(tmp_path, registries):
    res = _example().main(tmp_path)
    assert res.summary["data"]["clients"] == 8 and res.summary["dataset"] == "sensor_sites"
    assert res.final["accuracy_mean"] > 0.8
    resumed = fedmtl.resume(res.run_dir)  # registered in this process, so the run reloads
    assert resumed.final == res.final


def test_a_pooled_reader_is_partitioned_and_client_splits_are_kept(registries):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(600, 5)), rng.integers(0, 3, 600)
    register_dataset("pool", lambda cfg: Pooled(x, y), kind="pooled")
    data = load_federated(DataConfig.model_validate({"dataset": "pool", "partition": {"num_clients": 6}}), 0)
    assert data.num_clients == 6 and data.info["partition"] == "dirichlet"
    assert sum(c.n_train + c.n_test for c in data.clients) + len(data.y_global_test) == 600

    splits = ClientSplits(
        ["a", "b"], [x[:10], x[10:30]], [y[:10], y[10:30]], [x[30:33], x[33:40]], [y[30:33], y[33:40]]
    )
    register_dataset("given", lambda cfg: splits)
    data = load_federated(DataConfig(dataset="given"), 0)
    assert [(c.n_train, c.n_test) for c in data.clients] == [(10, 3), (20, 7)]


def test_plug_in_mistakes_are_one_line_errors(tmp_path, registries):
    register_dataset("broken", lambda cfg: {"x": 1})
    with pytest.raises(DataError) as exc:
        load_federated(DataConfig(dataset="broken"), 0)
    assert str(exc.value) == (
        "dataset 'broken': its registered reader returned dict; expected fedmtl.data.Pooled, Clients "
        "or ClientSplits"
    )
    with pytest.raises(ValueError, match="dataset 'broken' is already registered; pass replace=True"):
        register_dataset("broken", lambda cfg: None)

    @register_model("headless")
    def headless(p, inp):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, inp.num_outputs))

    with pytest.raises(ConfigError) as exc:
        fedmtl.run({"model": {"name": "headless"}, "output": {"progress": False}}, out=tmp_path / "r")
    assert str(exc.value) == (
        "config: model.name = 'headless': its builder must return an nn.Module with a submodule named "
        "'head' (the personal part; every other parameter is the shared body)"
    )
    with pytest.raises(ConfigError) as exc:
        fedmtl.run({"model": {"name": "headless", "width": 3}}, out=tmp_path / "s")
    assert str(exc.value) == "config: unknown key 'model.width'"  # it declared no keys
    assert not (tmp_path / "r").exists()
