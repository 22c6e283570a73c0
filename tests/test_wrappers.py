"""Algorithm wrappers: how selection, attacks, privacy and secure aggregation reach every algorithm."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import fedmtl
from fedmtl.algorithms import Algorithm
from fedmtl.algorithms.fedavg import FedAvg
from fedmtl.algorithms.wrapper import AlgorithmWrapper
from fedmtl.config import parse_config
from fedmtl.experiment.run import build, resume
from fedmtl.features import FEATURES, Feature
from fedmtl.training.work import local_work
from tests.conftest import digits_config


class StopAtRound(AlgorithmWrapper):
    """Stops before round 3, as a privacy budget would."""

    def stop_reason(self, server: dict[str, Any], round: int) -> str | None:
        return "budget spent" if round >= 3 else None


class HalveUpdates(AlgorithmWrapper):
    """Sends half of each parameter: changes client_step, so batched execution must not skip it."""

    def client_step(self, state, data, msg, work):
        state, reply = yield from local_work(self.inner.client_step(state, data, msg, work))
        reply.arrays = {k: v * 0.5 for k, v in reply.arrays.items()}
        return state, reply


def _use(monkeypatch: pytest.MonkeyPatch, cls: type[AlgorithmWrapper]) -> None:
    wrap = {"StopAtRound": StopAtRound_wrap, "HalveUpdates": HalveUpdates_wrap}[cls.__name__]
    monkeypatch.setattr("fedmtl.features.FEATURES", [*FEATURES, Feature(None, wrap)])


def StopAtRound_wrap(algo: Algorithm, cfg: Any, data: Any) -> Algorithm:  # noqa: N802
    return StopAtRound(algo)


def HalveUpdates_wrap(algo: Algorithm, cfg: Any, data: Any) -> Algorithm:  # noqa: N802
    return HalveUpdates(algo)


def test_with_every_feature_off_the_algorithm_is_not_wrapped():
    _, algo, _ = build(parse_config(digits_config()))
    assert type(algo) is FedAvg


def test_a_stop_reason_ends_the_run_cleanly_and_resume_keeps_it(tmp_path, monkeypatch, caplog):
    _use(monkeypatch, StopAtRound)
    res = fedmtl.run(digits_config(train__rounds=5), out=tmp_path / "r")
    assert res.summary["stopped"] == "budget spent"
    assert res.summary["rounds_completed"] == 2 and res.summary["complete"]
    assert "stopped before round 3: budget spent" in caplog.text  # a warning of the fedmtl logger
    again = resume(tmp_path / "r")
    assert again.summary == res.summary


def test_a_wrapper_changes_what_clients_send_under_both_executors(tmp_path, monkeypatch):
    """A wrapper writes its client step once (``yield from`` around the inner one): batched
    execution runs it as it is, with the numbers sequential execution gives."""
    plain = fedmtl.run(digits_config(train__rounds=2), out=tmp_path / "plain")
    _use(monkeypatch, HalveUpdates)
    cfg = parse_config(digits_config(train__rounds=2, runtime__execution="auto"))
    _, algo, sim = build(cfg)
    assert isinstance(algo, HalveUpdates) and algo.name == "fedavg"
    assert sim.execution == "batched"
    halved = fedmtl.run(digits_config(train__rounds=2), out=tmp_path / "halved")
    batched = fedmtl.run(digits_config(train__rounds=2, runtime__execution="batched"), out=tmp_path / "b")
    a, b = plain.summary["final"]["accuracy_mean"], halved.summary["final"]["accuracy_mean"]
    assert not np.isclose(a, b)
    assert batched.summary["final"]["global_loss"] == pytest.approx(
        halved.summary["final"]["global_loss"], rel=1e-5
    )


def test_a_wrapper_reaches_the_inner_algorithms_own_attributes():
    _, algo, _ = build(
        parse_config(
            digits_config(algorithm={"name": "mocha"}, model={"name": "linear"}, data__tasks=["parity"])
        )
    )
    wrapped = StopAtRound(StopAtRound(algo))
    assert wrapped.unwrapped() is algo
    assert wrapped._omega_due == algo._omega_due  # a MOCHA-only method, through two wrappers
    assert wrapped.has_global_model is algo.has_global_model is False
