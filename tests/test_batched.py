"""Batched client execution: the same updates and metrics as sequential execution, and fallbacks."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import fedmtl
from fedmtl.algorithms import algorithm_names, get_algorithm
from fedmtl.config import parse_config
from fedmtl.data.federated import TaskSpec
from fedmtl.errors import ConfigError
from fedmtl.experiment.run import build
from fedmtl.runtime import Simulator
from fedmtl.training.batched import _shared_base, batch_support, batched_local_train
from fedmtl.training.fused import linear_chain
from fedmtl.training.local import LocalSpec, local_train
from fedmtl.training.optim import OptimizerSpec
from tests.conftest import copy_checkpoint, digits_config

RTOL = 1e-5

# Ragged clients: sizes below, at and above the batch size; steps from 1 to several epochs.
SIZES = [3, 8, 17, 40, 25]
STEPS = [2, 1, 5, 9, 3]


def _mlp(out: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, out)).eval()


def _clients(task: TaskSpec) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(n, 6)).astype(np.float32) for n in SIZES]
    if task.is_classification:
        ys = [rng.integers(0, task.num_outputs, n) for n in SIZES]
    else:  # one target per sample, or several (shape [n, outputs])
        shape = (lambda n: (n,)) if task.num_outputs == 1 else (lambda n: (n, task.num_outputs))
        ys = [rng.normal(size=shape(n)).astype(np.float32) for n in SIZES]
    return xs, ys


def _one_array(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """The same arrays as row blocks of one array, stored in reverse order."""
    whole = np.concatenate(arrays[::-1])
    ends = np.cumsum([len(a) for a in arrays[::-1]])
    return [whole[e - len(a) : e] for a, e in zip(arrays[::-1], ends, strict=True)][::-1]


def _rngs() -> list[np.random.Generator]:
    return [np.random.default_rng([7, i]) for i in range(len(SIZES))]


def _close(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, start: torch.Tensor) -> None:
    """Updates (end - start) agree to RTOL relative to the update's size."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    scale = float((a - start).abs().max()) + 1e-12
    assert float((a - b).abs().max()) <= RTOL * scale + 1e-7


@pytest.mark.parametrize(
    "opt, trainable, mu, kind",
    [
        (OptimizerSpec(lr=0.1), None, 0.0, "classification"),
        (OptimizerSpec(lr=0.1, momentum=0.9, weight_decay=1e-3), None, 0.3, "classification"),
        (OptimizerSpec(name="adam", lr=0.01), ["3.weight", "3.bias"], 0.0, "classification"),
        (OptimizerSpec(lr=0.05, momentum=0.5), ["1.weight", "1.bias"], 0.5, "regression"),
        (OptimizerSpec(name="adam", lr=0.01), None, 0.0, "regression-3"),
    ],
    ids=["sgd", "momentum-wd-prox", "adam-head-only", "regression-body-only-prox", "adam-3-targets"],
)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "vmap"])
@pytest.mark.parametrize("layout", ["separate", "one-array"])
def test_trainer_matches_local_train_per_client(opt, trainable, mu, kind, fused, layout):
    """Both batched steps (the hand-written one for Linear/ReLU chains and the generic vmapped
    autograd one), with client data in separate arrays (concatenated for the group) or as row
    blocks of one array (read in place, blocks out of order), give every client what
    ``local_train`` gives it."""
    outputs = {"classification": 4, "regression": 1, "regression-3": 3}[kind]
    task = TaskSpec(kind.split("-")[0], outputs)
    model = _mlp(task.num_outputs)
    base = {k: v.detach().clone() for k, v in model.named_parameters()}
    # Personal starts (as under Local/Ditto) and per-client proximal centres exercise the stacked paths.
    starts = [{k: v + 0.01 * i for k, v in base.items()} for i in range(len(SIZES))]
    centers = [{k: v - 0.02 * i for k, v in base.items()} for i in range(len(SIZES))]
    xs, ys = _clients(task)
    if layout == "one-array":
        xs, ys = _one_array(xs), _one_array(ys)
        assert _shared_base(xs) is not None and _shared_base(ys) is not None
    else:
        assert _shared_base(xs) is None
    spec = LocalSpec(optimizer=opt, batch_size=8)
    res = batched_local_train(
        model, starts, xs, ys, task, spec, STEPS, _rngs(), trainable=trainable,
        prox_centers=centers if mu else None, prox_mu=mu, fused=fused,
    )  # fmt: skip
    for i, rng in enumerate(_rngs()):
        params, loss, seen = local_train(
            model, starts[i], xs[i], ys[i], task, spec, STEPS[i], rng, trainable=trainable,
            prox_center=centers[i] if mu else None, prox_mu=mu,
        )  # fmt: skip
        assert res.seen[i] == seen
        assert res.loss[i] == pytest.approx(loss, rel=RTOL)
        for k, v in params.items():
            _close(res.params(i)[k], v, starts[i][k])
        if trainable is not None:  # frozen keys never move
            for k in set(base) - set(trainable):
                assert torch.equal(torch.as_tensor(res.arrays(i)[k]), starts[i][k])


