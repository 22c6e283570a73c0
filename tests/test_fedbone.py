"""FedBone: split learning equals unsplit backprop, GPAggregation's projection, what crosses the wire,
training on the dense MNIST tasks, and the Flower runtime equal to the simulator."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch.func import functional_call

import fedmtl
from fedmtl.aggregation.gradient_projection import (
    GPOptions,
    attention_weights,
    cosine_matrix,
    gp_aggregate,
    project_conflicts,
)
from fedmtl.algorithms.wrapper import AlgorithmWrapper
from fedmtl.config import parse_config
from fedmtl.data import datasets
from fedmtl.errors import ConfigError
from fedmtl.experiment.run import build
from fedmtl.fedbone.metrics import miou, psnr
from fedmtl.fedbone.model import part_of
from fedmtl.fedbone.tasks import foreground, sobel_magnitude
from fedmtl.runtime.simulation import TRAIN
from fedmtl.training import batch_schedule, local_train, to_torch
from fedmtl.training.objectives import task_loss
from fedmtl.training.shuffle import Stream

SMALL = {"width": 8, "depth": 1, "feature_channels": 8, "adapter_channels": 8}


@pytest.fixture(autouse=True, scope="module")
def _mnist_read_once() -> Iterator[None]:
    """Decompress the MNIST files once for this module (every test builds a federation from them)."""
    spec = datasets.REGISTRY["mnist_dense"]
    cache: dict[tuple[str, ...], Any] = {}

    def read(paths: list[Any]) -> Any:
        key = tuple(map(str, paths))
        if key not in cache:
            cache[key] = spec.read(paths)
        return cache[key]

    datasets.REGISTRY["mnist_dense"] = dataclasses.replace(spec, read=read)
    yield
    datasets.REGISTRY["mnist_dense"] = spec


def _cfg(**over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "name": "fb",
        "seed": 0,
        "data": {
            "dataset": "mnist_dense",
            "partition": {"kind": "iid", "num_clients": 600},
            "max_clients": 4,
        },
        "model": {"name": "fedbone_net", **SMALL},
        "algorithm": {"name": "fedbone"},
        "train": {"rounds": 2, "local_steps": 2, "batch_size": 8, "optimizer": "adam", "lr": 0.003},
        "output": {"progress": False},
    }
    for key, value in over.items():
        cur = cfg
        parts = key.split("__")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = value
    return cfg


def _one_round(cfg: Any) -> tuple[Any, Any, dict[str, Any], Any, dict[int, Any]]:
    """(data, algorithm, server before, round result, client states after) of round 1, every
    client taking part, run by the simulator's round."""
    data, algo, sim = build(cfg)
    server, states = algo.init_server(), {}
    return data, algo, server, sim.run_round(1, server, states), states


# ------------------------------------------------------------------------------------ tasks, metrics
def test_dense_tasks_are_derived_locally_with_their_metrics(shared_data):
    data, _, _ = build(parse_config(_cfg()))
    tasks = [c.task.name for c in data.clients]
    assert tasks == ["digit", "segment", "edge", "denoise"]
    digit, seg, edge, den = data.clients
    assert digit.y_train.shape == (len(digit.x_train),) and digit.y_train.max() <= 9
    assert np.array_equal(seg.y_train, (seg.x_train[:, 0] > 0.5).astype(np.int64))
    assert edge.y_train.shape == edge.x_train.shape and edge.y_train.min() >= 0 and edge.y_train.max() <= 1
    # denoising: the input is noisy, the target is the clean image in [0, 1]
    assert den.y_train.min() >= 0 and den.y_train.max() <= 1
    assert 0.25 < float(np.sqrt(((den.x_train - den.y_train) ** 2).mean())) < 0.35
    # a perfect mask has mIoU 1; PSNR of a 0.1 RMSE is 20 dB; a flat image has no edges
    y = torch.as_tensor(foreground(seg.x_test))
    logits = torch.stack([1 - y, y], 1).float()
    assert miou(logits, y) == (1.0, 1.0)
    assert psnr(0.01) == pytest.approx(20.0)
    assert sobel_magnitude(np.ones((1, 1, 6, 6), np.float32))[0, 0, 2:4, 2:4].max() == 0


def test_unknown_dense_task_is_a_one_line_config_error(shared_data):
    with pytest.raises(ConfigError, match=r"unknown task 'depth' for mnist_dense; allowed: digit, segment"):
        build(parse_config(_cfg(data__tasks=["digit", "depth"])))


