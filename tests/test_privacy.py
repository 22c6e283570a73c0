"""Differential privacy: calibrated noise, epsilon from dp_accounting, the hard budget, Flower."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from dp_accounting import NeighboringRelation, dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

import fedmtl
from fedmtl.aggregation.pipeline import build_pipeline
from fedmtl.config import parse_config
from fedmtl.errors import ConfigError
from fedmtl.features.privacy import privatize_update
from fedmtl.privacy.accountant import adaptive_update_noise, epsilon
from fedmtl.training.dp_sgd import clip_and_noise
from tests.conftest import digits_config

DP = {"enabled": True, "noise_multiplier": 1.0, "clip_norm": 0.5}


def _dp_config(**over):
    base = {
        "train__rounds": 3,
        "clients__per_round": 4,
        "data__partition": {"kind": "iid", "num_clients": 8},
        "privacy": DP,
    }
    return digits_config(**{**base, **over})


# ------------------------------------------------------------------------------------ noise
def test_server_noise_has_the_calibrated_std():
    z, clip, n = 1.3, 0.7, 10
    chain = build_pipeline(
        parse_config(
            {
                "aggregation": [
                    {"name": "clip", "max_norm": clip},
                    {"name": "mean", "weighting": "uniform"},
                    {"name": "gaussian_noise", "noise_multiplier": z},
                ]
            }
        ).aggregation
    )
    ref = {"w": np.zeros(200_000, np.float32)}
    res = chain.run(
        ref, {c: {"w": ref["w"]} for c in range(n)}, dict.fromkeys(range(n), 1.0), seed=0, round=1
    )
    std = float(res.params["w"].std())
    assert std == pytest.approx(z * clip / n, rel=0.01)  # z * C on the sum, divided by n
    assert res.info["noise_std"] == pytest.approx(z * clip / n)


def test_client_side_noise_shares_sum_to_the_central_noise():
    z, clip, m = 1.1, 2.0, 16
    rng = np.random.default_rng(0)
    total = np.zeros(100_000)
    for _ in range(m):
        private, within = privatize_update(
            {"w": np.zeros(100_000, np.float32)}, clip, z * clip / np.sqrt(m), rng
        )
        total += private["w"]
        assert within
    assert float(total.std()) == pytest.approx(z * clip, rel=0.01)
    clipped, within = privatize_update({"w": np.full(4, 10.0)}, clip, 0.0, rng)
    assert not within and np.linalg.norm(clipped["w"]) == pytest.approx(clip)


def test_dp_sgd_clips_each_sample_and_adds_the_calibrated_noise():
    grads = {"w": torch.zeros(8, 50_000), "b": torch.zeros(8, 3)}
    grads["w"][0, 0] = 100.0  # one sample with a huge gradient: clipped to norm clip
    gen = torch.Generator().manual_seed(0)
    out, clipped = clip_and_noise(grads, clip=0.5, noise_multiplier=0.0, batch=8, gen=gen)
    assert clipped == 1 and float(out["w"][0]) == pytest.approx(0.5 / 8)
    out, _ = clip_and_noise({"w": torch.zeros(8, 200_000)}, clip=0.5, noise_multiplier=2.0, batch=8, gen=gen)
    assert float(out["w"].std()) == pytest.approx(2.0 * 0.5 / 8, rel=0.01)


# ------------------------------------------------------------------------------------ accountant
def test_epsilon_matches_dp_accounting_for_a_known_setting():
    # DP-FedAvg setting: 100 of 10,000 clients per round, z = 1.0, 1,000 rounds, delta 1e-6
    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(
        dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(0.01, dp_event.GaussianDpEvent(1.0)), 1000
        )
    )
    want = acc.get_epsilon(1e-6)
    assert epsilon(1.0, 1000, 1e-6, 100, 10_000) == pytest.approx(want, rel=1e-12)
    assert 1.0 < want < 10.0
    # the other accountant and the exact fixed-size sampling (1 of 10 clients, z = 3, 3 rounds)
    event = dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(3.0))
    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(dp_event.SelfComposedDpEvent(event, 3))
    assert epsilon(3.0, 3, 1e-5, 1, 10, accountant="pld") == pytest.approx(pld.get_epsilon(1e-5))
    wor = rdp_privacy_accountant.RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    # replace-one moves the clipped sum by up to 2C: the mechanism's multiplier is z / 2
    wor.compose(
        dp_event.SelfComposedDpEvent(
            dp_event.SampledWithoutReplacementDpEvent(10, 1, dp_event.GaussianDpEvent(1.5)), 3
        )
    )
    assert epsilon(3.0, 3, 1e-5, 1, 10, sampling="without_replacement") == pytest.approx(
        wor.get_epsilon(1e-5)
    )
    assert epsilon(0.0, 3, 1e-5, 1, 2) == float("inf") and epsilon(1.0, 0, 1e-5, 1, 2) == 0.0


def test_round_rows_report_the_accountants_epsilon(tmp_path):
    res = fedmtl.run(_dp_config(), out=tmp_path / "r")
    eps = [r["epsilon"] for r in res.rounds]
    want = [epsilon(1.0, k, 1e-5, 4, 8) for k in (1, 2, 3)]
    assert eps == pytest.approx(want) and eps[0] < eps[1] < eps[2]
    assert all(r["delta"] == 1e-5 and r["dp_clip"] == 0.5 for r in res.rounds)
    assert res.final["epsilon"] == pytest.approx(want[-1])
    assert np.isfinite(res.final["global_loss"])


def test_the_budget_stops_training_before_the_round_that_would_exceed_it(tmp_path, caplog):
    budget = (epsilon(1.0, 2, 1e-5, 4, 8) + epsilon(1.0, 3, 1e-5, 4, 8)) / 2
    cfg = _dp_config(train__rounds=6, eval__every=5, privacy={**DP, "max_epsilon": budget})
    res = fedmtl.run(cfg, out=tmp_path / "r")
    assert res.summary["rounds_completed"] == 2 and res.summary["complete"]
    assert "global_accuracy" in res.final  # the last round before the stop is evaluated off schedule
    assert res.summary["stopped"].startswith("privacy budget: round 3 would raise epsilon to ")
    assert res.final["epsilon"] <= budget
    assert "stopped before round 3: privacy budget" in caplog.text  # a warning of the fedmtl logger


def test_adaptive_clipping_moves_the_bound_and_costs_the_same_epsilon(tmp_path):
    cfg = _dp_config(
        train__rounds=4, privacy={**DP, "clipping": "adaptive", "clip_norm": 0.05, "clip_lr": 0.5}
    )
    res = fedmtl.run(cfg, out=tmp_path / "r")
    bounds = [r["dp_clip"] for r in res.rounds]
    assert bounds[0] > 0.05 and bounds[-1] > bounds[0]  # updates are far larger than 0.05: it grows
    assert res.final["epsilon"] == pytest.approx(epsilon(1.0, 4, 1e-5, 4, 8))
    # round 1 used the initial bound; the update noise is raised to pay for the noisy count
    assert adaptive_update_noise(1.0, 1.0) == pytest.approx(1.0 / np.sqrt(0.75))
    assert res.rounds[0]["aggregation"]["noise_std"] == pytest.approx(
        adaptive_update_noise(1.0, 1.0) * 0.05 / 4
    )


@pytest.mark.parametrize("extra", [{"noise_at": "client"}, {"level": "sample", "noise_multiplier": 0.8}])
def test_client_noise_and_dp_sgd_run_and_report_epsilon(tmp_path, extra):
    res = fedmtl.run(
        _dp_config(train__rounds=2, train__local_steps=3, privacy={**DP, **extra}), out=tmp_path / "r"
    )
    assert 0 < res.final["epsilon"] < float("inf") and np.isfinite(res.final["global_loss"])


@pytest.mark.parametrize("level", ["client", "sample"])
def test_batched_execution_gives_the_dp_run_sequential_execution_gives(tmp_path, level):
    over = {"privacy": {**DP, "level": level}, "train__local_steps": 3}
    seq = fedmtl.run(_dp_config(runtime__execution="sequential", **over), out=tmp_path / "s")
    bat = fedmtl.run(_dp_config(runtime__execution="batched", **over), out=tmp_path / "b")
    assert bat.rounds[-1]["execution"] == "batched"
    assert bat.final["global_loss"] == pytest.approx(seq.final["global_loss"], rel=1e-4)
    assert bat.final["epsilon"] == seq.final["epsilon"]


def test_the_budget_under_fixed_size_sampling_uses_the_fixed_size_accountant(tmp_path):
    fixed = [epsilon(1.0, k, 1e-5, 4, 8, "without_replacement") for k in (1, 2, 3)]
    assert fixed[1] > epsilon(1.0, 2, 1e-5, 4, 8, "poisson")  # the Poisson budget would let it run on
    budget = (fixed[0] + fixed[1]) / 2
    cfg = _dp_config(train__rounds=3, clients__sampling="fixed", privacy={**DP, "max_epsilon": budget})
    res = fedmtl.run(cfg, out=tmp_path / "r")
    assert res.summary["rounds_completed"] == 1
    assert res.summary["stopped"].startswith("privacy budget: round 2 would raise epsilon to ")
    assert res.final["epsilon"] == pytest.approx(fixed[0])
    assert res.final["dp_accounting"].startswith("client-level, fixed-size sampling without replacement")


def test_dp_runs_on_a_personalised_multi_task_federation(tmp_path):
    """Under client-level DP, FedPer on a two-task federation still learns: six rounds gain over the
    first (measured 0.28 -> 0.63 mean accuracy; digit task 0.53 against 0.1 chance), measured by the
    simulation's exact client evaluation, which the rows label as not covered by epsilon."""
    res = fedmtl.run(
        _dp_config(
            algorithm={"name": "fedper"},
            data__tasks=["digit", "parity"],
            train__rounds=6,
            privacy={**DP, "client_eval": "exact"},
        ),
        out=tmp_path / "r",
    )
    first, last = res.rounds[0], res.final
    assert "not covered by epsilon" in last["dp_client_eval"]
    assert last["accuracy_mean"] > first["accuracy_mean"] + 0.2
    assert last["task_digit_accuracy_mean"] > 0.4 and last["task_parity_accuracy_mean"] > 0.6
    assert last["epsilon"] > first["epsilon"] > 0


