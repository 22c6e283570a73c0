"""What differential privacy releases is what it accounts for, in every mode.

- adaptive clipping: centred clip bits over the expected count, updated every round (an empty one
  too), so the released bound carries nothing the accountant does not charge;
- fixed-size sampling with everyone in every round: replace-one, Gaussian(z / 2);
- what is accounted is pinned: DP-SGD divides by the expected batch, the population excludes
  held-out clients;
- under client-level DP nothing exact of one client leaves it: no train loss, step or sample
  count in its messages, no client metric in the run folder or the report;
- sample-level DP with a method that fine-tunes outside DP-SGD is refused."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dp_accounting import NeighboringRelation, dp_event
from dp_accounting.rdp import rdp_privacy_accountant

import fedmtl
from fedmtl.aggregation.pipeline import Pipeline
from fedmtl.aggregation.steps import CLIP_BIT
from fedmtl.config import parse_config
from fedmtl.data.federated import TaskSpec
from fedmtl.errors import ConfigError
from fedmtl.experiment.run import build
from fedmtl.features.privacy import PrivacyConfig, aggregation_steps
from fedmtl.privacy.accountant import epsilon
from fedmtl.training.dp_sgd import dp_local_train, poisson_batches
from fedmtl.training.local import LocalSpec
from fedmtl.training.optim import OptimizerSpec
from tests.conftest import digits_config

DP = {"enabled": True, "noise_multiplier": 1.0, "clip_norm": 0.5}


def _clip_state_after(bits: list[float], cfg: PrivacyConfig, expected: float | None, seed: int = 0) -> float:
    """The bound client DP's chain releases after one round whose clients report ``bits``."""
    steps = aggregation_steps(cfg, per_round=8, expected=expected)
    chain = Pipeline(steps)
    ref = {"w": np.zeros(3, np.float32)}
    updates = {c: {"w": np.full(3, 0.01, np.float32)} for c in range(len(bits))}
    res = chain.run(
        ref,
        updates,
        dict.fromkeys(updates, 1.0),
        seed=seed,
        round=1,
        scalars={c: {CLIP_BIT: b} for c, b in enumerate(bits)},
    )
    return float(res.state["0"]["bound"])


ADAPTIVE = PrivacyConfig(**DP, clipping="adaptive", count_noise_std=3.0)


def test_the_adaptive_bound_does_not_depend_on_how_many_clients_replied():
    # 2 clients both within the bound, or 4 of which 3 are: the same centred sum (+1), the same bound,
    # as the noised sum over the public expected count is all it may depend on; the fraction over
    # the clients that replied (1.0 against 0.75) would tell the two rounds apart
    for expected in (8.0, None):  # Poisson (expected count) and fixed-size (clients per round)
        two = _clip_state_after([1.0, 1.0], ADAPTIVE, expected)
        four = _clip_state_after([1.0, 1.0, 1.0, 0.0], ADAPTIVE, expected)
        assert two == four
    # and it moves as the centred estimate says: (sum + noise) / E + 1/2 against the target
    noise = np.random.default_rng([0, 11, 1]).normal(0.0, 3.0)  # the chain's stream, (seed, AGG, round)
    frac = (1.0 + noise) / 8.0 + 0.5
    assert two == pytest.approx(0.5 * math.exp(-0.2 * (frac - 0.5)))


def test_the_count_noise_has_the_std_the_accountant_charges():
    """The spread of the released bound over seeds is that of Gaussian noise of std count_noise_std
    on the centred count; without the noise (or with less) this fails."""
    logs = [np.log(_clip_state_after([1.0, 0.0, 1.0], ADAPTIVE, 8.0, seed=s) / 0.5) for s in range(400)]
    # log(bound / C) = -lr * ((S + noise) / E + 1/2 - q): its std is lr * sigma_b / E
    assert np.std(logs) == pytest.approx(0.2 * 3.0 / 8.0, rel=0.12)


def test_an_empty_round_moves_the_released_bound_like_any_other(tmp_path):
    cfg = digits_config(
        train__rounds=12,
        clients__per_round=1,
        data__partition={"kind": "iid", "num_clients": 8},
        privacy={**DP, "clipping": "adaptive"},
    )
    res = fedmtl.run(cfg, out=tmp_path / "r")
    bounds = [r["dp_clip"] for r in res.rounds]
    empty = [i for i, r in enumerate(res.rounds) if r["sampled"] == 0]
    assert empty, "a Poisson round with nobody in it (q = 1/8 over 12 rounds)"
    for i in empty:  # the bound before the empty round is never the one after it
        before = bounds[i - 1] if i else 0.5
        assert bounds[i] != before


