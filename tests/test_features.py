"""Features compose with every algorithm whose math they fit, and refuse the others with a one-line
reason that names the math (``fedmtl.features``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import fedmtl
from fedmtl.config import parse_config
from fedmtl.errors import ConfigError
from fedmtl.experiment.run import build
from fedmtl.features import FEATURES
from tests.conftest import digits_config

DP_SAMPLE = {"enabled": True, "level": "sample", "noise_multiplier": 1.0, "clip_norm": 1.0}


def test_one_ordered_registry_innermost_first():
    assert [f.section for f in FEATURES] == ["selection", "attack", "privacy", "secagg"]


@pytest.mark.parametrize(
    "algorithm",
    [{"name": "fedrep", "head_epochs": 1.0}, {"name": "ditto"}, {"name": "apfl"}, {"name": "fedper"}],
)
def test_sample_dp_turns_every_declared_training_step_into_dp_sgd(tmp_path, algorithm):
    """DP-SGD rewrites the training requests of any algorithm that declares them, so personalised
    methods get sample-level DP too; the accountant counts every phase's steps."""
    cfg = digits_config(algorithm=algorithm, train__rounds=2, train__local_steps=None, privacy=DP_SAMPLE)
    res = fedmtl.run(cfg, out=tmp_path / "r")
    assert 0 < res.final["epsilon"] < float("inf")
    data, algo, _ = build(parse_config(cfg))
    c = data.clients[0]
    per_epoch = -(-c.n_train // 16)
    phases = {"fedrep": 1 + 1, "ditto": 2, "apfl": 1, "fedper": 1}[algorithm["name"]]
    assert algo.steps_per_round(c) == phases * per_epoch  # what the budget check plans with
    # and what a client really does in a round, every phase counted
    train = [r for r in fedmtl.experiment.records.RunDir(res.run_dir).read_metrics() if r["kind"] == "train"]
    assert {r["steps"] for r in train if r["client"] == 0} <= {phases * per_epoch}


def test_dp_sgd_changes_the_training_of_a_two_phase_method(tmp_path):
    plain = fedmtl.run(digits_config(algorithm={"name": "fedrep"}, train__rounds=1), out=tmp_path / "a")
    private = fedmtl.run(
        digits_config(algorithm={"name": "fedrep"}, train__rounds=1, privacy=DP_SAMPLE), out=tmp_path / "b"
    )
    assert not np.isclose(plain.final["accuracy_mean"], private.final["accuracy_mean"])


@pytest.mark.parametrize(
    "over, message",
    [
        (
            {"selection": {"enabled": True, "features": ["ce"]}, "privacy": DP_SAMPLE},
            "config: selection.enabled = True: sample-level DP accounts each step as sampling batch/n of a "
            "client's n records, but selection picks the records it trains on from the data itself; "
            "disable one of them",
        ),
        (
            {"algorithm": {"name": "local"}, "attack": {"enabled": True, "kind": "sign_flip"}},
            "config: attack.kind = 'sign_flip': poisons the model update a client sends, and algorithm "
            "'local' sends none (its replies are not new values of what it received)",
        ),
        (
            {"algorithm": {"name": "hierarchical"}, "secagg": {"enabled": True}},
            "config: secagg.enabled = True: algorithm 'hierarchical' needs more than the weighted mean of "
            "client updates, which is all secure aggregation reveals",
        ),
        (
            {
                "algorithm": {"name": "mocha"},
                "model": {"name": "linear"},
                "data__tasks": ["parity"],
                "privacy": DP_SAMPLE,
            },
            "config: privacy.level = 'sample': DP-SGD replaces the training steps an algorithm declares; "
            "algorithm 'mocha' trains with its own solver",
        ),
    ],
    ids=["selection+dp-sgd", "model-poisoning-local", "secagg-hierarchical", "dp-sgd-mocha"],
)
def test_incompatible_combinations_are_refused_naming_the_math(over: dict[str, Any], message: str):
    with pytest.raises(ConfigError) as exc:
        build(parse_config(digits_config(**over)))
    assert str(exc.value) == message


@pytest.mark.parametrize("name", ["apfl", "lg_fedavg", "fedbabu"])
def test_secure_aggregation_serves_every_method_that_averages_updates(name):
    """The new personalised methods need only the weighted mean of their updates: secagg fits."""
    from fedmtl.features.secagg import SecAggWrapper

    _, algo, sim = build(parse_config(digits_config(algorithm={"name": name}, secagg={"enabled": True})))
    assert isinstance(algo, SecAggWrapper)
    res = sim.run_round(1, algo.init_server(), {})
    assert res.info["secagg_status"] == "ok"


def test_client_dp_contributes_its_steps_to_the_rounds_chain_not_to_the_algorithm():
    """Client-level DP contributes its clip, mean and noise steps to the chain the round runs on
    every reduction; the algorithm's context holds no chain it could skip."""
    from fedmtl.aggregation.steps import Clip, GaussianNoise, Mean

    _, algo, sim = build(
        parse_config(digits_config(privacy={"enabled": True, "noise_multiplier": 1.0, "clip_norm": 1.0}))
    )
    steps = sim.runner.reducer.chain.steps
    assert [type(s) for s in steps] == [Clip, Mean, GaussianNoise]
    assert not hasattr(algo.unwrapped().ctx, "aggregator")