# ------------------------------------------------------------------------------------ split = unsplit
def test_split_forward_backward_equals_the_unsplit_gradient(shared_data):
    """One step with SGD(lr=1) on client and server: every parameter moves by exactly its gradient
    of the whole model's loss (the server by the mean over clients)."""
    cfg = parse_config(
        _cfg(
            train__optimizer="sgd",
            train__lr=1.0,
            train__local_steps=1,
            algorithm={"name": "fedbone", "aggregation": "mean", "server_optimizer": "sgd", "server_lr": 1.0},
        )
    )
    data, algo, server, res, states = _one_round(cfg)
    new = res.server
    general = []
    for c in data.clients:
        model = algo.ctx.model_for(c.task.name)
        params = {
            k: torch.tensor(v, requires_grad=True) for k, v in algo.eval_arrays(server, {}, c.cid).items()
        }
        idx = batch_schedule(c.n_train, 8, 1, Stream(cfg.seed, TRAIN, 1, c.cid))[0]
        out = functional_call(model, params, (torch.as_tensor(c.x_train[idx]),))
        loss = task_loss(out, torch.as_tensor(c.y_train[idx]), c.task)
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
        start = algo.init_client(c.cid)["params"]
        moved = states[c.cid]["params"]
        for k in start:
            np.testing.assert_allclose(start[k] - moved[k], grads[k].numpy(), rtol=1e-4, atol=1e-6, err_msg=k)
        general.append({k: v.numpy() for k, v in grads.items() if part_of(k) == "general"})
    for k, v in server["params"].items():
        mean = np.mean([g[k] for g in general], axis=0)
        np.testing.assert_allclose(v - new["params"][k], mean, rtol=1e-4, atol=1e-6, err_msg=k)


def test_split_training_over_several_steps_equals_local_training_of_the_whole_model(shared_data):
    """One client, SGD on both sides: the round's split updates are ``local_train`` of the full model
    (same batches from the same rng, activations of each step from the updated embedding)."""
    cfg = parse_config(
        _cfg(
            data__tasks=["segment"],
            data__max_clients=1,
            train__optimizer="sgd",
            train__lr=0.1,
            train__local_steps=4,
            algorithm={"name": "fedbone", "server_optimizer": "sgd", "server_lr": 0.1},
        )
    )
    data, algo, server, res, states = _one_round(cfg)
    c = data.clients[0]
    new, summary = res.server, res.replies
    start = algo.eval_arrays(server, {}, 0)
    spec = algo.ctx.local.with_lr(0.1)
    params, loss, seen = local_train(
        algo.ctx.model_for(c.task.name), to_torch(start), c.x_train, c.y_train, c.task, spec, 4,
        Stream(cfg.seed, TRAIN, 1, 0),
    )  # fmt: skip
    assert summary[0].scalars["train_loss"] == pytest.approx(loss, rel=1e-5) and seen == 32
    split = algo.eval_arrays(new, states[0], 0)
    for k, v in params.items():
        np.testing.assert_allclose(split[k], v.numpy(), rtol=1e-4, atol=1e-6, err_msg=k)


# ------------------------------------------------------------------------------------ GPAggregation
def test_projection_removes_the_negative_component():
    rng = np.random.default_rng(0)
    g1 = {"w": rng.normal(size=(5, 4)), "b": rng.normal(size=3)}
    g2 = {"w": -g1["w"] + 0.3 * rng.normal(size=(5, 4)), "b": -g1["b"]}
    res = gp_aggregate([g1, g2], None, GPOptions(rescale=False))
    assert res.conflicts == 1 and res.conflict_rate == 1.0 and res.projections == 2
    flat = np.stack([np.concatenate([g["b"], g["w"].ravel()]) for g in (g1, g2)])
    proj, _ = project_conflicts(flat, np.random.default_rng(1))
    # after projection each gradient is orthogonal to (not against) the one it conflicted with
    assert proj[0] @ flat[1] == pytest.approx(0, abs=1e-10)
    assert proj[1] @ flat[0] == pytest.approx(0, abs=1e-10)
    agg = np.concatenate([res.aggregate["b"], res.aggregate["w"].ravel()])
    assert agg @ flat[0] >= 0 and agg @ flat[1] >= 0
    # many clients: every originally conflicting pair has a non-negative cosine after its projection
    g = rng.normal(size=(6, 50))
    g[3] = -g[0] + 0.1 * rng.normal(size=50)
    cos = cosine_matrix(g)
    for i in range(6):
        for j in range(6):
            if i != j and cos[i, j] < 0:
                gi = g[i] - (g[i] @ g[j]) / (g[j] @ g[j]) * g[j]
                assert gi @ g[j] == pytest.approx(0, abs=1e-9)
    out, n = project_conflicts(g, np.random.default_rng(2))
    assert n >= int((cos[np.triu_indices(6, 1)] < 0).sum())
    assert cosine_matrix(out)[0, 3] > cos[0, 3]