@pytest.mark.parametrize(
    "over,message",
    [
        (
            {"aggregation": ["median"]},
            "config: privacy.level = 'client': sets the aggregation chain itself (clip, uniform mean, "
            "noise); leave aggregation empty",
        ),
        (
            {"algorithm": {"name": "local"}},
            "config: privacy.level = 'client': clips and noises the model updates the server aggregates, "
            "but algorithm 'local' cannot (clients never send an update, so there is nothing to aggregate)",
        ),
        (
            {"privacy": {**DP, "accountant": "pld", "sampling": "without_replacement"}},
            "config: privacy = {'enabled': True, 'noise_multiplier': 1.0, 'clip_norm': 0.5, "
            "'accountant': 'pld', 'sampling': 'without_replacement'}: sampling 'without_replacement' "
            "needs accountant 'rdp' (PLD supports 'poisson')",
        ),
        (
            {"privacy": {**DP, "clipping": "adaptive", "count_noise_std": 0.1}},
            "config: privacy.count_noise_std: count_noise_std = 0.1 is too small for noise_multiplier = 1: "
            "needs 2 * count_noise_std > noise_multiplier",
        ),
        ({"privacy": {**DP, "delta": 0}}, "config: privacy.delta = 0: input should be greater than 0"),
    ],
)
def test_config_errors_are_one_line(tmp_path, over, message):
    with pytest.raises(ConfigError) as exc:
        fedmtl.run(_dp_config(**over), out=tmp_path / "r")
    assert str(exc.value) == message


