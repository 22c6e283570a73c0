"""Baselines on real (embedded) data: convergence, determinism, systems heterogeneity, accounting."""

from __future__ import annotations

import numpy as np
import pytest

import fedmtl
from tests.conftest import digits_config


def _run(tmp_path, name, **kw):
    return fedmtl.run(digits_config(**kw), out=tmp_path / name)


def test_fedavg_on_digits_beats_untrained_model(tmp_path):
    res = _run(tmp_path, "a", train__rounds=15, clients__per_round=8)
    first = res.rounds[0]
    final = res.final
    # An untrained 10-way classifier sits near 0.1; a few seconds of FedAvg gets far beyond it.
    assert final["global_accuracy"] > 0.85
    assert final["accuracy_mean"] > 0.85
    assert final["accuracy_worst10"] <= final["accuracy_mean"] <= final["accuracy_best10"]
    assert final["global_loss"] < first["global_loss"]
    assert set(res.summary) >= {"final", "best", "primary_metric", "bytes_total"}
    assert res.summary["best"]["accuracy_mean"] >= final["accuracy_mean"]


def test_same_seed_gives_identical_metrics(tmp_path):
    a = _run(tmp_path, "a", runtime__work_fraction=[0.3, 1.0], runtime__drop_prob=0.2)
    b = _run(tmp_path, "b", runtime__work_fraction=[0.3, 1.0], runtime__drop_prob=0.2)
    c = _run(tmp_path, "c", seed=1, runtime__work_fraction=[0.3, 1.0], runtime__drop_prob=0.2)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]  # noqa: E731
    assert strip(a.rounds) == strip(b.rounds)
    assert a.clients == b.clients
    assert strip(a.rounds) != strip(c.rounds)


def test_fedprox_and_server_optimizers_train(tmp_path):
    prox = _run(tmp_path, "p", algorithm={"name": "fedprox", "mu": 0.1}, train__rounds=10)
    avgm = _run(
        tmp_path,
        "m",
        algorithm={"name": "fedavg", "server_optimizer": {"name": "momentum", "lr": 1.0}},
        train__rounds=10,
    )
    adam = _run(
        tmp_path,
        "d",
        algorithm={"name": "fedavg", "server_optimizer": {"name": "adam", "lr": 0.01}},
        train__rounds=10,
    )
    plain = _run(tmp_path, "f", train__rounds=10)
    for res in (prox, avgm, adam, plain):
        assert res.final["global_accuracy"] > 0.6
    # The proximal term changes the solution; it must not be a silent no-op.
    assert prox.final["global_loss"] != plain.final["global_loss"]
    assert avgm.final["global_loss"] != plain.final["global_loss"]


def test_local_communicates_nothing_and_personalises(tmp_path):
    res = _run(tmp_path, "l", algorithm={"name": "local"}, train__rounds=8, clients__per_round=8)
    assert all(r["bytes_up"] == 0 and r["bytes_down"] == 0 for r in res.rounds)
    assert "global_accuracy" not in res.final
    assert res.final["accuracy_mean"] > 0.5


def test_stragglers_do_less_work_and_dropouts_send_nothing(tmp_path):
    res = _run(tmp_path, "s", runtime__work_fraction=[0.1, 0.5], runtime__drop_prob=0.5, train__rounds=6)
    rows = [r for r in fedmtl.experiment.records.RunDir(res.run_dir).read_metrics() if r["kind"] == "train"]
    dropped = [r for r in rows if r["dropped"]]
    done = [r for r in rows if not r["dropped"]]
    assert dropped and done
    assert all(r["bytes_up"] == 0 and r["bytes_down"] > 0 for r in dropped)
    assert all(0.1 <= r["work"] <= 0.5 for r in rows)
    full = _run(tmp_path, "full", train__rounds=1)
    full_rows = [
        r for r in fedmtl.experiment.records.RunDir(full.run_dir).read_metrics() if r["kind"] == "train"
    ]
    assert np.mean([r["steps"] for r in done]) < 0.6 * np.mean([r["steps"] for r in full_rows])
    round_rows = res.rounds
    assert sum(r["dropped"] for r in round_rows) == len(dropped)


def test_bytes_are_counted_per_client(tmp_path):
    res = _run(tmp_path, "b", train__rounds=2)
    n_params = 64 * 32 + 32 + 32 * 10 + 10
    for r in res.rounds:
        assert r["bytes_down"] == r["sampled"] * n_params * 4
        assert r["bytes_up"] == (r["sampled"] - r["dropped"]) * n_params * 4


@pytest.mark.parametrize("lr_schedule", ["exponential", "cosine"])
def test_lr_schedules_decay(tmp_path, lr_schedule):
    res = _run(tmp_path, lr_schedule, train__lr_schedule=lr_schedule, train__lr_decay=0.5, train__rounds=4)
    lrs = [r["lr"] for r in res.rounds]
    assert lrs[0] == pytest.approx(0.1)
    assert all(b < a for a, b in zip(lrs, lrs[1:], strict=False))