def test_rescaling_and_projection_off_is_the_plain_mean_and_attention_favours_the_history():
    rng = np.random.default_rng(3)
    grads = [{"w": rng.normal(size=7)} for _ in range(4)]
    plain = gp_aggregate(grads, None, GPOptions(rescale=False, project=False))
    np.testing.assert_allclose(plain.aggregate["w"], np.mean([g["w"] for g in grads], axis=0))
    hist = grads[2]["w"]
    att = attention_weights(np.stack([g["w"] for g in grads]), hist)
    assert att.sum() == pytest.approx(4) and att.argmax() == 2
    weighted = gp_aggregate(grads, None, GPOptions(rescale=False, project=False, weights=[1, 0, 0, 0]))
    np.testing.assert_allclose(weighted.aggregate["w"], grads[0]["w"])


def test_gp_aggregate_rescales_by_attention_to_the_history_and_projects_conflicts():
    """Hand-computed cases through ``gp_aggregate`` itself: removing the rescaling or the projection
    from it fails here."""
    g1, g2, hist = np.array([1.0, 0.0]), np.array([0.0, 2.0]), np.array([3.0, 0.0])
    e = np.e
    att = np.array([2 * e / (e + 1), 2 / (e + 1)])  # K softmax(cos(g, hist)) with cosines 1 and 0
    res = gp_aggregate([{"w": g1}, {"w": g2}], {"w": hist}, GPOptions(rescale=True, project=False))
    np.testing.assert_allclose(res.attention, att)
    np.testing.assert_allclose(res.aggregate["w"], (att[0] * g1 + att[1] * g2) / 2)
    assert not np.allclose(res.aggregate["w"], (g1 + g2) / 2)
    # a conflicting pair: a' = a - (a.b / |b|^2) b = [0.5, 0.5], b' = b - (b.a / |a|^2) a = [0, 1]
    a, b = np.array([1.0, 0.0]), np.array([-1.0, 1.0])
    res = gp_aggregate([{"w": a}, {"w": b}], None, GPOptions(rescale=False, project=True))
    np.testing.assert_allclose(res.aggregate["w"], [0.25, 0.75])
    assert res.projections == 2 and res.conflicts == 1
    # both: rescale first (history along a), then project the rescaled rows
    att2 = 2 * np.exp([1.0, -1 / np.sqrt(2)]) / np.exp([1.0, -1 / np.sqrt(2)]).sum()
    sa, sb = att2[0] * a, att2[1] * b
    pa = sa - (sa @ sb) / (sb @ sb) * sb
    pb = sb - (sb @ sa) / (sa @ sa) * sa
    res = gp_aggregate([{"w": a}, {"w": b}], {"w": a}, GPOptions(rescale=True, project=True))
    np.testing.assert_allclose(res.aggregate["w"], (pa + pb) / 2)


def test_fedbone_aggregates_with_the_previous_aggregate_as_history(shared_data):
    """FedBone's own aggregation step hands the history and its options to gp_aggregate."""
    cfg = parse_config(_cfg(train__local_steps=3))
    _, algo, _ = build(cfg)
    inner = algo.unwrapped()
    grads = {0: {"w": torch.tensor([1.0, 0.0])}, 1: {"w": torch.tensor([-1.0, 1.0])}}
    sizes = {0: 1.0, 1: 1.0}
    hist = {"w": np.array([1.0, 0.0])}
    agg, stats = inner._aggregate(grads, sizes, hist, np.random.default_rng(0))
    want = gp_aggregate(
        [{"w": g["w"].numpy()} for g in grads.values()], hist, GPOptions(), np.random.default_rng(0)
    )
    np.testing.assert_allclose(agg["w"], want.aggregate["w"])
    assert stats["attention_max"] > 1 > stats["attention_min"] and stats["projections"] == 2


# ------------------------------------------------------------------------------------ privacy
def test_no_label_or_raw_input_is_ever_in_a_message_to_the_server(shared_data):
    cfg = parse_config(_cfg(train__local_steps=3))
    data, algo, sim = build(cfg)
    up: list[tuple[int, str, Any]] = []
    deliver = sim.transport.exchange

    def recording(action, messages, plan):  # noqa: ANN001, ANN202
        got = deliver(action, messages, plan)
        up.extend((c, action, r) for c, r in got.replies.items())
        return got

    sim.transport.exchange = recording
    sim.run_round(1, algo.init_server(), {})
    assert {a for _, a, _ in up} == {"embed", "head", "backward"}
    allowed = {"steps", "num_examples", "flops_per_sample", "loss", "n", "done"}
    for cid, action, reply in up:
        c = data.clients[cid]
        assert set(reply.arrays) <= {"z", "df"}, (action, set(reply.arrays))
        assert set(reply.scalars) <= allowed, (action, set(reply.scalars))
        rows = [r for r in (*c.x_train, *(c.y_train if c.y_train.ndim > 1 else [])) if r.any()]
        for arr in reply.arrays.values():
            assert arr.shape[1:] != c.x_train.shape[1:] and arr.shape[1:] != c.y_train.shape[1:]
            assert arr.dtype == np.float32  # no integer labels or masks
            wire = arr.tobytes()
            assert not any(r.astype(np.float32).tobytes() in wire for r in rows)  # no image or target