# ------------------------------------------------------------------------ DP-aggregated evaluation
EVAL_DP = {**DP, "eval_noise_multiplier": 2.0, "eval_metrics": ["accuracy", "f1"]}


def test_dp_evaluation_releases_only_noisy_clipped_means(tmp_path):
    exact = fedmtl.run(_dp_config(privacy={**DP, "client_eval": "exact"}), out=tmp_path / "exact")
    private = fedmtl.run(_dp_config(privacy=EVAL_DP), out=tmp_path / "private")

    def kind(res, k):
        lines = (res.run_dir / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] == k]

    assert kind(private, "client") == []
    clients = kind(exact, "client")
    for e, p in zip(exact.rounds, private.rounds, strict=True):  # training is untouched
        assert p["global_accuracy"] == e["global_accuracy"]
        assert p["eval_private"] is True and "accuracy_std" not in p and "loss_mean" not in p
        rows = [c for c in clients if c["round"] == e["round"]]
        rng = np.random.default_rng([0, 14, e["round"]])  # (seed, DP_EVAL_RNG, round)
        for metric in ("accuracy", "f1"):
            total = sum(min(max(c[metric], 0.0), 1.0) for c in rows)
            want = (total + rng.normal(0.0, 2.0)) / len(rows)
            assert p[f"{metric}_mean"] == pytest.approx(want, abs=1e-12)
        assert p["eval_clients"] == len(rows) == 8


