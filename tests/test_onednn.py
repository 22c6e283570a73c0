"""The oneDNN route for the batched step's products: taken only where a probe shows exact float32,
never left switched on, and giving the same training as torch's default products."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from fedmtl.config import parse_config
from fedmtl.data.federated import TaskSpec
from fedmtl.experiment.run import build
from fedmtl.training import onednn
from fedmtl.training.fused import FusedChainStep, Layer
from fedmtl.training.optim import OptimizerSpec, init_state
from tests.conftest import digits_config

needs_route = pytest.mark.skipif(not onednn.available(), reason="torch without the fp32 precision switch")


def _flag() -> str:
    return torch._C._get_fp32_precision_getter("mkldnn", "matmul")


def _bf16_inputs(form, a, b, out):  # noqa: ANN001
    """A product that rounds its inputs to bfloat16 (what oneDNN may do on CPUs with AMX)."""
    a16, b16 = a.bfloat16().float(), b.bfloat16().float()
    if form == "matmul":
        torch.matmul(a16, b16, out=out)
    else:
        out.baddbmm_(a16, b16)


def _exact(form, a, b, out):  # noqa: ANN001
    (torch.matmul(a, b, out=out) if form == "matmul" else out.baddbmm_(a, b))


def test_probe_rejects_bfloat16_inputs_and_accepts_float32():
    meta = onednn._probe_meta
    w, x, out = (meta(t) for t in (torch.empty(3, 20, 30), torch.empty(3, 30, 8), torch.empty(3, 20, 8)))
    assert w == ((2, 20, 30), (600, 30, 1))  # two matrices of the stack, its strides
    for form in ("matmul", "baddbmm"):
        assert onednn._probe(form, w, x, out, run=_exact)
        assert not onednn._probe(form, w, x, out, run=_bf16_inputs)
    # strided views (a transposed activation) are probed with the same strides
    xt = meta(torch.empty(3, 8, 30).mT)
    assert onednn._probe("baddbmm", w, xt, out, run=_exact)
    assert not onednn._probe("baddbmm", w, xt, out, run=_bf16_inputs)


def test_verdicts_are_kept_per_shape_and_stride_and_off_means_never():
    onednn.clear()
    w, x, out = torch.empty(2, 5, 7), torch.empty(2, 7, 4), torch.empty(2, 5, 4)
    with onednn.enabled_as(False):
        assert not onednn.exact([("matmul", w, x, out)])
        assert onednn.verdicts() == {}
    if onednn.available():
        onednn.exact([("matmul", w, x, out)])
        onednn.exact([("matmul", w, x, out)])
        onednn.exact([("matmul", w, x.mT.contiguous().mT, out)])
        assert len(onednn.verdicts()) == 2
        # a stack of another size with the same matrices and strides: the same verdict
        onednn.exact([("matmul", torch.empty(9, 5, 7), torch.empty(9, 7, 4), torch.empty(9, 5, 4))])
        assert len(onednn.verdicts()) == 2
    assert not onednn.exact([("matmul", w.double(), x.double(), out.double())])


@needs_route
def test_route_restores_the_flag_even_when_the_block_raises():
    before = _flag()
    with pytest.raises(RuntimeError), onednn.route():
        assert _flag() == "bf16"
        raise RuntimeError("boom")
    assert _flag() == before


def _run(onednn_on: bool) -> tuple[dict, dict]:
    cfg = digits_config(
        algorithm={"name": "fedavg"}, train__rounds=2, runtime__execution="batched",
        runtime__onednn=onednn_on, runtime__work_fraction=[0.3, 1.0],
    )  # fmt: skip
    _, algo, sim = build(parse_config(cfg))
    server, states = algo.init_server(), {}
    before = _flag() if onednn.available() else None
    for r in (1, 2):
        res = sim.run_round(r, server, states)
        server = res.server
    if before is not None:
        assert _flag() == before  # no code outside the step sees the switch
    return server, res.replies


def _every_other(products):  # noqa: ANN001, ANN202
    """Routes of a step that mixes both kinds: every other product on oneDNN (where exact)."""
    return [i % 2 == 0 and onednn.exact([p]) for i, p in enumerate(products)]


@needs_route
@pytest.mark.parametrize("routing", ["all", "mixed"])
def test_rounds_on_the_onednn_route_train_like_torchs_default_products(monkeypatch, routing):
    monkeypatch.setattr(onednn, "MIN_ROUTED_MACS", 0)  # the test federation's products are small
    if routing == "mixed":
        monkeypatch.setattr(onednn, "routes", _every_other)
    onednn.clear()
    server_off, replies_off = _run(False)
    assert onednn.verdicts() == {}  # off: nothing probed, nothing routed
    server_on, replies_on = _run(True)
    if not all(onednn.verdicts().values()):
        pytest.skip("this CPU's oneDNN kernels are not exact float32 here: the route is not taken")
    assert onednn.verdicts()  # the step's products were probed and routed
    for cid, reply in replies_off.items():
        for k, v in reply.arrays.items():
            np.testing.assert_allclose(replies_on[cid].arrays[k], v, rtol=1e-5, atol=1e-6)
    for k, v in server_off.items():
        if isinstance(v, np.ndarray):
            np.testing.assert_allclose(server_on[k], v, rtol=1e-5, atol=1e-6)


def test_small_products_stay_on_torchs_default_unprobed(monkeypatch):
    """Below ``MIN_ROUTED_MACS`` a product is not worth oneDNN's call overhead: not routed and
    not even probed; at or above it, the route is the probe's verdict."""
    onednn.clear()
    w, x, out = torch.empty(4, 10, 32), torch.empty(4, 32, 8), torch.empty(4, 10, 8)
    monkeypatch.setattr(onednn, "MIN_ROUTED_MACS", 4 * 10 * 32 * 8 + 1)
    assert onednn.routes([("matmul", w, x, out)]) == [False]
    assert onednn.verdicts() == {}
    monkeypatch.setattr(onednn, "MIN_ROUTED_MACS", 4 * 10 * 32 * 8)
    assert onednn.routes([("matmul", w, x, out)]) == [onednn.exact([("matmul", w, x, out)])]
    assert len(onednn.verdicts()) == (1 if onednn.available() else 0)


