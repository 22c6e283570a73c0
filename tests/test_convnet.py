"""The batched conv-net step (``fedmtl.training.convnet``): which models it takes, and the same
per-client updates as sequential training, on real MNIST images, for every way a request can
train (optimizers, frozen parts, personal starts, the proximal term, low-rank dense layers)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fedmtl.config import DataConfig, PartitionConfig, parse_config
from fedmtl.data import load_federated
from fedmtl.data.federated import TaskSpec
from fedmtl.models import build_model
from fedmtl.training import convnet
from fedmtl.training.batched import batched_local_train
from fedmtl.training.convnet import ConvNetStep, conv_program
from fedmtl.training.fused import linear_chain
from fedmtl.training.local import LocalSpec, local_train
from fedmtl.training.optim import OptimizerSpec

RTOL = 1e-5


def _cnn(**keys: Any) -> nn.Module:
    return build_model(parse_config({"model": {"name": "cnn", **keys}}).model, (1, 28, 28), 10, 0)


def test_conv_program_reads_the_cnn_presets_and_plain_sequentials():
    kinds = [op.kind for op in conv_program(_cnn(preset="femnist"))]
    assert kinds == ["conv", "relu", "pool", "conv", "relu", "pool", "flatten", "linear", "relu", "linear"]
    cifar = build_model(
        parse_config({"model": {"name": "cnn", "preset": "fedavg_cifar"}}).model, (3, 24, 24), 10, 0
    )
    assert [op.kind for op in conv_program(cifar)].count("lrn") == 2
    seq = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 13 * 13, 3))
    prog = conv_program(seq)
    assert prog is not None and prog[0].weight == "0.weight" and prog[0].args == ((2, 2), (0, 0))
    assert linear_chain(_cnn()) is None  # not an MLP: the chain step leaves it to this one


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2)),  # grouped filters
        nn.Sequential(nn.Conv2d(1, 2, 3, dilation=2), nn.Flatten(), nn.Linear(2, 2)),
        nn.Sequential(nn.Conv2d(1, 2, 3, padding="same"), nn.Flatten(), nn.Linear(2, 2)),
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2, ceil_mode=True), nn.Flatten(), nn.Linear(2, 2)),
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2), nn.Sigmoid()),
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(2, 2)),  # no Flatten
        nn.Sequential(nn.Flatten(), nn.Linear(4, 2)),  # an MLP
        nn.Sequential(nn.ReLU(), nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2)),  # not a conv first
    ],
    ids=["groups", "dilation", "same-padding", "ceil-pool", "sigmoid", "no-flatten", "mlp", "relu-first"],
)
def test_conv_program_refuses_what_it_does_not_compute(model):
    assert conv_program(model) is None


class _OwnForward(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_a_subclass_is_never_assumed_to_be_a_plain_sequence():
    assert conv_program(_OwnForward(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2))) is None


@pytest.fixture(scope="module")
def mnist_clients() -> tuple[list[np.ndarray], list[np.ndarray], TaskSpec]:
    """Five MNIST clients of 13 to 37 training images (below, at and above two batches of 10)."""
    from fedmtl.data import resolve_data_dir

    if resolve_data_dir(None) is None:
        pytest.skip("../shared/data not present")
    data = load_federated(
        DataConfig(
            dataset="mnist",
            test_fraction=0.1,
            partition=PartitionConfig(kind="resample", num_clients=5, samples=(15, 42), alpha=0.5),
        ),
        0,
    )
    return [c.x_train for c in data.clients], [c.y_train for c in data.clients], data.task


def _small_cnn(preset: str | None = None) -> nn.Module:
    """The presets' layer sequences at a size a test trains in seconds (6 and 8 filters, 5x5, a
    24-unit dense layer)."""
    keys = {"channels": [6, 8], "kernel": 5, "fc": [24]} if preset is None else {"preset": preset}
    return _cnn(**keys)


def _steps(ys: list[np.ndarray], epochs: float = 1.0) -> list[int]:
    return [max(1, math.ceil(epochs * math.ceil(len(y) / 10))) for y in ys]


def _close(a: Any, b: Any, start: Any, rtol: float = RTOL) -> None:
    a, b, start = torch.as_tensor(a), torch.as_tensor(b), torch.as_tensor(start)
    scale = float((b - start).abs().max()) + 1e-12
    assert float((a - b).abs().max()) <= rtol * scale + 1e-7


def _compare(
    model: nn.Module,
    clients: tuple[list[np.ndarray], list[np.ndarray], TaskSpec],
    opt: OptimizerSpec,
    *,
    trainable: list[str] | None = None,
    mu: float = 0.0,
    personal: bool = False,
    rtol: float = RTOL,
    dtype: torch.dtype = torch.float32,
) -> Any:
    xs, ys, task = clients
    if dtype != torch.float32:
        model = model.to(dtype)
        xs = [x.astype(np.float64) for x in xs]
    base = {k: v.detach().clone() for k, v in model.named_parameters()}
    n = len(xs)
    starts = [{k: v + 0.01 * i for k, v in base.items()} for i in range(n)] if personal else [base] * n
    centers = None
    if mu:
        centers = [{k: v - 0.02 * i for k, v in base.items()} for i in range(n)] if personal else [base] * n
    spec = LocalSpec(optimizer=opt, batch_size=10)
    steps = _steps(ys)
    rngs = lambda: [np.random.default_rng([7, i]) for i in range(n)]  # noqa: E731
    res = batched_local_train(
        model,
        starts,
        xs,
        ys,
        task,
        spec,
        steps,
        rngs(),
        trainable=trainable,
        prox_centers=centers,
        prox_mu=mu,
    )
    for i, rng in enumerate(rngs()):
        params, loss, seen = local_train(
            model, starts[i], xs[i], ys[i], task, spec, steps[i], rng, trainable=trainable,
            prox_center=centers[i] if centers else None, prox_mu=mu,
        )  # fmt: skip
        assert res.seen[i] == seen
        assert res.loss[i] == pytest.approx(loss, rel=max(rtol, 1e-6))  # losses are summed in float32
        for k, v in params.items():
            _close(res.arrays(i)[k], v, starts[i][k], rtol)
        for k in set(base) - set(trainable or base):  # frozen keys never move
            assert torch.equal(torch.as_tensor(res.arrays(i)[k]), starts[i][k])
    return res


class _Calls:
    """Counts the conv step's calls and the steps its low-rank layers take."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.steps = 0
        self.low_rank = 0
        step, low = ConvNetStep.__call__, convnet._LowRank.apply

        def counted_step(this: ConvNetStep, *a: Any) -> torch.Tensor:
            self.steps += 1
            return step(this, *a)

        def counted_low(*a: Any) -> torch.Tensor:
            self.low_rank += 1
            return low(*a)

        monkeypatch.setattr(ConvNetStep, "__call__", counted_step)
        monkeypatch.setattr(convnet._LowRank, "apply", counted_low)