def test_regression_on_diabetes(tmp_path):
    cfg = digits_config(
        data__dataset="diabetes",
        data__partition={"kind": "iid", "num_clients": 4},
        model={"name": "mlp", "hidden": [16]},
        train__rounds=20,
        train__lr=0.05,
    )
    res = fedmtl.run(cfg, out=tmp_path / "r")
    assert res.summary["primary_metric"] == "rmse"
    assert res.summary["higher_is_better"] is False
    # Diabetes targets have std ~77; a useful model does far better than predicting the mean.
    assert res.final["global_rmse"] < 65
    assert res.final["global_r2"] > 0.25


def test_non_finite_updates_are_rejected_not_averaged(tmp_path):
    # lr 1e20 makes local SGD overflow to inf/NaN on every client: nothing may reach the global model.
    res = _run(tmp_path, "nan", train__rounds=2, train__lr=1e20)
    assert all(r["rejected_clients"] for r in res.rounds)
    assert np.isfinite(res.final["global_loss"])


def test_broadcast_many_is_broadcast_per_client_with_one_message_per_task():
    from fedmtl.config import parse_config
    from fedmtl.experiment.run import build

    for name in ("fedavg", "fedper"):
        _, algo, _ = build(parse_config(digits_config(algorithm={"name": name})))
        server = algo.init_server()
        many = algo.broadcast_many(server, [0, 3, 5])
        single = [algo.broadcast(server, c) for c in (0, 3, 5)]
        for m, s in zip(many, single, strict=True):
            assert m.arrays.keys() == s.arrays.keys()
            assert all(np.array_equal(m.arrays[k], s.arrays[k]) for k in s.arrays)
        # FedAvg hands one message to every client of a task; FedPer has its own broadcast
        assert (many[0] is many[1]) == (name == "fedavg")


def test_an_algorithm_written_once_runs_sequential_and_batched(tmp_path, monkeypatch):
    """The README's example: a client step that declares its training, nothing batched written."""
    from fedmtl import algorithms
    from fedmtl.algorithms import Algorithm, Message

    class MyFedAvg(Algorithm):
        name = "my_fedavg"

        def client_step(self, state, data, msg, work):  # noqa: ANN001, ANN202
            trained = yield self.ctx.train(data, work, msg.arrays)
            return state, Message(arrays=trained.params, scalars=trained.scalars(data))

        def server_update(self, server, aggregate, round):  # noqa: ANN001, ANN202
            return {**server, "params": {**server["params"], **aggregate.params}}

    monkeypatch.setitem(algorithms._REGISTRY, "my_fedavg", MyFedAvg)
    runs = {
        e: fedmtl.run(
            digits_config(algorithm={"name": "my_fedavg"}, train__rounds=2, runtime__execution=e),
            out=tmp_path / e,
        )
        for e in ("sequential", "batched")
    }
    assert runs["batched"].rounds[-1]["execution"] == "batched"
    plain = fedmtl.run(digits_config(train__rounds=2), out=tmp_path / "fedavg")
    for res in runs.values():  # FedAvg's numbers, to float tolerance
        assert res.final["global_loss"] == pytest.approx(plain.final["global_loss"], rel=1e-5)


def test_the_proximal_step_adds_mu_times_the_distance_to_the_centre_by_hand():
    """One full-batch SGD step of local_train with FedProx's term against w - lr (grad L + mu (w - c)),
    the gradient of L computed here by autograd on the same batch."""
    import numpy as np
    import torch
    from torch import nn
    from torch.func import functional_call

    from fedmtl.data.federated import TaskSpec
    from fedmtl.training.local import LocalSpec, local_train
    from fedmtl.training.optim import OptimizerSpec

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    center = {k: v + torch.linspace(-0.5, 0.5, v.numel()).reshape(v.shape) for k, v in w0.items()}
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=8)
    lr, mu = 0.1, 0.7
    spec = LocalSpec(optimizer=OptimizerSpec(lr=lr), batch_size=8)
    got, _, _ = local_train(
        model, w0, x, y, TaskSpec("classification", 3), spec, 1, np.random.default_rng(1),
        prox_center=center, prox_mu=mu,
    )  # fmt: skip
    params = {k: v.clone().requires_grad_(True) for k, v in w0.items()}
    loss = nn.functional.cross_entropy(
        functional_call(model, params, (torch.as_tensor(x),)), torch.as_tensor(y)
    )
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    for k in w0:
        want = w0[k] - lr * (grads[k] + mu * (w0[k] - center[k]))
        torch.testing.assert_close(torch.as_tensor(got[k]), want, rtol=1e-5, atol=1e-6)
