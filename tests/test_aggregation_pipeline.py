"""The aggregation chain: robust reducers tolerate their advertised number of arbitrary updates,
multi-task heads stay within their task, bad replies are rejected with a logged reason, and the
config gives one-line errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import fedmtl
from fedmtl.aggregation.pipeline import build_pipeline
from fedmtl.algorithms import Algorithm
from fedmtl.algorithms.base import Message
from fedmtl.algorithms.wrapper import AlgorithmWrapper
from fedmtl.config import parse_config
from fedmtl.errors import ConfigError
from fedmtl.experiment.run import build
from fedmtl.features import FEATURES, Feature
from fedmtl.runtime.round import server_step
from fedmtl.training.work import local_work
from tests.conftest import digits_config

REF = {"body.w": np.zeros((20, 30), np.float32), "head.b": np.zeros(5, np.float32)}


def _chain(steps: list[Any]):
    return build_pipeline(parse_config({"aggregation": steps}).aggregation)


def _honest(n: int, rng: np.random.Generator, center: float = 1.0) -> list[dict[str, np.ndarray]]:
    return [
        {k: (center + 0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in REF.items()}
        for _ in range(n)
    ]


def _bad(kind: str) -> dict[str, np.ndarray]:
    value = {"huge": 1e12, "nan": np.nan, "inf": np.inf, "neg": -1e12}[kind]
    return {k: np.full(v.shape, value, np.float32) for k, v in REF.items()}


def _run(chain, models: list[dict[str, np.ndarray]], weights: list[float] | None = None):
    ups = dict(enumerate(models))
    w = dict(enumerate(weights or [1.0] * len(models)))
    return chain.run(REF, ups, w, seed=0, round=1)


# (steps, n, tolerated f): each rule's advertised breakdown point
ROBUST = [
    (["median"], 9, 4),
    ([{"name": "trimmed_mean", "trim": 0.2}], 10, 2),
    ([{"name": "krum", "f": 3}], 10, 3),
    ([{"name": "multi_krum", "f": 3}], 10, 3),
]


@pytest.mark.parametrize("steps,n,f", ROBUST, ids=lambda v: str(v))
@pytest.mark.parametrize("kind", ["huge", "nan", "inf", "neg"])
def test_robust_reducers_tolerate_their_advertised_number_of_arbitrary_updates(steps, n, f, kind):
    rng = np.random.default_rng(1)
    models = _honest(n - f, rng) + [_bad(kind) for _ in range(f)]
    res = _run(_chain(steps), models, weights=[10.0] * n)
    for k in REF:
        assert np.isfinite(res.params[k]).all()
        assert np.abs(res.params[k] - 1.0).max() < 0.05, (k, float(np.abs(res.params[k] - 1.0).max()))


def test_the_mean_is_not_robust_and_a_non_finite_aggregate_never_reaches_the_model():
    rng = np.random.default_rng(1)
    res = _run(_chain(["mean"]), _honest(9, rng) + [_bad("huge")])
    assert np.abs(res.params["body.w"] - 1.0).max() > 1e10  # one huge update wrecks the mean
    res = _run(_chain(["mean"]), _honest(9, rng) + [_bad("nan")])
    assert res.params == {} and res.info["non_finite_keys"] == ["body.w", "head.b"]


def test_krum_selects_an_honest_update_and_reports_which():
    rng = np.random.default_rng(2)
    res = _run(_chain([{"name": "krum", "f": 2}]), _honest(7, rng) + [_bad("huge"), _bad("nan")])
    assert len(res.info["krum_selected"]) == 1 and res.info["krum_selected"][0] < 7


def test_a_mean_chain_equals_the_default_weighted_mean_to_float_precision():
    rng = np.random.default_rng(3)
    models = _honest(6, rng)
    weights = [3.0, 1.0, 7.0, 2.0, 5.0, 1.0]
    res = _run(_chain(["mean"]), models, weights)
    from fedmtl.aggregation import weighted_mean

    want = weighted_mean(models, weights)
    for k in REF:
        np.testing.assert_allclose(res.params[k], want[k], rtol=1e-6, atol=1e-7)


def test_clip_bounds_every_update_and_the_adaptive_bound_tracks_the_quantile():
    chain = _chain([{"name": "clip", "max_norm": 0.5, "adaptive": True, "target_quantile": 0.5, "lr": 0.5}])
    rng = np.random.default_rng(4)
    models = [
        {k: (s * np.ones(v.shape)).astype(np.float32) for k, v in REF.items()} for s in rng.uniform(0, 2, 10)
    ]
    state = None
    bounds = []
    for r in range(1, 40):
        res = chain.run(
            REF, dict(enumerate(models)), dict.fromkeys(range(10), 1.0), seed=0, round=r, state=state
        )
        state = res.state
        bounds.append(res.info["clip_norm"])
        delta = np.sqrt(sum(float(np.square(res.params[k].astype(np.float64)).sum()) for k in REF))
        assert delta <= bounds[-1] * (1 + 1e-5)  # the mean of clipped updates is within the bound
    norms = np.sort(
        [np.sqrt(sum(float(np.square(m[k].astype(np.float64)).sum()) for k in REF)) for m in models]
    )
    assert norms[3] <= bounds[-1] <= norms[6]  # close to the median norm, from a start far below


def test_multi_task_heads_are_reduced_only_over_their_tasks_clients():
    ref = {
        "body.w": np.zeros(4, np.float32),
        "a:head.w": np.zeros(2, np.float32),
        "b:head.w": np.zeros(3, np.float32),
    }
    ups = {
        0: {"body.w": np.full(4, 1.0, np.float32), "a:head.w": np.full(2, 1.0, np.float32)},
        1: {"body.w": np.full(4, 2.0, np.float32), "a:head.w": np.full(2, 2.0, np.float32)},
        2: {"body.w": np.full(4, 3.0, np.float32), "a:head.w": np.full(2, 9.0, np.float32)},
        3: {"body.w": np.full(4, 4.0, np.float32), "b:head.w": np.full(3, 5.0, np.float32)},
        4: {"body.w": np.full(4, 5.0, np.float32), "b:head.w": np.full(3, 7.0, np.float32)},
    }
    res = _chain(["median"]).run(ref, ups, dict.fromkeys(ups, 1.0), seed=0, round=1)
    assert res.params["body.w"].tolist() == [3.0] * 4
    assert res.params["a:head.w"].tolist() == [2.0] * 2  # median of 1, 2, 9 (task a only)
    assert res.params["b:head.w"].tolist() == [6.0] * 3  # median of 5, 7 (task b only)


@pytest.mark.parametrize(
    "algo", [{"name": "fedavg"}, {"name": "fedper"}, {"name": "hierarchical"}, {"name": "ditto"}]
)
def test_every_fedavg_family_algorithm_runs_a_robust_chain_on_a_multi_task_federation(tmp_path, algo):
    cfg = digits_config(
        algorithm=algo, data__tasks=["digit", "parity"], train__rounds=3, aggregation=["median"]
    )
    plain = fedmtl.run(
        digits_config(algorithm=algo, data__tasks=["digit", "parity"], train__rounds=3), out=tmp_path / "p"
    )
    res = fedmtl.run(cfg, out=tmp_path / "r")
    assert res.final["accuracy_mean"] > 0.3
    assert res.final["accuracy_mean"] != plain.final["accuracy_mean"]  # the chain really ran


def test_empty_chain_is_the_plain_weighted_mean_bit_for_bit(tmp_path):
    assert build_pipeline([]) is None
    a = fedmtl.run(digits_config(train__rounds=2), out=tmp_path / "a")
    b = fedmtl.run(digits_config(train__rounds=2, aggregation=[]), out=tmp_path / "b")
    assert a.final["global_loss"] == b.final["global_loss"]


class BadReplies(AlgorithmWrapper):
    """Client 0 sends a wrong shape, client 1 an extra key, client 2 a NaN, client 3 drops a key."""

    def client_step(self, state, data, msg, work):
        state, reply = yield from local_work(self.inner.client_step(state, data, msg, work))
        arrays = dict(reply.arrays)
        key = next(iter(arrays))
        if data.cid == 0:
            arrays[key] = np.zeros((3, 3), np.float32)
        elif data.cid == 1:
            arrays["evil.w"] = np.ones(2, np.float32)
        elif data.cid == 2:
            arrays[key] = np.full_like(arrays[key], np.nan)
        elif data.cid == 3:
            arrays.pop(key)
        return state, Message(arrays=arrays, scalars=reply.scalars)


def BadReplies_wrap(algo: Algorithm, cfg: Any, data: Any) -> Algorithm:  # noqa: N802
    return BadReplies(algo)


def test_wrong_shape_key_or_nan_replies_are_rejected_with_a_logged_reason(tmp_path, monkeypatch):
    monkeypatch.setattr("fedmtl.features.FEATURES", [*FEATURES, Feature(None, BadReplies_wrap)])
    cfg = digits_config(train__rounds=2, clients__per_round=8, runtime__execution="sequential")
    res = fedmtl.run(cfg, out=tmp_path / "r")
    row = res.rounds[0]
    # the round checks every reply in one place: one list, one reason each
    assert row["rejected_clients"] == [0, 1, 2, 3]
    assert row["rejected_reasons"] == {
        "0": "key 'body.1.weight' has shape (3, 3), expected (32, 64)",
        "1": "unexpected key 'evil.w'",
        "2": "non-finite values in 'body.1.weight'",
        "3": "missing key 'body.1.weight'",
    }
    assert np.isfinite(res.final["global_loss"])

    # never reaches the model: the server step on these replies equals the one on the good ones
    _, algo, _ = build(parse_config(digits_config()))
    server = algo.init_server()
    good = {
        c: Message(arrays={k: v + c for k, v in server["params"].items()}, scalars={"num_examples": 5})
        for c in (4, 5)
    }
    bad = {
        0: Message(
            arrays={**server["params"], "body.1.weight": np.zeros((3, 3), np.float32)},
            scalars={"num_examples": 5},
        ),
        1: Message(
            arrays={k: np.full_like(v, np.nan) for k, v in server["params"].items()},
            scalars={"num_examples": 5},
        ),
    }
    with_bad, facts = server_step(algo, server, {**good, **bad}, 1)
    only_good, _ = server_step(algo, server, good, 1)
    for k in server["params"]:
        assert np.array_equal(with_bad["params"][k], only_good["params"][k])
    assert facts["rejected_reasons"] == {
        "0": "key 'body.1.weight' has shape (3, 3), expected (32, 64)",
        "1": "non-finite values in 'body.1.weight'",
    }


@pytest.mark.parametrize(
    "steps,message",
    [
        (
            [{"name": "krun"}],
            "config: aggregation.0 = {'name': 'krun'}: unknown aggregation step 'krun'; allowed: clip, "
            "gaussian_noise, gradient_projection, krum, mean, median, multi_krum, retention, trimmed_mean",
        ),
        (
            [{"name": "clip", "max_nrm": 1}],
            "config: aggregation.0 = {'name': 'clip', 'max_nrm': 1}: unknown key 'max_nrm' for step 'clip'; "
            "allowed keys: adaptive, count_noise_std, expected_count, lr, max_norm, name, target_quantile",
        ),
        (
            [{"name": "trimmed_mean", "trim": 0.5}],
            "config: aggregation.0 = {'name': 'trimmed_mean', 'trim': 0.5}: step 'trimmed_mean': trim = 0.5: "
            "input should be less than 0.5",
        ),
        (
            ["median", "krum"],
            "config: aggregation = ['median', 'krum']: at most one reduce step (median, krum given)",
        ),
        (
            [{"name": "gaussian_noise", "noise_multiplier": 1.0}],
            "config: aggregation = [{'name': 'gaussian_noise', 'noise_multiplier': 1.0}]: "
            "gaussian_noise with noise_multiplier needs a clip step before it",
        ),
    ],
)
def test_config_errors_are_one_line(steps, message):
    with pytest.raises(ConfigError) as exc:
        parse_config({"aggregation": steps})
    assert str(exc.value) == message


def test_a_step_written_outside_the_package_is_one_file(tmp_path):
    """``register_step(name, config=...)`` makes a new step and its keys known to the config."""
    from typing import ClassVar, Literal

    from fedmtl.aggregation import config as agg_config
    from fedmtl.aggregation import pipeline
    from fedmtl.aggregation.config import StepConfig
    from fedmtl.aggregation.pipeline import Batch, Step, register_step
    from fedmtl.aggregation.steps import weighted_update_mean

    class EqualMeanConfig(StepConfig):
        name: Literal["equal_mean"] = "equal_mean"
        stage: ClassVar[str] = "reduce"

    try:

        @register_step("equal_mean", config=EqualMeanConfig)
        class EqualMean(Step):
            stage = "reduce"

            def apply(self, batch: Batch, state: dict) -> dict:
                batch.aggregate = weighted_update_mean(batch, np.ones_like(batch.weights))
                return state

        mine = fedmtl.run(digits_config(train__rounds=2, aggregation=["equal_mean"]), out=tmp_path / "a")
        uniform = fedmtl.run(
            digits_config(train__rounds=2, aggregation=[{"name": "mean", "weighting": "uniform"}]),
            out=tmp_path / "b",
        )
        assert mine.final["global_loss"] == uniform.final["global_loss"]
        with pytest.raises(ConfigError, match="unknown key 'x' for step 'equal_mean'"):
            parse_config(digits_config(aggregation=[{"name": "equal_mean", "x": 1}]))
    finally:
        pipeline.STEPS.pop("equal_mean", None)
        agg_config.STEP_TYPES.pop("equal_mean", None)