# ------------------------------------------------------------------------------------ training
@pytest.mark.slow
def test_short_training_improves_every_task_on_mnist(shared_data, tmp_path):
    raw = _cfg(
        model={"name": "fedbone_net", "width": 16, "depth": 1},
        train={"rounds": 5, "local_steps": 10, "batch_size": 16, "optimizer": "adam", "lr": 0.005},
        eval={"every": 1},
    )
    raw["data"]["partition"]["num_clients"] = 200
    res = fedmtl.run(raw, out=tmp_path / "run")
    first, last = res.rounds[0], res.rounds[-1]
    assert last["task_digit_accuracy_mean"] > first["task_digit_accuracy_mean"] + 0.3
    assert last["task_segment_miou_mean"] > first["task_segment_miou_mean"] + 0.2
    assert last["task_edge_rmse_mean"] < 0.85 * first["task_edge_rmse_mean"]
    assert last["task_denoise_psnr_mean"] > first["task_denoise_psnr_mean"] + 2
    assert all(0 <= r["conflict_rate"] <= 1 for r in res.rounds)
    # split learning's traffic: activations + feature gradients up, features + dz down
    assert last["bytes_up"] > 0 and last["bytes_down"] > 0 and last["client_flops"] > 0


def test_the_server_holds_the_large_part_of_the_default_model():
    import fedmtl.algorithms  # noqa: F401  (registers fedbone_net)
    from fedmtl.fedbone.flops import part_flops
    from fedmtl.fedbone.model import FedBoneNet, FedBoneNetParams, count_params
    from fedmtl.fedbone.tasks import TASKS

    for task in TASKS.values():
        net = FedBoneNet((1, 28, 28), task.spec.num_outputs, FedBoneNetParams())
        client = sum(count_params(net, p) for p in ("embed", "adapter", "head"))
        assert count_params(net, "general") > 10 * client
        f = part_flops(net, (1, 28, 28))
        assert f["general"] > f["embed"] + f["adapter"] + f["head"]


# ------------------------------------------------------------------------------------ Flower
def test_flower_loopback_run_equals_the_simulator(shared_data, tmp_path):
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity

    from fedmtl.flower.server import FlowerServer
    from tests.test_flower import LoopbackGrid, _fast, _nodes, assert_same_metrics

    raw = _cfg(eval={"every": 1})
    sim = fedmtl.run(raw, out=tmp_path / "sim")
    grid = LoopbackGrid(_nodes(4))
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0  # what Flower's runtimes set
    try:
        FlowerServer(grid, parse_config(raw), _fast()).run(out=tmp_path / "flower")
    finally:
        TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None  # type: ignore[assignment]
    assert_same_metrics(sim.run_dir, tmp_path / "flower")
    assert any(kind == "train.head" for _, kind, _ in grid.log)


def test_fedbone_needs_the_split_model_and_wrappers_are_refused(shared_data):
    raw = {
        "data": {"dataset": "digits"},
        "model": {"name": "mlp"},
        "algorithm": {"name": "fedbone"},
        "output": {"progress": False},
    }
    with pytest.raises(
        ConfigError, match=r"^config: algorithm.name = 'fedbone': needs model.name = 'fedbone_net'"
    ):
        build(parse_config(raw))
    _, algo, _ = build(parse_config(_cfg()))

    class Noisy(AlgorithmWrapper):
        pass

    with pytest.raises(
        ConfigError, match="its rounds are a multi-step protocol whose exchanges Noisy cannot see"
    ):
        Noisy(algo)


def test_client_sharing_averages_client_parts_within_each_task_only(shared_data):
    cfg = parse_config(
        _cfg(
            data__max_clients=8, algorithm={"name": "fedbone", "client_sharing": "task"}, train__local_steps=1
        )
    )
    _, _, _, _, states = _one_round(cfg)
    params = {c: states[c]["params"] for c in range(8)}
    for c in range(4):  # clients c and c + 4 learn the same task
        assert all(np.array_equal(params[c][k], params[c + 4][k]) for k in params[c])
    assert not np.array_equal(params[0]["adapter.reduce.weight"], params[1]["adapter.reduce.weight"])