_PRODUCTS = {torch.matmul, torch.baddbmm, torch.bmm, torch.Tensor.baddbmm_}


class _ProductLog(TorchFunctionMode):
    """Every matrix product the step runs: its output shape and the route switch at the time."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[tuple[int, ...], str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func in _PRODUCTS:
            out = args[0] if func is torch.Tensor.baddbmm_ else kwargs["out"]
            self.calls.append((tuple(out.shape), _flag()))
        return func(*args, **kwargs)


def _chain_step(opt: str, frozen_lowest: bool) -> tuple[FusedChainStep, dict, dict, dict, tuple]:
    """A 3-layer chain (6-9-7-4) of 3 clients, batches of 5: every product has its own shape."""
    dims, k, width = [6, 9, 7, 4], 3, 5
    chain = [Layer(f"l{i}.weight", f"l{i}.bias", relu=i < 2) for i in range(3)]
    gen = torch.Generator().manual_seed(0)
    params = {}
    for i, layer in enumerate(chain):
        params[layer.weight] = 0.3 * torch.randn(k, dims[i + 1], dims[i], generator=gen)
        params[layer.bias] = 0.1 * torch.randn(k, dims[i + 1], generator=gen)
    trainable = set(params) - ({"l0.weight", "l0.bias"} if frozen_lowest else set())
    spec = OptimizerSpec(
        name="adam" if opt == "adam" else "sgd", lr=0.1, momentum=0.9 if opt == "momentum" else 0.0
    )
    step = FusedChainStep(chain, TaskSpec("classification", 4), spec, trainable, 0.0)
    live = {n: v for n, v in params.items() if n in trainable}
    frozen = {n: v for n, v in params.items() if n not in trainable}
    x = torch.randn(k, width, dims[0], generator=gen)
    y = torch.randint(0, 4, (k, width), generator=gen)
    batch = (x, y, torch.full((k, width), 1.0 / width))
    return step, live, frozen, init_state(spec, live), batch


@needs_route
@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("frozen_lowest", [False, True])
def test_each_product_runs_on_the_route_chosen_for_it(monkeypatch, opt, frozen_lowest):
    """With one product routed at a time, exactly that product runs with the switch on, every
    product runs once, and the switch is back as it was after the step."""
    step, live, frozen, state, (x, y, scale) = _chain_step(opt, frozen_lowest)
    chosen: dict[str, object] = {}

    def one_hot(products):  # noqa: ANN001, ANN202
        chosen["outs"] = [tuple(out.shape) for _, _, _, out in products]
        return [i == chosen["j"] for i in range(len(products))]

    monkeypatch.setattr(onednn, "routes", one_hot)
    chosen["j"] = -1
    step(live, frozen, {}, x, y, scale, state)
    n = len(chosen["outs"])  # type: ignore[arg-type]
    assert n == (3 + 2 + 3 if not frozen_lowest else 3 + 1 + 2)  # forward, below, updates
    for j in range(n):
        step.end_group({})
        chosen["j"] = j
        before = _flag()
        with _ProductLog() as log:
            step(live, frozen, {}, x, y, scale, state)
        assert sorted(shape for shape, _ in log.calls) == sorted(chosen["outs"])  # type: ignore[arg-type]
        assert [shape for shape, flag in log.calls if flag == "bf16"] == [chosen["outs"][j]]  # type: ignore[index]
        assert _flag() == before


@needs_route
def test_the_switch_is_restored_when_a_routed_step_raises(monkeypatch):
    step, live, frozen, state, (x, y, scale) = _chain_step("sgd", False)
    monkeypatch.setattr(onednn, "routes", lambda products: [True] * len(products))

    def boom(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("boom")

    monkeypatch.setattr(step, "_loss_and_delta", boom)
    before = _flag()
    with pytest.raises(RuntimeError, match="boom"):
        step(live, frozen, {}, x, y, scale, state)
    assert _flag() == before