CASES = [
    # (optimizer, trainable, mu, personal starts, low rank allowed)
    (OptimizerSpec(lr=0.05), None, 0.0, False, True),
    (OptimizerSpec(lr=0.05), None, 0.0, True, True),
    (OptimizerSpec(lr=0.05), None, 0.0, False, False),
    (OptimizerSpec(lr=0.05, momentum=0.9, weight_decay=1e-3), None, 0.3, True, True),
    (OptimizerSpec(lr=0.05), ["head.weight", "head.bias"], 0.0, False, True),
    (
        OptimizerSpec(lr=0.05),
        ["body.0.weight", "body.0.bias", "body.3.weight", "body.3.bias", "body.7.weight", "body.7.bias"],
        0.0,
        True,
        True,
    ),
    (
        OptimizerSpec(lr=0.05),
        ["body.0.weight", "body.3.weight", "body.7.weight", "head.weight"],
        0.0,
        False,
        True,
    ),
]
CASE_IDS = [
    "sgd-low-rank",
    "sgd-low-rank-personal-starts",
    "sgd-dense",
    "momentum-wd-prox",
    "head-only",
    "body-only-personal",
    "weights-only",
]


@pytest.mark.parametrize("opt, trainable, mu, personal, low", CASES, ids=CASE_IDS)
def test_conv_step_gives_every_client_what_local_train_gives_it(
    mnist_clients, monkeypatch, opt, trainable, mu, personal, low
):
    """Ragged MNIST clients (13-37 images, batch 10: short last batches and stragglers), the conv
    step against ``local_train`` client by client; the dense layers as low-rank updates (where
    plain SGD allows) or updated in place."""
    monkeypatch.setattr(convnet, "LOW_RANK_SHARE", 10.0 if low else 0.0)
    calls = _Calls(monkeypatch)
    _compare(_small_cnn(), mnist_clients, opt, trainable=trainable, mu=mu, personal=personal)
    assert calls.steps == max(_steps(mnist_clients[1]))
    plain_sgd = opt.momentum == 0 and opt.weight_decay == 0 and mu == 0
    assert (calls.low_rank > 0) == (low and plain_sgd)  # every case trains a dense weight