def test_dp_evaluation_is_composed_by_the_accountant(tmp_path):
    res = fedmtl.run(_dp_config(train__rounds=5, eval__every=2, privacy=EVAL_DP), out=tmp_path / "r")
    evals = [r["round"] for r in res.rounds if "accuracy_mean" in r]
    assert evals == [2, 4, 5] and [r["dp_eval_releases"] for r in res.rounds] == [0, 1, 1, 2, 3]
    acc = rdp_privacy_accountant.RdpAccountant()
    train = dp_event.PoissonSampledDpEvent(4 / 8, dp_event.GaussianDpEvent(1.0))
    metric = dp_event.GaussianDpEvent(2.0)  # two metric means per evaluation round
    acc.compose(dp_event.ComposedDpEvent([dp_event.SelfComposedDpEvent(train, 5),
                                          dp_event.SelfComposedDpEvent(metric, 2 * 3)]))  # fmt: skip
    assert res.final["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert res.final["epsilon"] > epsilon(1.0, 5, 1e-5, 4, 8)


def test_the_budget_reserves_the_evaluation_of_the_round_it_stops_behind(tmp_path):
    """Round 3 is off schedule (every 5): the budget counts its evaluation, which happens when the
    run stops behind it, so the released epsilon never exceeds max_epsilon."""
    cfg = _dp_config(eval__every=5, train__rounds=6)
    ctx = ClientDPProbe(cfg)
    budget = (ctx.eps(3, 1) + ctx.eps(4, 1)) / 2  # round 3 and its evaluation fit, round 4 does not
    res = fedmtl.run(
        _dp_config(eval__every=5, train__rounds=6, privacy={**EVAL_DP, "max_epsilon": budget}),
        out=tmp_path / "r",
    )
    assert res.summary["rounds_completed"] == 3 and res.summary["stopped"].startswith("privacy budget")
    assert "accuracy_mean" in res.final and res.final["dp_eval_releases"] == 1
    assert res.final["epsilon"] == pytest.approx(ctx.eps(3, 1)) and res.final["epsilon"] <= budget


class ClientDPProbe:
    """Epsilon of the EVAL_DP mechanism after given numbers of training and evaluation releases."""

    def __init__(self, cfg):
        from fedmtl.experiment.run import build

        _, self.algo, _ = build(parse_config({**cfg, "privacy": EVAL_DP}))

    def eps(self, releases: int, evaluations: int) -> float:
        return self.algo.epsilon_after(releases, evaluations)


@pytest.mark.parametrize(
    ("over", "message"),
    [
        (
            {"privacy": {**EVAL_DP, "level": "sample"}},
            "config: privacy = {'enabled': True, 'noise_multiplier': 1.0, 'clip_norm': 0.5, "
            "'eval_noise_multiplier': 2.0, 'eval_metrics': ['accuracy', 'f1'], 'level': 'sample'}: "
            "eval_noise_multiplier (DP-aggregated evaluation) protects clients: it needs level 'client'",
        ),
        (
            {"privacy": EVAL_DP, "data__holdout_clients": 2},
            "config: privacy.eval_noise_multiplier: DP-aggregated evaluation releases only the trained "
            "clients' metric means; set data.holdout_clients to 0",
        ),
    ],
)
def test_dp_evaluation_config_errors(tmp_path, over, message):
    with pytest.raises(ConfigError) as exc:
        fedmtl.run(_dp_config(**over), out=tmp_path / "r")
    assert str(exc.value) == message


# ------------------------------------------------------------------------------------ flower
@pytest.mark.parametrize(
    "privacy",
    [
        {**DP, "clipping": "adaptive", "max_epsilon": 7.0},  # stops before round 4 (epsilon 7.41)
        {**DP, "noise_at": "client"},
        EVAL_DP,
    ],
    ids=["server-noise-adaptive-budget", "client-noise", "dp-evaluation"],
)
def test_flower_run_with_dp_equals_the_simulator(tmp_path, privacy, flower):
    raw = flower._cfg(data__partition__num_clients=4, clients__per_round=2, train__rounds=4, privacy=privacy)
    expected = fedmtl.run(raw, out=tmp_path / "inproc")
    got = flower._flower_run(tmp_path, raw, flower.LoopbackGrid(flower._nodes(4)))
    flower.assert_same_metrics(expected.run_dir, got.run_dir)
    assert got.summary["stopped"] == expected.summary["stopped"]
    assert got.summary["rounds_completed"] == expected.summary["rounds_completed"]
    if "max_epsilon" in privacy:
        assert got.summary["rounds_completed"] == 3 and got.summary["stopped"].startswith("privacy budget")
    assert got.summary["final"]["epsilon"] == pytest.approx(expected.summary["final"]["epsilon"])
    # the ServerApp samples nodes with the round plan's rule: Poisson unless the noise is in shares
    sampling = "fixed-size" if privacy.get("noise_at") == "client" else "Poisson-sampled"
    assert [r["sampled"] for r in got.rounds] == [r["sampled"] for r in expected.rounds]
    assert all(sampling in r["dp_accounting"] for r in got.rounds)


# ------------------------------------------------------------------------------------ sampling
def _binomial_fit(sizes: np.ndarray, n: int, q: float) -> float:
    """p-value of a chi-square goodness-of-fit test of ``sizes`` against Binomial(n, q), the tails
    pooled so every bin expects at least 5."""
    from scipy import stats

    values = np.arange(n + 1)
    expected = stats.binom.pmf(values, n, q) * len(sizes)
    observed = np.bincount(sizes, minlength=n + 1).astype(float)
    bins, acc_e, acc_o = [], 0.0, 0.0
    for e, o in zip(expected, observed, strict=True):
        acc_e, acc_o = acc_e + e, acc_o + o
        if acc_e >= 5:
            bins.append((acc_o, acc_e))
            acc_e = acc_o = 0.0
    if acc_e > 0:
        bins[-1] = (bins[-1][0] + acc_o, bins[-1][1] + acc_e)
    obs, exp = np.array(bins).T
    return float(stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


def test_poisson_client_sampling_draws_binomial_rounds_of_independent_clients():
    """``clients.sampling: poisson``: every client independently with q = per_round / N each round,
    so round sizes follow Binomial(N, q); seeded per round, so the same seed draws the same rounds."""
    from fedmtl.runtime.round import Planner

    cfg = parse_config(digits_config(clients={"per_round": 20, "sampling": "poisson"}))
    planner = Planner(cfg, list(range(100)))
    rounds = [planner.sample(r) for r in range(1, 3001)]
    sizes = np.array([len(s) for s in rounds])
    assert _binomial_fit(sizes, 100, 0.2) > 1e-3
    assert sizes.mean() == pytest.approx(20, abs=0.3) and sizes.var() == pytest.approx(16, rel=0.1)
    counts = np.bincount(np.concatenate(rounds), minlength=100) / len(rounds)
    assert np.abs(counts - 0.2).max() < 0.03  # every client at the same rate
    assert rounds[:5] == [Planner(cfg, list(range(100))).sample(r) for r in range(1, 6)]
    fixed = Planner(parse_config(digits_config(clients={"per_round": 20})), list(range(100)))
    assert {len(fixed.sample(r)) for r in range(1, 50)} == {20}


def test_dp_sgd_draws_binomial_poisson_batches():
    from fedmtl.training.dp_sgd import poisson_batches

    batches = poisson_batches(200, 32, 3000, np.random.default_rng(3))
    sizes = np.array([len(b) for b in batches])
    assert _binomial_fit(sizes, 200, 0.16) > 1e-3
    assert all(len(np.unique(b)) == len(b) for b in batches[:50])
    assert poisson_batches(10, 32, 3, np.random.default_rng(0))[0].tolist() == list(range(10))  # q = 1


def test_dp_sgd_reports_dp_accountings_epsilon_for_its_poisson_batches(tmp_path):
    """Every client composes one Poisson-subsampled Gaussian (q = batch/n) per DP-SGD step it took;
    the row's epsilon is the worst client's."""
    from fedmtl.config import Config
    from fedmtl.experiment.run import load_federated

    raw = _dp_config(
        train__rounds=2, train__local_steps=3, clients__per_round=8,
        privacy={**DP, "level": "sample", "noise_multiplier": 0.8},
    )  # fmt: skip
    res = fedmtl.run(raw, out=tmp_path / "r")
    cfg = Config.model_validate(raw)
    sizes = [c.n_train for c in load_federated(cfg.data, cfg.seed).clients]

    def eps(n: int) -> float:
        acc = rdp_privacy_accountant.RdpAccountant()
        q = min(cfg.train.batch_size, n) / n
        event = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(0.8))
        acc.compose(dp_event.SelfComposedDpEvent(event, 6))  # 2 rounds x 3 steps, every client
        return acc.get_epsilon(1e-5)

    assert res.final["epsilon"] == pytest.approx(max(eps(n) for n in sizes), rel=1e-9)
    assert res.final["epsilon_mean"] == pytest.approx(np.mean([eps(n) for n in sizes]), rel=1e-9)
    assert res.final["dp_accounting"].startswith("record-level, Poisson batches")


def test_client_dp_defaults_to_poisson_sampling_and_reports_dp_accountings_epsilon(tmp_path):
    """The epsilon in the rows is dp-accounting's for the mechanism that ran: Poisson-sampled clients
    (add/remove) by default, fixed-size sampling without replacement (replace-one) when asked."""
    res = fedmtl.run(_dp_config(train__rounds=4), out=tmp_path / "p")
    recorded = yaml.safe_load((res.run_dir / "config.yaml").read_text())
    assert recorded["clients"]["sampling"] == "poisson" and recorded["privacy"]["sampling"] == "poisson"
    rows = res.rounds
    assert len({r["sampled"] for r in rows}) > 1  # rounds of varying size
    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(4 / 8, dp_event.GaussianDpEvent(1.0)), 4)
    )
    assert rows[-1]["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert (
        rows[-1]["dp_accounting"] == "client-level, Poisson-sampled clients, add/remove-one neighbours (rdp)"
    )
    fixed = fedmtl.run(_dp_config(train__rounds=4, clients__sampling="fixed"), out=tmp_path / "f")
    assert {r["sampled"] for r in fixed.rounds} == {4}
    wor = rdp_privacy_accountant.RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    wor.compose(
        dp_event.SelfComposedDpEvent(
            dp_event.SampledWithoutReplacementDpEvent(8, 4, dp_event.GaussianDpEvent(0.5)), 4
        )
    )
    assert fixed.rounds[-1]["epsilon"] == pytest.approx(wor.get_epsilon(1e-5), rel=1e-9)
    assert "fixed-size sampling without replacement, replace-one" in fixed.rounds[-1]["dp_accounting"]