def test_fixed_size_sampling_of_everyone_is_accounted_as_replace_one_with_half_the_noise(tmp_path):
    acc = rdp_privacy_accountant.RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(0.5), 3))
    want = acc.get_epsilon(1e-5)
    assert epsilon(1.0, 3, 1e-5, 8, 8, "without_replacement") == pytest.approx(want)
    assert want > 20  # 21.4, where add/remove Gaussian(z) reported 9.01
    cfg = digits_config(
        train__rounds=3,
        clients__per_round=8,
        clients__sampling="fixed",
        data__partition={"kind": "iid", "num_clients": 8},
        privacy=DP,
    )
    res = fedmtl.run(cfg, out=tmp_path / "r")
    assert res.final["epsilon"] == pytest.approx(want)
    assert "replace-one" in res.final["dp_accounting"]


def test_dp_sgd_divides_the_noisy_sum_by_the_expected_batch_not_the_drawn_one():
    """One DP-SGD step without noise on a linear model: the step is the clipped per-sample gradient
    sum over the expected batch (4 of 16 samples); over the drawn batch it would differ."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    rng = np.random.default_rng(5)
    x = rng.normal(size=(16, 3)).astype(np.float32)
    y = rng.integers(0, 2, size=16)
    spec = LocalSpec(optimizer=OptimizerSpec(lr=1.0), batch_size=4)
    task = TaskSpec("classification", 2)
    got, _, seen = dp_local_train(
        model, params, x, y, task, spec, 1, np.random.default_rng(1), 1e6, 0.0, np.random.default_rng(2)
    )
    (idx,) = poisson_batches(16, 4, 1, np.random.default_rng(1))
    assert seen == len(idx) != 4  # the drawn batch is not the expected one
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    out = torch.func.functional_call(model, leaves, (torch.as_tensor(x[idx]),))
    loss = torch.nn.functional.cross_entropy(out, torch.as_tensor(y[idx]), reduction="sum")
    grads = torch.autograd.grad(loss, list(leaves.values()))
    for (k, v), g in zip(params.items(), grads, strict=True):
        np.testing.assert_allclose(got[k], (v - g / 4).numpy(), rtol=1e-5, atol=1e-6)


def test_the_accountant_population_is_the_clients_that_train(tmp_path):
    cfg = digits_config(
        train__rounds=2,
        clients__per_round=3,
        data__partition={"kind": "iid", "num_clients": 10},
        data__holdout_clients=2,
        privacy=DP,
    )
    res = fedmtl.run(cfg, out=tmp_path / "r")
    assert res.final["epsilon"] == pytest.approx(epsilon(1.0, 2, 1e-5, 3, 8, "poisson"))
    assert res.final["epsilon"] != pytest.approx(epsilon(1.0, 2, 1e-5, 3, 10, "poisson"))


@pytest.mark.parametrize("name", ["fedavg_ft", "fedbabu"])
def test_sample_dp_with_a_method_that_fine_tunes_outside_dp_sgd_is_refused(name):
    cfg = digits_config(algorithm={"name": name}, privacy={**DP, "level": "sample"})
    with pytest.raises(ConfigError) as err:
        build(parse_config(cfg))
    assert str(err.value) == (
        f"config: privacy.level = 'sample': algorithm {name!r} fine-tunes on each client's training "
        "records before every evaluation, outside the DP-SGD steps the accountant counts, and releases "
        "the result; use an algorithm that does not (e.g. fedper, ditto)"
    )


def test_without_a_private_evaluation_no_client_metric_is_released(tmp_path):
    res = fedmtl.run(digits_config(train__rounds=2, privacy=DP), out=tmp_path / "r")
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in rows if r["kind"] == "client"]
    for r in res.rounds:
        assert r["dp_client_eval"] == "nothing (clients do not evaluate)"
        assert "accuracy_mean" not in r and "train_loss" not in r
        assert "global_accuracy" in r  # the server's own test set
    with pytest.raises(ConfigError, match="client_eval 'private' is DP-aggregated evaluation"):
        parse_config(digits_config(privacy={**DP, "client_eval": "private"}))


# --------------------------------------------------------------------- nothing exact leaves a client
def _exact_values(
    raw: dict[str, Any], monkeypatch: pytest.MonkeyPatch, out: Path
) -> tuple[set[float], set[float]]:
    """Every per-client float the clients of this run compute of themselves: (what their training
    reports, their evaluation metrics), from an instrumented in-process twin of the run."""
    import fedmtl.experiment.evaluate as evaluate
    from fedmtl.training.work import Trained

    train: set[float] = set()
    evaluated: set[float] = set()
    scalars = Trained.scalars

    def spy_scalars(self, data):  # noqa: ANN001, ANN202
        out = scalars(self, data)
        train.update(float(v) for v in out.values() if isinstance(v, float))
        return out

    rows_of = evaluate.evaluate_clients

    def spy_rows(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        rows = rows_of(*args, **kwargs)
        for row in rows:
            evaluated.update(float(v) for k, v in row.items() if isinstance(v, float) and k != "round")
        return rows

    with monkeypatch.context() as m:
        m.setattr(Trained, "scalars", spy_scalars)
        m.setattr(evaluate, "evaluate_clients", spy_rows)
        m.setattr("fedmtl.runtime.inprocess.evaluate_clients", spy_rows)
        fedmtl.run(raw, out=out)

    def own(values: set[float]) -> set[float]:  # not a fraction like 0.5, which may arise anywhere
        return {v for v in values if math.isfinite(v) and len(f"{v:.12g}".rstrip("0")) > 6}

    return own(train), own(evaluated)


def _floats(tree: Any) -> set[float]:
    if isinstance(tree, dict):
        return set().union(*map(_floats, tree.values())) if tree else set()
    if isinstance(tree, list | tuple):
        return set().union(*map(_floats, tree)) if tree else set()
    return {float(tree)} if isinstance(tree, float) else set()


@pytest.mark.parametrize(
    "privacy",
    [
        {**DP, "clipping": "adaptive", "eval_noise_multiplier": 2.0},
        {**DP, "noise_at": "client"},
    ],
    ids=["server-noise-private-evaluation", "client-noise"],
)
def test_nothing_exact_of_one_client_leaves_it_under_client_dp(tmp_path, flower, monkeypatch, privacy):
    raw = flower._cfg(
        data__partition__num_clients=4,
        clients__per_round=2,
        train__rounds=3,
        privacy=privacy,
    )
    train, evaluated = _exact_values(raw, monkeypatch, tmp_path / "twin")
    assert len(train) >= 4  # the clients did compute exact losses of their own
    exact = train | evaluated
    # the detector finds them where they are written: the twin run with exact client evaluation
    # (the simulation oracle) records each client's metrics
    oracle_raw = {**raw, "privacy": {**privacy, "eval_noise_multiplier": None, "client_eval": "exact"}}
    oracle_eval = _exact_values(oracle_raw, monkeypatch, tmp_path / "oracle-twin")[1]
    oracle = fedmtl.run(oracle_raw, out=tmp_path / "oracle")
    oracle_rows = [json.loads(line) for line in (oracle.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert _floats(oracle_rows) & oracle_eval

    grid = flower.LoopbackGrid(flower._nodes(4))
    sent: list[tuple[str, dict[str, Any]]] = []
    push = grid.push_messages

    def recording(messages):  # noqa: ANN001, ANN202
        messages = list(messages)
        ids = push(messages)
        for i in ids:
            if i in grid.replies:
                reply = grid.replies[i]
                content = reply.content
                sent.append((reply.metadata.message_type, _decoded(content)))
        return ids

    grid.push_messages = recording
    res = flower._flower_run(tmp_path, raw, grid)
    from fedmtl.experiment.report import write_report

    report = write_report([res.run_dir]).read_text()

    # the clients' messages: model arrays, the clip bit, and (for a private evaluation) the metrics
    # the server clips and noises before releasing their mean; no training loss, step or sample count
    assert sent
    for kind, content in sent:
        text = json.dumps(content)
        for name in ("train_loss", "steps", "samples", "num_examples", "personal_loss"):
            assert f'"{name}"' not in text, (kind, name)
        assert not (_floats(content) & train), kind
    # the run folder and the report: nothing exact of any client
    records = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in records if r["kind"] == "client"]
    assert not (_floats(records) & exact)
    assert not (_floats(json.loads((res.run_dir / "summary.json").read_text())) & exact)
    assert not [v for v in exact if f"{v:.4f}" in report]


def _decoded(content: Any) -> dict[str, Any]:
    """A Flower RecordDict as plain data: metrics and configs as they are, arrays as floats."""
    out: dict[str, Any] = {}
    for name, record in content.items():
        if hasattr(record, "to_numpy_ndarrays"):
            out[name] = [a.astype(float).ravel().tolist()[:64] for a in record.to_numpy_ndarrays()]
        else:
            out[name] = {
                k: (float(v) if isinstance(v, float | np.floating) else v) for k, v in record.items()
            }
    return out