def test_conv_step_with_adam_in_double_precision(mnist_clients):
    """Adam divides each gradient by its running magnitude, so where a gradient is near zero it
    magnifies float32 rounding a hundredfold (the generic vmapped step misses 1e-5 by as much);
    in float64 the same arithmetic must agree to 1e-9."""
    _compare(
        _small_cnn(), mnist_clients, OptimizerSpec(name="adam", lr=0.005), rtol=1e-9, dtype=torch.float64
    )


def test_fedavg_cifar_layers_lrn_and_strided_pooling(monkeypatch):
    """The CIFAR preset's 3x3 stride-2 pooling and local response normalisation, on colour images,
    in float64: with 64 filters on 24x24 images, some pre-activation lands within float32 rounding
    of zero in a few steps, and two summation orders then pass its ReLU differently (here one
    unit in 2.8 million: 3e-3 of one filter's update, where float64 is exact to 1e-9)."""
    rng = np.random.default_rng(3)
    sizes = [12, 25, 7]
    xs = [rng.random((n, 3, 24, 24), dtype=np.float32) for n in sizes]
    ys = [rng.integers(0, 10, n) for n in sizes]
    model = build_model(
        parse_config({"model": {"name": "cnn", "preset": "fedavg_cifar"}}).model, (3, 24, 24), 10, 0
    )
    calls = _Calls(monkeypatch)
    task = TaskSpec("classification", 10)
    _compare(model, (xs, ys, task), OptimizerSpec(lr=0.05), rtol=1e-9, dtype=torch.float64)
    # three steps; both dense layers (2304 -> 384 -> 192) are small against their weights at rank 25
    assert calls.steps == 3 and calls.low_rank == 2 * 3


def test_groups_split_by_the_memory_budget_give_the_same_result(mnist_clients):
    xs, ys, task = mnist_clients
    model = _small_cnn()
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    spec = LocalSpec(optimizer=OptimizerSpec(lr=0.05), batch_size=10)
    rngs = lambda: [np.random.default_rng(i) for i in range(len(xs))]  # noqa: E731
    one = batched_local_train(model, [start] * len(xs), xs, ys, task, spec, _steps(ys), rngs())
    split = batched_local_train(
        model, [start] * len(xs), xs, ys, task, spec, _steps(ys), rngs(), memory_bytes=1
    )
    assert len(one.groups) == 1 and len(split.groups) == len(xs)
    for i in range(len(xs)):
        for k in start:
            np.testing.assert_allclose(one.arrays(i)[k], split.arrays(i)[k], rtol=RTOL, atol=1e-7)