def test_fused_step_on_deeper_chains_with_a_shared_frozen_layer():
    """Three layers, a ReLU on the output, the first layer frozen and shared by every client (the
    FedRep head phase), momentum and weight decay: the hand-written step still equals autograd."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(6, 9), nn.ReLU(), nn.Sequential(nn.Linear(9, 7), nn.ReLU()),
        nn.Linear(7, 4), nn.ReLU(),
    ).eval()  # fmt: skip
    assert [layer.relu for layer in linear_chain(model)] == [True, True, True]
    task = TaskSpec("classification", 4)
    base = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainable = [k for k in base if not k.startswith("1.")]
    starts = [{k: (v if k.startswith("1.") else v + 0.01 * i) for k, v in base.items()} for i in range(5)]
    xs, ys = _clients(task)
    spec = LocalSpec(optimizer=OptimizerSpec(lr=0.1, momentum=0.9, weight_decay=1e-3), batch_size=8)
    res = batched_local_train(model, starts, xs, ys, task, spec, STEPS, _rngs(), trainable=trainable)
    assert not res.groups[0].stacked.keys() & {"1.weight", "1.bias"}  # shared, not stacked
    for i, rng in enumerate(_rngs()):
        params, loss, _ = local_train(model, starts[i], xs[i], ys[i], task, spec, STEPS[i], rng, trainable)
        assert res.loss[i] == pytest.approx(loss, rel=RTOL)
        for k, v in params.items():
            _close(res.params(i)[k], v, starts[i][k])


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_fused_step_views_bound_once_read_each_steps_new_inputs(layout):
    """The fused step keeps its views from step to step, keyed by the memory they point into: a
    buffer refilled with the next batch (as the trainer does), a strided input that has to be
    copied, and more step shapes than it keeps must all give what a fresh step gives."""
    from fedmtl.training.fused import _MAX_BINDINGS, FusedChainStep

    model = _mlp()
    chain = linear_chain(model)
    task = TaskSpec("classification", 4)
    opt = OptimizerSpec(lr=0.1)
    keys = [k for k, _ in model.named_parameters()]
    make = lambda: FusedChainStep(chain, task, opt, set(keys), 0.0)  # noqa: E731
    kept, rng = make(), np.random.default_rng(0)
    k = 3
    ours = {n: p.detach().repeat(k, *[1] * p.dim()).contiguous() for n, p in model.named_parameters()}
    fresh = {n: v.clone() for n, v in ours.items()}
    steps = _MAX_BINDINGS + 6
    buf_x, buf_y = torch.empty((steps + k * 8) * 6), torch.empty(k * 8, dtype=torch.int64)
    for step in range(steps):
        # The same shape and memory four times, then a new start address every step (more keys
        # than the step keeps, so it clears them) with varying widths.
        width, at = (8, 0) if step < 4 else (1 + step % 7, 6 * step)
        x = buf_x[at : at + k * width * 6].view(k, width, 6)
        if layout == "strided":  # 2x3 "images" read transposed: flattening them must copy
            x = buf_x[at : at + k * width * 6].view(k, width, 3, 2).mT
        x.copy_(torch.as_tensor(rng.normal(size=x.shape), dtype=torch.float32))
        y = buf_y[: k * width].view(k, width)
        y.copy_(torch.as_tensor(rng.integers(0, 4, (k, width))))
        scale = torch.full((k, width), 1.0 / width)
        got = kept(ours, {}, {}, x, y, scale, {})
        want = make()(fresh, {}, {}, x, y, scale, {})
        assert torch.equal(got, want), step
    assert 0 < len(kept._bindings) < _MAX_BINDINGS if layout == "contiguous" else not kept._bindings
    for n in ours:
        assert torch.equal(ours[n], fresh[n])


def test_linear_chain_recognises_only_plain_chains():
    cfg = lambda name, **kw: parse_config({"model": {"name": name, **kw}}).model  # noqa: E731
    from fedmtl.models import build_model

    mlp = linear_chain(build_model(cfg("mlp", hidden=[20, 10]), (1, 8, 8), 10, 0))
    assert [(layer.weight, layer.relu) for layer in mlp] == [
        ("body.1.weight", True), ("body.3.weight", True), ("head.weight", False),
    ]  # fmt: skip
    assert linear_chain(build_model(cfg("linear"), (1, 8, 8), 10, 0))[0].bias == "head.bias"
    for name in ("cnn", "autoencoder"):
        assert linear_chain(build_model(cfg(name), (1, 8, 8), 10, 0)) is None
    assert linear_chain(_Branchy()) is None  # its own forward: never assumed to be a chain
    assert linear_chain(nn.Sequential(nn.Linear(4, 4), nn.Flatten())) is None


def test_memory_budget_splits_into_groups_with_the_same_result():
    task = TaskSpec("classification", 4)
    model = _mlp()
    start = {k: v.detach().numpy().copy() for k, v in model.named_parameters()}
    xs, ys = _clients(task)
    spec = LocalSpec(optimizer=OptimizerSpec(lr=0.1, momentum=0.9), batch_size=8)
    one = batched_local_train(model, [start] * 5, xs, ys, task, spec, STEPS, _rngs())
    split = batched_local_train(model, [start] * 5, xs, ys, task, spec, STEPS, _rngs(), memory_bytes=1)
    assert len(one.groups) == 1 and len(split.groups) == 5
    for i in range(5):
        for k in start:
            np.testing.assert_allclose(one.arrays(i)[k], split.arrays(i)[k], rtol=RTOL, atol=1e-7)
    np.testing.assert_allclose(one.loss, split.loss, rtol=RTOL)
    # The shared start is never written to: trained parameters live in fresh stacks.
    assert all(np.array_equal(start[k], v.detach().numpy()) for k, v in model.named_parameters())


def test_cnn_trains_batched_like_sequential():
    cfg = parse_config(digits_config(model={"name": "cnn", "channels": [4], "fc": 16}))
    data, algo, _ = build(cfg)
    clients = data.clients[:3]
    start = algo.ctx.init_arrays
    spec = algo.ctx.local
    res = batched_local_train(
        algo.ctx.model, [start] * 3, [c.x_train for c in clients], [c.y_train for c in clients],
        data.task, spec, [4, 2, 3], [np.random.default_rng(i) for i in range(3)],
    )  # fmt: skip
    for i, c in enumerate(clients):
        tstart = {k: torch.as_tensor(v) for k, v in start.items()}
        params, loss, _ = local_train(
            algo.ctx.model,
            tstart,
            c.x_train,
            c.y_train,
            data.task,
            spec,
            [4, 2, 3][i],
            np.random.default_rng(i),
        )
        assert res.loss[i] == pytest.approx(loss, rel=RTOL)
        for k, v in params.items():
            _close(res.params(i)[k], v, tstart[k])


HETEROGENEOUS = {"runtime__work_fraction": [0.2, 1.0], "runtime__drop_prob": 0.25, "clients__per_round": 6}


def _config(algorithm: dict[str, Any], execution: str, **kw: Any) -> dict[str, Any]:
    cfg = digits_config(algorithm=algorithm, **{"train__rounds": 3, **HETEROGENEOUS, **kw})
    cfg["runtime"]["execution"] = execution
    return cfg


TASKS = {"data__tasks": ["digit", "parity", "ge5", "ink"]}
TWO_TASKS = {"data__tasks": [["digit", "ink"]]}
MIXED_TASKS = {"data__tasks": [["digit", "ink"], ["parity"], ["digit", "ge5"]]}
#: Registered algorithms the executors cannot batch, and why: each declares ``batchable = False``
#: (checked below), so the simulator trains its clients one after another.
NOT_BATCHABLE = {
    "mocha": "its clients run SDCA on their dual subproblem, a solver of their own, not declared training",
    "fedbone": "its clients train in split steps driven by the server's exchanges",
    "fdrmfl": "its clients train on a multi-modal objective with a loop of their own",
}
#: Chosen settings and the multi-task federations of the personalised algorithms; every other
#: registered algorithm joins the grid below with its defaults, so a new one is checked the day
#: it is registered: written once, run by both executors.
VARIANTS = [
    ({"name": "fedavg"}, {}),
    ({"name": "fedprox", "mu": 0.1}, {}),
    ({"name": "local"}, {}),
    ({"name": "fedavg_ft", "finetune_steps": 3}, {}),
    ({"name": "fedper"}, {}),
    ({"name": "fedrep", "head_epochs": 2.0}, {}),
    ({"name": "ditto", "lam": 0.5, "personal_epochs": 2.0}, {}),
    ({"name": "hierarchical"}, {}),
    ({"name": "fedper"}, TASKS),
    ({"name": "ditto", "lam": 0.5}, TASKS),
    ({"name": "hierarchical"}, TASKS),
    ({"name": "apfl"}, {}),
    ({"name": "apfl", "adaptive": False}, TASKS),
    ({"name": "lg_fedavg"}, {}),
    ({"name": "lg_fedavg"}, TASKS),
    ({"name": "fedbabu", "finetune_steps": 3}, {}),
    # several tasks per client: the digit class and the ink regression on the same images, and a
    # federation whose clients hold different sets of them
    ({"name": "fedavg"}, TWO_TASKS),
    ({"name": "apfl"}, TWO_TASKS),
    ({"name": "fedper"}, MIXED_TASKS),
]
_CHOSEN = {a["name"] for a, _ in VARIANTS}
CLASSIC = VARIANTS + [
    ({"name": name}, {}) for name in algorithm_names() if name not in _CHOSEN and name not in NOT_BATCHABLE
]
_KIND = {id(TASKS): "-tasks", id(TWO_TASKS): "-two-tasks", id(MIXED_TASKS): "-task-sets"}
CLASSIC_IDS = [a["name"] + _KIND.get(id(kw), "") for a, kw in CLASSIC]


def test_every_registered_algorithm_is_in_the_equality_grid_or_declares_why_not():
    for name in algorithm_names():
        assert get_algorithm(name).batchable == (name not in NOT_BATCHABLE), name
        assert name in NOT_BATCHABLE or any(a["name"] == name for a, _ in CLASSIC), name


def _array_dicts(state: dict[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """The parts of a client state that are parameter dicts (own model, head, personal model)."""
    return {
        k: v
        for k, v in state.items()
        if isinstance(v, dict) and all(isinstance(a, np.ndarray) for a in v.values())
    }


#: A small CNN for the digits federations: every algorithm that batches trains it batched too.
SMALL_CNN = {"name": "cnn", "channels": [4, 6], "fc": [16]}


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("algorithm, extra", CLASSIC, ids=CLASSIC_IDS)
def test_batched_round_gives_the_same_client_updates(algorithm, extra, model, monkeypatch):
    """Ragged Dirichlet clients, stragglers doing 20-100% of their steps, and dropouts; with an
    MLP (the chain step) and a CNN (the conv-net step, ``fedmtl.training.convnet``, which every
    request with the task loss takes: all of them but APFL's mixture objective)."""
    from fedmtl.training.convnet import ConvNetStep

    conv_steps = []
    step = ConvNetStep.__call__
    monkeypatch.setattr(ConvNetStep, "__call__", lambda self, *a: conv_steps.append(1) or step(self, *a))
    if model == "cnn":
        extra = {**extra, "model": SMALL_CNN}
    runs = {}
    for execution in ("sequential", "batched"):
        _, algo, sim = build(parse_config(_config(algorithm, execution, **extra)))
        assert sim.execution == execution
        runs[execution] = (sim, algo.init_server(), {})
    conv_steps.clear()  # building probed the model with one tiny batched step
    assert len({c.n_train for c in runs["batched"][0].data.clients}) > 3  # genuinely ragged
    steps_seen, dropped = set(), 0
    for r in (1, 2):
        out = {}
        for execution, (sim, server, states) in runs.items():
            out[execution] = sim.run_round(r, server, states)
            runs[execution] = (sim, out[execution].server, states)
        seq, bat = out["sequential"], out["batched"]
        assert seq.replies.keys() == bat.replies.keys()
        dropped += seq.info["dropped"]
        steps_seen |= {row["steps"] for row in seq.train_rows if not row["dropped"]}
        for cid, reply in seq.replies.items():
            other = bat.replies[cid]
            assert other.scalars["steps"] == reply.scalars["steps"]
            assert other.scalars["samples"] == reply.scalars["samples"]
            assert other.scalars["train_loss"] == pytest.approx(reply.scalars["train_loss"], rel=RTOL)
            for k, v in reply.arrays.items():
                np.testing.assert_allclose(other.arrays[k], v, rtol=RTOL, atol=1e-6)
        seq_states, bat_states = runs["sequential"][2], runs["batched"][2]
        assert seq_states.keys() == bat_states.keys()
        for cid, st in seq_states.items():
            for k, v in st.get("params", {}).items():
                np.testing.assert_allclose(bat_states[cid]["params"][k], v, rtol=RTOL, atol=1e-6)
            parts = _array_dicts(st)
            assert parts.keys() == _array_dicts(bat_states[cid]).keys()
            for part, arrays in parts.items():
                for k, v in arrays.items():
                    np.testing.assert_allclose(bat_states[cid][part][k], v, rtol=RTOL, atol=1e-6)
    assert dropped > 0 and len(steps_seen) > 2
    # several tasks per client: the heads sit side by side (TaskHeads), which a conv-net program
    # does not describe, so those clients take the generic vmapped step (same numbers, above)
    several = extra.get("data__tasks") in (TWO_TASKS["data__tasks"], MIXED_TASKS["data__tasks"])
    assert bool(conv_steps) == (model == "cnn" and algorithm["name"] != "apfl" and not several)


@pytest.mark.parametrize("algorithm, extra", CLASSIC, ids=CLASSIC_IDS)
def test_batched_run_gives_the_same_metrics(tmp_path, algorithm, extra):
    seq = fedmtl.run(_config(algorithm, "sequential", **extra), out=tmp_path / "s")
    bat = fedmtl.run(_config(algorithm, "batched", **extra), out=tmp_path / "b")
    skip = {"wall_time", "execution"}
    for a, b in zip(seq.rounds, bat.rounds, strict=True):
        assert a["execution"] == "sequential" and b["execution"] == "batched"
        for k, v in a.items():
            if k in skip:
                continue
            if isinstance(v, float):
                # a spread over clients of O(1) metrics inherits their absolute error, not its own
                spread = k.endswith("_std") and abs(v) < 0.1
                assert b[k] == pytest.approx(v, rel=RTOL, abs=RTOL * 0.1 if spread else 1e-7), k
            else:
                assert b[k] == v, k
    for a, b in zip(seq.clients, bat.clients, strict=True):
        for k, v in a.items():
            assert b[k] == (pytest.approx(v, rel=RTOL, abs=1e-7) if isinstance(v, float) else v), k


# ------------------------------------------------------------------------------------ fallbacks


class _Branchy(nn.Module):
    """Data-dependent control flow: fine one client at a time, impossible under vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(x.flatten(1))
        return out if out.sum() > 0 else -out


def test_batch_support_names_the_reason():
    task = TaskSpec("classification", 10)
    x = np.zeros((4, 1, 8, 8), dtype=np.float32)
    y = np.zeros(4, dtype=np.int64)
    assert batch_support(_mlp(10).__class__(nn.Flatten(), nn.Linear(64, 10)), task, x, y) is None
    reason = batch_support(_Branchy().eval(), task, x, y)
    assert reason is not None and reason.startswith("model _Branchy cannot be batched")


def _own_solver(raw: dict[str, Any]) -> tuple[Any, Any]:
    """A FedAvg whose client step is its own solver (no declared local work to stack)."""
    from fedmtl.algorithms.fedavg import FedAvg

    class Solver(FedAvg):
        name = "solver"
        batchable = False

    data, algo, _ = build(parse_config(raw))
    return data, Solver(algo.p, algo.ctx)


def _notices(caplog) -> list[str]:
    """What the ``fedmtl`` logger said since the last call (and forget it)."""
    out = [r.getMessage() for r in caplog.records if r.name == "fedmtl"]
    caplog.clear()
    return out


def test_auto_falls_back_to_sequential_with_one_notice(caplog):
    cfg = parse_config(_config({"name": "fedavg"}, "auto"))
    data, algo = _own_solver(cfg.to_dict())
    sim = Simulator(algo, data, cfg, 1.0)
    assert sim.execution == "sequential"
    server, states = algo.init_server(), {}
    for r in (1, 2):
        server = sim.run_round(r, server, states).server
    err = _notices(caplog)
    assert len(err) == 1
    assert (
        "runtime.execution = 'auto'" in err[0] and "algorithm 'solver' trains with its own solver" in err[0]
    )

    # An unbatchable model falls back too; a batchable setup picks batched silently.
    _, plain, _ = build(cfg)
    plain.ctx.models = {}
    plain.ctx.model = _Branchy().eval()
    assert Simulator(plain, data, cfg, 1.0).execution == "sequential"
    assert "model _Branchy cannot be batched" in _notices(caplog)[0]
    assert build(cfg)[2].execution == "batched"
    assert _notices(caplog) == []


def test_batched_on_unsupported_algorithm_is_a_config_error(tmp_path):
    cfg = parse_config(_config({"name": "fedavg"}, "batched"))
    data, algo = _own_solver(cfg.to_dict())
    with pytest.raises(
        ConfigError, match=r"runtime.execution = 'batched': algorithm 'solver' trains with its own"
    ):
        Simulator(algo, data, cfg, 1.0)


def test_derived_rng_fast_path_draws_the_default_rng_stream():
    """The simulator builds 2 rngs per client and round; its fast construction must not change them."""
    from fedmtl.runtime.simulation import derived_rng

    for keys in [(0, 3, 1, 0), (7, 2, 12, 9999), (2**32 - 1, 1, 5, 3), (2**40 + 3, 3, 2, 1)]:
        expect = np.random.default_rng(list(keys)).random(5)
        np.testing.assert_array_equal(derived_rng(*keys).random(5), expect)


def test_batched_run_resumes_to_the_uninterrupted_metrics(tmp_path):
    """A batched run continued from its round-2 checkpoint ends exactly where a full run does."""
    from fedmtl.experiment.records import RunDir

    def cfg(rounds: int) -> dict[str, Any]:
        raw = _config({"name": "fedprox", "mu": 0.1}, "batched", train__rounds=rounds)
        raw["output"] = {"progress": False, "checkpoint_every": 2}
        return raw

    full = fedmtl.run(cfg(4), out=tmp_path / "full")
    short = fedmtl.run(cfg(2), out=tmp_path / "short")
    part = tmp_path / "part"
    part.mkdir()
    (part / "config.yaml").write_bytes((full.run_dir / "config.yaml").read_bytes())
    rd = RunDir(part)
    rd.append([r for r in RunDir(full.run_dir).read_metrics() if r["round"] <= 2])
    copy_checkpoint(short.run_dir, part)
    fedmtl.resume(part)
    volatile = {"wall_time", "compute_wall"}
    stable = lambda rows: [{k: v for k, v in r.items() if k not in volatile} for r in rows]  # noqa: E731
    assert stable(rd.read_metrics()) == stable(RunDir(full.run_dir).read_metrics())


@pytest.mark.parametrize(
    "n, bs, steps", [(35, 32, 2), (35, 32, 1), (7, 32, 5), (64, 32, 2), (10, 3, 9), (5, 5, 3)]
)
def test_batch_order_and_lengths_match_the_schedule(n, bs, steps):
    """Batched execution lays out mini-batches from ``batch_order`` and ``batch_lengths``: the same
    indices, in the same batches, as ``batch_schedule`` draws for sequential execution."""
    from fedmtl.training.local import batch_lengths, batch_order, batch_schedule

    schedule = batch_schedule(n, bs, steps, np.random.default_rng(5))
    np.testing.assert_array_equal(
        batch_order(n, bs, steps, np.random.default_rng(5)), np.concatenate(schedule)
    )
    lens = batch_lengths(np.array([n, 1]), bs, np.array([steps, 1]))
    assert lens[0].tolist() == [len(b) for b in schedule]
    assert lens[1].tolist() == [1] + [0] * (steps - 1)


def test_batch_orders_are_every_clients_batch_order_from_the_same_draws():
    """The bulk orders (one shared array shuffled slice by slice) equal ``batch_order`` per client,
    for whole epochs, stragglers that stop inside their epoch and clients training several
    epochs, and leave every rng in the same state (later draws agree too)."""
    from fedmtl.training.local import batch_order, batch_orders

    sizes = [35, 20, 7, 64, 10, 5, 50, 1]
    steps = [2, 1, 5, 1, 9, 3, 2, 4]
    bulk = [np.random.default_rng([3, i]) for i in range(len(sizes))]
    each = [np.random.default_rng([3, i]) for i in range(len(sizes))]
    order, lengths = batch_orders(sizes, 32, steps, bulk)
    expected = [batch_order(n, 32, s, r) for n, s, r in zip(sizes, steps, each, strict=True)]
    np.testing.assert_array_equal(order, np.concatenate(expected))
    assert lengths.tolist() == [len(e) for e in expected]
    assert [r.integers(1 << 30) for r in bulk] == [r.integers(1 << 30) for r in each]
    whole, lengths = batch_orders([30, 12], 32, [1, 1], [np.random.default_rng(i) for i in (1, 2)])
    perms = [np.random.default_rng(1).permutation(30), np.random.default_rng(2).permutation(12)]
    np.testing.assert_array_equal(whole, np.concatenate(perms))
    assert lengths.tolist() == [30, 12]


def test_derived_rngs_build_the_same_streams_in_bulk():
    from fedmtl.runtime.seeds import derived_rng, derived_rngs

    cids = [0, 1, 77, 4095, 2**32 - 1]
    for seed, purpose, rnd in [(0, 3, 1), (2**32 - 1, 2, 400), (2**40, 3, 2)]:
        bulk = derived_rngs(seed, purpose, rnd, cids)
        for c, rng in zip(cids, bulk, strict=True):
            expect = np.random.default_rng([seed, purpose, rnd, c]).permutation(50)
            np.testing.assert_array_equal(rng.permutation(50), expect)
            np.testing.assert_array_equal(derived_rng(seed, purpose, rnd, c).permutation(50), expect)


def test_shared_base_takes_only_whole_row_blocks_of_one_array():
    """Client data is read in place only when every array is a block of whole rows of one
    C-contiguous array; anything else is concatenated (never read at the wrong offset)."""
    whole = np.arange(40, dtype=np.float32).reshape(10, 4).copy()  # owns its memory
    found = _shared_base([whole[7:10], whole[2:5], whole[10:10]])
    assert found is not None and found[0] is whole and found[1][:2].tolist() == [7, 2]  # empty: anywhere
    assert _shared_base([whole[::2]]) is None  # every other row
    assert _shared_base([whole[:, :2]]) is None  # a column block
    assert _shared_base([whole[2:5], whole.copy()[5:7]]) is None  # two different arrays
    assert _shared_base([whole.reshape(20, 2)[0:4]]) is None  # rows of a reshaped view
    assert _shared_base([whole.copy()]) is None  # owns its memory


def test_a_found_layout_is_reused_only_while_every_array_it_names_is_alive():
    """Layouts are remembered by the arrays' ids (checking one costs 1.5 us per array and client);
    an entry whose arrays died must never answer for new arrays that got the same ids."""
    import gc

    import fedmtl.training.batched as batched

    whole = np.arange(40, dtype=np.float32).reshape(10, 4).copy()
    blocks = [whole[6:9], whole[0:2]]
    key = tuple(map(id, blocks))
    rows, first = batched._rows_of(blocks)
    assert key in batched._LAYOUTS and first.tolist() == [6, 0] and rows.data_ptr() == whole.ctypes.data
    again, first2 = batched._rows_of(blocks)
    assert first2 is batched._LAYOUTS[key][2] and again.data_ptr() == rows.data_ptr()
    with pytest.raises(ValueError):
        first2[0] = 1  # shared between calls: read-only
    del blocks, rows, again, whole
    gc.collect()
    assert batched._known_layout(key, [np.zeros((3, 4)), np.zeros((2, 4))]) is None
    assert key not in batched._LAYOUTS


def test_load_federated_lays_client_data_out_as_row_blocks():
    from fedmtl.config import DataConfig, PartitionConfig
    from fedmtl.data import load_federated

    data = load_federated(
        DataConfig(dataset="digits", partition=PartitionConfig(kind="iid", num_clients=6)), 0
    )
    clients = data.clients
    xs, ys = _shared_base([c.x_train for c in clients]), _shared_base([c.y_train for c in clients])
    assert xs is not None and ys is not None
    for c, first in zip(clients, xs[1], strict=True):
        np.testing.assert_array_equal(xs[0][first : first + c.n_train], c.x_train)


@pytest.mark.parametrize("learn_alpha", [True, False], ids=["adaptive", "fixed-alpha"])
def test_apfl_mixture_step_equals_autograd_on_a_deeper_chain(learn_alpha):
    """APFL's hand-written mixture step (``fused.MixtureChainStep``: the mixed model's products as
    V a and W a, alpha's gradient from them) equals the generic autograd step of the same objective
    on a 3-layer chain with a ReLU on its output, ragged clients, each with its own v and alpha."""
    from fedmtl.algorithms.apfl import ALPHA, PERSONAL, Mixture
    from fedmtl.training.fused import MixtureChainStep

    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 4), nn.ReLU()
    ).eval()  # fmt: skip
    task = TaskSpec("classification", 4)
    base = {k: v.detach().clone() for k, v in model.named_parameters()}
    objective = Mixture(list(base))
    rng = np.random.default_rng(2)
    starts = []
    for i in range(len(SIZES)):
        start = {k: v + 0.01 * i for k, v in base.items()}
        start.update(
            {
                PERSONAL + k: v
                + torch.as_tensor(0.05 * rng.standard_normal(tuple(v.shape)), dtype=torch.float32)
                for k, v in base.items()
            }
        )
        start[ALPHA] = torch.tensor([0.2 + 0.15 * i], dtype=torch.float32)
        starts.append(start)
    trainable = None if learn_alpha else [k for k in starts[0] if k != ALPHA]
    xs, ys = _clients(task)
    spec = LocalSpec(optimizer=OptimizerSpec(lr=0.1), batch_size=8)
    bounds = [(ALPHA, 0.0, 1.0)]
    kernel = objective.chain_step(
        linear_chain(model), task, spec.optimizer, set(trainable or starts[0]), 0.0, bounds
    )
    assert isinstance(kernel, MixtureChainStep)
    args = (model, starts, xs, ys, task, spec, STEPS)
    fused = batched_local_train(*args, _rngs(), trainable=trainable, objective=objective, bounds=bounds)
    generic = batched_local_train(
        *args, _rngs(), trainable=trainable, objective=objective, bounds=bounds, fused=False
    )
    for i in range(len(SIZES)):
        assert fused.loss[i] == pytest.approx(generic.loss[i], rel=RTOL)
        for k, start in starts[i].items():
            _close(fused.params(i)[k], generic.params(i)[k], start)
        if not learn_alpha:
            assert torch.equal(torch.as_tensor(fused.arrays(i)[ALPHA]), starts[i][ALPHA])
