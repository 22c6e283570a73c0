"""Config validation: unknown keys and bad values fail with one documented line."""

from __future__ import annotations

import pytest

from fedmtl.algorithms import algorithm_names
from fedmtl.config import apply_overrides, load_config, parse_config
from fedmtl.errors import ConfigError
from fedmtl.models import model_names


def test_the_registries_hold_every_method_and_model():
    assert {"fedavg", "fedprox", "local", "mocha", "fedbone", "fdrmfl"} <= set(algorithm_names())
    assert {"cnn", "linear", "mlp", "fedbone_net"} <= set(model_names())
    assert algorithm_names() == sorted(algorithm_names()) and model_names() == sorted(model_names())


def test_defaults_are_valid_and_resolved():
    cfg = parse_config({})
    assert cfg.algorithm.name == "fedavg"
    assert cfg.to_dict()["algorithm"]["server_optimizer"]["name"] == "sgd"
    assert cfg.to_dict()["model"]["hidden"] == [200]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"trian": {}},
            "config: unknown key 'trian'; allowed keys: aggregation, algorithm, attack, clients, data, "
            "eval, model, name, output, privacy, runtime, secagg, seed, selection, train",
        ),
        (
            {"data": {"partition": {"alpah": 1}}},
            "config: unknown key 'data.partition.alpah'; allowed keys: "
            "alpha, classes_per_client, jitter, kind, min_samples, num_clients, samples, sigma",
        ),
        (
            {"data": {"partition": {"kind": "resample", "samples": [30, 20]}}},
            "config: data.partition = {'kind': 'resample', 'samples': [30, 20]}: samples = [30, 20]: "
            "needs 2 <= low <= high",
        ),
        ({"train": {"lr": -1}}, "config: train.lr = -1: input should be greater than 0"),
        (
            {"train": {"optimizer": "rmsprop"}},
            "config: train.optimizer = 'rmsprop': input should be 'sgd' or 'adam'",
        ),
        (
            {"algorithm": {"name": "fedfoo"}},
            "config: algorithm.name = 'fedfoo': unknown algorithm; allowed: " + ", ".join(algorithm_names()),
        ),
        (
            {"algorithm": {"name": "fedprox", "mu": -0.1}},
            "config: algorithm.mu = -0.1: input should be greater than or equal to 0",
        ),
        (
            {"algorithm": {"name": "fedavg", "mu": 0.1}},
            "config: unknown key 'algorithm.mu'; allowed keys: server_optimizer",
        ),
        ({"model": {"name": "mlp", "hiddn": [3]}}, "config: unknown key 'model.hiddn'; allowed keys: hidden"),
        (
            {"model": {"name": "resnet"}},
            "config: model.name = 'resnet': unknown model; allowed: " + ", ".join(model_names()),
        ),
        (
            {"runtime": {"work_fraction": [0.5, 0.2]}},
            "config: runtime.work_fraction = [0.5, 0.2]: must be [low, high] with 0 < low <= high <= 1",
        ),
        ([1, 2], "config: expected a mapping at the top level, got list"),
    ],
)
def test_bad_config_messages(raw, message):
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert str(err.value) == message


def test_overrides_parse_yaml_values():
    raw = apply_overrides({}, ["train.lr=0.5", "data.partition.kind=iid", "runtime.work_fraction=[0.5, 1.0]"])
    cfg = parse_config(raw)
    assert cfg.train.lr == 0.5
    assert cfg.data.partition.kind == "iid"
    assert cfg.runtime.work_fraction == (0.5, 1.0)


def test_override_errors():
    with pytest.raises(ConfigError, match="--set: expected key=value, got 'train.lr'"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="--set: 'lr' in 'train.lr.x' is not a section"):
        apply_overrides({"train": {"lr": 1}}, ["train.lr.x=2"])


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1,\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d"):
        load_config(bad)


@pytest.mark.parametrize(
    "algorithm, why",
    [
        ({"name": "local"}, "clients never send an update"),
        ({"name": "mocha"}, "Sigma Delta B / lambda"),
        ({"name": "fedbone"}, "gradients inside their own exchanges"),
    ],
)
def test_an_aggregation_chain_an_algorithm_cannot_use_is_a_config_error(algorithm, why):
    """A silently ignored ``aggregation:`` list would report results of a defence that never ran."""
    from fedmtl.errors import ConfigError
    from fedmtl.experiment.run import build

    raw = {"algorithm": algorithm, "aggregation": ["median"], "data": {"dataset": "digits"}}
    if algorithm["name"] == "mocha":
        raw.update(model={"name": "linear"}, data={"dataset": "digits", "tasks": ["parity"]})
    if algorithm["name"] == "fedbone":
        raw.update(model={"name": "fedbone_net", "width": 16, "depth": 1})
    name = algorithm["name"]
    with pytest.raises(
        ConfigError, match=rf"aggregation: algorithm '{name}' cannot use an aggregation chain \(.*{why}"
    ):
        build(parse_config(raw))


def test_fdrmfls_retention_blend_takes_the_rounds_chain():
    """FDRMFL's server blends the round's mean with its previous model: the mean may be robust."""
    from fedmtl.experiment.run import build

    raw = {"algorithm": {"name": "fdrmfl"}, "aggregation": ["median"], "data": {"dataset": "diabetes_mm"}}
    _, _, sim = build(parse_config(raw))
    assert [s.name for s in sim.runner.reducer.chain.steps] == ["median"]