def test_an_empty_poisson_round_still_releases_the_noise_and_is_counted(tmp_path):
    """Under Poisson sampling a round may sample no client: the server still releases the noisy
    fixed-denominator mean (its noise alone), and the accountant counts the release."""
    res = fedmtl.run(
        _dp_config(train__rounds=8, clients__per_round=1, eval__every=8, eval__global_test=True),
        out=tmp_path / "r",
    )
    rows = res.rounds
    empty = [r for r in rows if r["sampled"] == 0]
    assert empty, [r["sampled"] for r in rows]
    assert [r["dp_releases"] for r in rows] == list(range(1, 9))
    assert all(np.isfinite(r["epsilon"]) for r in rows)


def test_the_fixed_denominator_mean_divides_by_the_expected_count_and_noises_every_key():
    from fedmtl.aggregation.config import ClipStep, GaussianNoiseStep, MeanStep
    from fedmtl.aggregation.pipeline import Pipeline
    from fedmtl.aggregation.steps import Clip, GaussianNoise, Mean

    chain = Pipeline(
        [
            Clip(ClipStep(max_norm=10.0)),
            Mean(MeanStep(weighting="uniform", expected=4.0, expected_by_task={"a": 2.0})),
            GaussianNoise(GaussianNoiseStep(noise_multiplier=0.0)),
        ]
    )
    ref = {
        "body": np.zeros(3, np.float32),
        "a:head": np.zeros(2, np.float32),
        "b:head": np.zeros(2, np.float32),
    }
    updates = {
        0: {"body": np.ones(3, np.float32), "a:head": np.ones(2, np.float32)},
        1: {"body": np.ones(3, np.float32)},
    }
    res = chain.run(ref, updates, {0: 1.0, 1: 1.0}, seed=0, round=1)
    assert res.params["body"].tolist() == [0.5] * 3  # 2 clients' sum over 4 expected
    assert res.params["a:head"].tolist() == [0.5] * 2  # over task a's 2 expected
    assert res.params["b:head"].tolist() == [0.0] * 2  # nobody of task b: a zero sum
    noisy = Pipeline([Clip(ClipStep(max_norm=1.0)), Mean(MeanStep(weighting="uniform", expected=4.0)),
                      GaussianNoise(GaussianNoiseStep(noise_multiplier=2.0))])  # fmt: skip
    empty = noisy.run({"w": np.zeros(100_000, np.float32)}, {}, {}, seed=0, round=1)
    assert float(empty.params["w"].std()) == pytest.approx(2.0 * 1.0 / 4, rel=0.02)


@pytest.mark.parametrize(
    "over, message",
    [
        (
            {"privacy": {**DP, "accountant": "pld"}, "clients__sampling": "fixed"},
            "config: privacy.accountant = 'pld': models Poisson sampling only, and clients.sampling = "
            "'fixed' draws a fixed number of clients; use accountant 'rdp' or clients.sampling 'poisson'",
        ),
        (
            {"privacy": {**DP, "noise_at": "client"}, "clients__sampling": "poisson"},
            "config: privacy.noise_at = 'client': each client adds its share of the noise for a known number "
            "of clients, which Poisson sampling varies; use clients.sampling 'fixed'",
        ),
        (
            {"algorithm": {"name": "hierarchical"}, "clients__sampling": "poisson"},
            "config: clients.sampling = 'poisson': DP-FedAvg then divides each sum by its expected number of "
            "clients, and algorithm 'hierarchical' needs more than that mean of the updates; use "
            "clients.sampling 'fixed'",
        ),
    ],
    ids=["pld-fixed", "client-noise-poisson", "hierarchical-poisson"],
)
def test_a_sampler_the_accountant_does_not_model_is_refused(tmp_path, over, message):
    with pytest.raises(ConfigError) as exc:
        fedmtl.run(_dp_config(**over), out=tmp_path / "r")
    assert str(exc.value) == message


def test_the_default_sampler_is_the_one_each_setting_can_account_for():
    from fedmtl.config import Config

    def resolved(**over):
        cfg = Config.model_validate(_dp_config(**over))
        return cfg.clients.sampling, cfg.privacy.sampling

    assert resolved() == ("poisson", "poisson")
    assert resolved(algorithm={"name": "hierarchical"}) == ("fixed", "without_replacement")
    assert resolved(privacy={**DP, "noise_at": "client"}) == ("fixed", "without_replacement")
    assert resolved(privacy={**DP, "enabled": False})[0] == "fixed"
