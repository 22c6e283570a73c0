"""A training step for convolutional networks over parameters stacked on a client axis.

The generic batched step (``torch.func.vmap`` of the model, then autograd) leaves a CNN where it
was: a conv net's cost is its convolutions and its wide dense layer, and vmap neither runs the
convolutions of many clients as one call nor helps the dense layer, whose per-client weight (6.4
million numbers in LEAF's FEMNIST CNN) is read and written several times per step. This step
runs a conv net written as a plain sequence of layers (``conv_program``) for every live client at
once:

- **Convolutions as one grouped convolution.** The clients' images are laid out side by side on
  the channel axis ([batch, clients x channels, H, W]) and each convolution with per-client filters
  is one ``conv2d`` with ``groups = clients`` (forward and backward); a filter shared by every
  client (a frozen body) is one ordinary convolution over all clients' images. ReLU and pooling
  act per channel, local response normalisation per client's channel block.
- **Wide dense layers as low-rank updates of the broadcast weight.** One SGD step changes a dense
  weight by ``-lr * delta x^T``, a matrix of rank at most the batch size, so after t steps a
  client's weight is ``W0 + U V^T`` with U and V holding t batches of rows. While the accumulated
  rank is small against the layer (``LOW_RANK_SHARE``), the step keeps U and V instead of
  updating W: the product ``W0 x`` of all clients is one large matrix product against the shared
  start W0 (read once per step for every client, instead of once per client) plus thin products
  with U and V, and W is written once, at the end (``W0 + U V^T``, one batched product). The
  arithmetic is the dense layer's own (the same products, reassociated), so the results equal
  sequential training to float rounding. Plain SGD only (momentum and weight decay would need the
  past rows rescaled); other optimizers and large ranks update the dense stack in place.
- Everything else is ordinary autograd over the stacked tensors; dense layers with SGD fold
  their update into the weight-gradient product (``W <- W - lr * delta x^T`` as one ``baddbmm_``),
  as ``fedmtl.training.fused`` does for MLPs.

The numbers equal ``local_train``'s per client to float rounding (``tests/test_convnet.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedmtl.data.federated import TaskSpec
from fedmtl.training import onednn, optim
from fedmtl.training.buffers import POOL
from fedmtl.training.fused import sgd_update_
from fedmtl.training.objectives import add_prox_grad, per_sample_loss
from fedmtl.training.optim import OptimizerSpec

#: A dense layer trains as low-rank updates while its factors (rank x (rows + columns)) hold at most
#: this share of its weight's size: up to there the thin products with U and V cost no more
#: arithmetic than the per-client product with W they replace, the product with the shared start
#: is one large call for all clients, and W is written once at the end instead of every step. At
#: 1.0 every client of LEAF's FEMNIST CNN (up to 337 training images, 1,239 rows allowed for its
#: 3136x2048 layer) trains its dense layer this way; at 0.25 (309 rows) the largest writers' groups
#: did not, and a 20-writer round took 40-47 s against 33-39 s (2 shared cores, load 8).
LOW_RANK_SHARE = 1.0


@dataclass(frozen=True)
class Op:
    """One layer of a conv net: ``kind`` with its parameter names and hyper-parameters.

    conv: (stride, padding) pairs; pool: (kernel, stride, padding) pairs; lrn: (size, alpha, beta,
    k); linear, relu, flatten: none."""

    kind: str
    weight: str | None = None
    bias: str | None = None
    args: tuple = ()


def conv_program(model: nn.Module) -> list[Op] | None:
    """The model as a list of ``Op`` when its forward is exactly such a sequence (convolutions,
    ReLUs, max pooling and local response normalisation, one Flatten, then Linear/ReLU layers),
    else None.

    Recognised: ``nn.Sequential`` of ``Conv2d`` (no groups or dilation, zero padding given as
    numbers), ``ReLU``, ``MaxPool2d``, ``LocalResponseNorm``, ``Flatten``, ``Linear`` and
    ``Identity`` (nested Sequentials included) and fedmtl's ``cnn`` model (``head(body(x))``).
    Only these exact types: a subclass may override ``forward``."""
    ops = _ops(model, "")
    if ops is None or [op.kind for op in ops].count("flatten") != 1:
        return None
    cut = [op.kind for op in ops].index("flatten")
    image, dense = ops[:cut], ops[cut + 1 :]
    if not any(op.kind == "conv" for op in image) or image[0].kind != "conv":
        return None
    if any(op.kind not in ("linear", "relu") for op in dense):
        return None
    return ops


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _ops(module: nn.Module, prefix: str) -> list[Op] | None:
    from fedmtl.models.nets import CNN

    kind = type(module)
    if kind is nn.Conv2d:
        padding = module.padding
        if (
            module.groups != 1
            or _pair(module.dilation) != (1, 1)
            or module.padding_mode != "zeros"
            or isinstance(padding, str)
        ):
            return None
        bias = f"{prefix}bias" if module.bias is not None else None
        return [Op("conv", f"{prefix}weight", bias, (_pair(module.stride), _pair(padding)))]
    if kind is nn.MaxPool2d:
        if module.ceil_mode or module.return_indices or _pair(module.dilation) != (1, 1):
            return None
        stride = module.stride if module.stride is not None else module.kernel_size
        return [Op("pool", args=(_pair(module.kernel_size), _pair(stride), _pair(module.padding)))]
    if kind is nn.LocalResponseNorm:
        return [Op("lrn", args=(module.size, module.alpha, module.beta, module.k))]
    if kind is nn.ReLU:
        return [Op("relu")]
    if kind is nn.Identity:
        return []
    if kind is nn.Flatten:
        return [Op("flatten")] if (module.start_dim, module.end_dim) == (1, -1) else None
    if kind is nn.Linear:
        return [Op("linear", f"{prefix}weight", f"{prefix}bias" if module.bias is not None else None)]
    if kind is nn.Sequential:
        children = list(module.named_children())
    elif kind is CNN:
        children = [("body", module.body), ("head", module.head)]
    else:
        return None
    out: list[Op] = []
    for name, child in children:
        sub = _ops(child, f"{prefix}{name}.")
        if sub is None:
            return None
        out += sub
    return out


@dataclass
class _Factors:
    """A dense layer trained as ``W0 + U V^T``: ``start`` is W0, shared [out, in] or per client
    [clients, out, in] (the stack the result is written into); rows ``:filled`` of ``u``
    [clients, rank, out] and ``v`` [clients, rank, in] are the steps so far (zero beyond)."""

    start: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    filled: int = 0


@dataclass
class _Group:
    factors: dict[str, _Factors] = field(default_factory=dict)


class ConvNetStep:
    """One local step of every live client of a group: forward, loss, backward and the update.

    Called like ``fedmtl.training.fused.FusedChainStep``: ``live`` holds the trainable parameters
    ([k, ...] views, updated in place), ``frozen`` the others and ``center`` the proximal centres,
    each stacked or one tensor shared by every client; ``scale`` [k, B] is 1 / (client i's real
    batch length) on its real samples and 0 on padding. ``begin_group`` and ``end_group`` bracket
    a group's steps (the low-rank factors live in between)."""

    def __init__(
        self,
        program: list[Op],
        shapes: Mapping[str, tuple[int, ...]],
        task: TaskSpec,
        opt: OptimizerSpec,
        trainable: set[str],
        mu: float,
    ) -> None:
        self.program = program
        self._image_ops = _pool_before_relu(program[: [op.kind for op in program].index("flatten")])
        self._dense_ops = program[[op.kind for op in program].index("flatten") + 1 :]
        self.shapes = dict(shapes)
        self.task = task
        self.opt = opt
        self.trainable = trainable
        self.mu = mu
        #: dense layers whose SGD update is folded into their backward pass (the others' gradients
        #: go through ``optim.step_``)
        self.fused = {
            op.weight
            for op in program
            if op.kind == "linear" and opt.name == "sgd" and op.weight in trainable
        }
        self._group = _Group()

    # ------------------------------------------------------------------------------- groups

    def low_rank_keys(self, rank: int) -> list[str]:
        """The dense weights that train as low-rank updates when a group's steps add ``rank`` rows
        (the sum of its padded batch widths)."""
        if self.opt.name != "sgd" or self.opt.momentum or self.opt.weight_decay or self.mu:
            return []
        out = []
        for op in self.program:
            if op.kind == "linear" and op.weight in self.trainable:
                rows, cols = self.shapes[op.weight]
                if rank * (rows + cols) <= LOW_RANK_SHARE * rows * cols:
                    out.append(op.weight)
        return out

    def _dense_sizes(self) -> list[tuple[int, int]]:
        dense = [op.weight for op in self.program if op.kind == "linear" and op.weight in self.trainable]
        return [self.shapes[w] for w in dense]  # type: ignore[misc,index]

    def factor_bytes(self, ranks: np.ndarray) -> np.ndarray:
        """Bytes of the low-rank rows a client whose steps add ``ranks`` rows holds (per client)."""
        out = np.zeros(len(ranks), dtype=np.int64)
        if not self.low_rank_keys(1):
            return out
        for rows, cols in self._dense_sizes():
            fits = ranks * (rows + cols) <= LOW_RANK_SHARE * rows * cols
            out += np.where(fits, 4 * ranks * (rows + cols), 0)
        return out

    def low_rank_numel(self, ranks: np.ndarray) -> np.ndarray:
        """Parameters of the layers that train as low-rank updates, per client."""
        out = np.zeros(len(ranks), dtype=np.int64)
        if not self.low_rank_keys(1):
            return out
        for rows, cols in self._dense_sizes():
            out += np.where(ranks * (rows + cols) <= LOW_RANK_SHARE * rows * cols, rows * cols, 0)
        return out

    def begin_group(
        self, stacked: Mapping[str, torch.Tensor], starts: Mapping[str, torch.Tensor], rank: int
    ) -> None:
        """A new group: ``stacked`` its parameter stacks, ``starts`` the start tensors its clients
        share (one per key that every client starts from), ``rank`` the rows its steps add."""
        group = _Group()
        for key in self.low_rank_keys(rank):
            stack = stacked[key]
            rows, cols = self.shapes[key]
            m = stack.shape[0]
            start = starts.get(key)
            group.factors[key] = _Factors(
                start=start if start is not None else stack,
                u=POOL.zeros((m, rank, rows), stack.dtype),
                v=POOL.zeros((m, rank, cols), stack.dtype),
            )
        self._group = group

    def end_group(self, stacked: Mapping[str, torch.Tensor]) -> None:
        """Write every low-rank layer's result ``W0 + U V^T`` into its stack (which holds W0)."""
        for key, f in self._group.factors.items():
            if f.filled:
                u, v = f.u[:, : f.filled], f.v[:, : f.filled]
                out = stacked[key]
                with _routed("baddbmm", u.mT, v, out):
                    out.baddbmm_(u.mT, v)
        self._group = _Group()

    # -------------------------------------------------------------------------------- steps

    def __call__(
        self,
        live: dict[str, torch.Tensor],
        frozen: dict[str, torch.Tensor],
        center: dict[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        scale: torch.Tensor,
        state: dict,
    ) -> torch.Tensor:
        """Trains one step in place; returns each live client's batch loss, shape [k]."""
        k, width = scale.shape
        params = {**frozen, **live}
        factors = self._group.factors
        # autograd's leaves: trainable parameters that neither a fused dense update nor the
        # low-rank factors take care of
        own = self._updated_in_backward(factors)
        leaves = {key: v.detach().requires_grad_(True) for key, v in live.items() if key not in own}
        # a fused layer's weight enters its autograd.Function as an input that wants a gradient,
        # so that its backward runs even when nothing below it trains
        hooks: list[torch.Tensor] = []
        with torch.enable_grad():
            out = self._forward({**params, **leaves}, factors, x, k, width, state, center, hooks)
            per_sample = per_sample_loss(
                out.reshape(k * width, -1), y.reshape(k * width, *y.shape[2:]), self.task
            ).view(k, width)
            losses = (per_sample * scale).sum(1)
            inputs = [*leaves.values(), *hooks]
            grads = torch.autograd.grad(losses.sum(), inputs, allow_unused=True)
        if leaves:
            got = {key: g for key, g in zip(leaves, grads, strict=False) if g is not None}
            add_prox_grad(got, {key: live[key] for key in got}, center, self.mu)
            optim.step_(self.opt, {key: live[key] for key in got}, got, state)
        return losses.detach()

    def _updated_in_backward(self, factors: dict[str, _Factors]) -> set[str]:
        """The keys whose update a dense layer's backward pass makes (fused SGD or low rank)."""
        out = set()
        for op in self.program:
            if op.kind == "linear" and (op.weight in self.fused or op.weight in factors):
                out |= {key for key in (op.weight, op.bias) if key in self.trainable}
        return out

    def _forward(
        self,
        params: dict[str, torch.Tensor],
        factors: dict[str, _Factors],
        x: torch.Tensor,
        k: int,
        width: int,
        state: dict,
        center: dict[str, torch.Tensor],
        hooks: list[torch.Tensor],
    ) -> torch.Tensor:
        # images as [batch, clients x channels, H, W]: client i's channels are block i
        h = x.transpose(0, 1).reshape(width, -1, *x.shape[3:])
        # channels-last: oneDNN's grouped convolution ran a 20-writer FEMNIST round about twice as
        # fast in it (40-47 s against 73-82 s, same machine and load) as on contiguous images
        h = h.contiguous(memory_format=torch.channels_last)
        for op in self._image_ops:
            h = self._image_op(op, params, h, k, width)
        # to [clients, batch, features] for the dense layers
        h = h.contiguous().reshape(width, k, -1).transpose(0, 1).contiguous()
        for op in self._dense_ops:
            if op.kind == "relu":
                h = torch.relu(h)
            elif op.weight in factors:
                bias = params.get(op.bias or "")
                trains_bias = op.bias in self.trainable
                h = _LowRank.apply(h, _hook(hooks), factors[op.weight], bias, trains_bias, self.opt.lr, k)
            elif op.weight in self.fused:
                update = _SGDUpdate(self.opt, self.mu, params, center, state, op, self.trainable)
                w, b = params[op.weight], params.get(op.bias or "")  # type: ignore[index]
                h = _FusedDense.apply(h, _hook(hooks), w, b, update)
            else:
                h = self._dense(op, params, h)
        return h

    def _image_op(
        self, op: Op, params: dict[str, torch.Tensor], h: torch.Tensor, k: int, width: int
    ) -> torch.Tensor:
        if op.kind == "relu":
            return torch.relu(h)
        if op.kind == "pool":
            kernel, stride, padding = op.args
            return F.max_pool2d(h, kernel, stride, padding)
        if op.kind == "lrn":
            size, alpha, beta, kk = op.args
            per_client = h.reshape(width * k, -1, *h.shape[2:])
            return F.local_response_norm(per_client, size, alpha, beta, kk).reshape(h.shape)
        stride, padding = op.args  # conv
        w = params[op.weight]  # type: ignore[index]
        b = params.get(op.bias or "")
        if w.dim() == len(self.shapes[op.weight]):  # type: ignore[index]
            # one filter bank for every client: an ordinary convolution over all their images
            per_client_bias = b is not None and b.dim() == 2
            flat = h.reshape(width * k, -1, *h.shape[2:])
            out = F.conv2d(flat, w, None if per_client_bias else b, stride, padding)
            out = out.reshape(width, -1, *out.shape[2:])
            return out + b.reshape(1, -1, 1, 1) if per_client_bias else out  # type: ignore[union-attr]
        if b is not None and b.dim() == 1:  # a shared bias on per-client filters
            b = b.repeat(k)
        return F.conv2d(
            h, w.reshape(-1, *w.shape[2:]), None if b is None else b.reshape(-1), stride, padding, groups=k
        )

    def _dense(self, op: Op, params: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        """A dense layer left to autograd (Adam, or a frozen weight)."""
        w = params[op.weight]  # type: ignore[index]
        b = params.get(op.bias or "")
        out = h @ w.T if w.dim() == 2 else torch.bmm(h, w.mT)
        if b is not None:
            out = out + (b.unsqueeze(1) if b.dim() == 2 else b)
        return out


def _pool_before_relu(ops: list[Op]) -> list[Op]:
    """``ops`` with every ReLU that a max pooling follows moved after it: max and ReLU commute
    (both monotone), so the outputs are the same numbers and so are the gradients (a window whose
    maximum is not positive passes no gradient either way), and the ReLU and its backward pass run
    on a quarter of the elements."""
    out = list(ops)
    for i in range(len(out) - 1):
        if out[i].kind == "relu" and out[i + 1].kind == "pool":
            out[i], out[i + 1] = out[i + 1], out[i]
    return out


def _hook(hooks: list[torch.Tensor]) -> torch.Tensor:
    """A zero-size tensor that wants a gradient (see ``ConvNetStep.__call__``)."""
    hook = torch.empty(0, requires_grad=True)
    hooks.append(hook)
    return hook


class _SGDUpdate:
    """A dense layer's in-place SGD update from its output gradient and input (fused into the
    weight-gradient product), with momentum, weight decay and the proximal term as configured."""

    def __init__(
        self,
        opt: OptimizerSpec,
        mu: float,
        params: dict[str, torch.Tensor],
        center: dict[str, torch.Tensor],
        state: dict,
        op: Op,
        trainable: set[str],
    ) -> None:
        self.opt, self.mu, self.params, self.center, self.state = opt, mu, params, center, state
        self.keys = [key for key in (op.weight, op.bias) if key is not None and key in trainable]
        self.weight = op.weight

    def __call__(self, grad: torch.Tensor, inputs: torch.Tensor) -> None:
        delta = grad.mT  # feature-major [k, out, B], as the fused step's update reads it
        for key in self.keys:
            c = self.center.get(key)
            buf = self.state["buf"][key] if self.opt.momentum > 0 else None
            p = self.params[key]
            with _routed("baddbmm", delta, inputs, p) if key == self.weight else _nothing():
                sgd_update_(
                    self.opt, p, c, self.mu if c is not None else 0.0, buf, delta,
                    inputs if key == self.weight else None,
                )  # fmt: skip


class _FusedDense(torch.autograd.Function):
    """``x W^T + b`` over stacked [k, out, in] weights; the backward pass returns the input's
    gradient (taken before the weight changes) and applies the layer's SGD update in place."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        hook: torch.Tensor,
        w: torch.Tensor,
        b: torch.Tensor | None,
        update: Callable[[torch.Tensor, torch.Tensor], None],
    ) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.w, ctx.update = w, update
        if b is not None and b.dim() == 2:
            return torch.baddbmm(b.unsqueeze(1), x, w.mT)
        out = torch.bmm(x, w.mT) if w.dim() == 3 else x @ w.T
        return out if b is None else out + b

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        w = ctx.w
        below = None
        if ctx.needs_input_grad[0]:
            below = torch.bmm(grad, w) if w.dim() == 3 else grad @ w
        ctx.update(grad, x)
        return below, None, None, None, None


class _LowRank(torch.autograd.Function):
    """``x (W0 + U V^T)^T + b`` for a layer trained as low-rank updates (``_Factors``); the
    backward pass returns the input's gradient and appends this step's rows to U and V (and
    updates a trainable bias)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        hook: torch.Tensor,
        f: _Factors,
        b: torch.Tensor | None,
        trains_bias: bool,
        lr: float,
        k: int,
    ) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.f, ctx.b, ctx.lr, ctx.k = f, (b if trains_bias else None), lr, k
        out = _start_product(x, f.start, k, transpose=False)
        if f.filled:
            u, v = f.u[:k, : f.filled], f.v[:k, : f.filled]
            out.baddbmm_(torch.bmm(x, v.mT), u)
        if b is not None:
            out += b.unsqueeze(1) if b.dim() == 2 else b
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        f, b, lr, k = ctx.f, ctx.b, ctx.lr, ctx.k
        below = None
        if ctx.needs_input_grad[0]:
            below = _start_product(grad, f.start, k, transpose=True)
            if f.filled:
                u, v = f.u[:k, : f.filled], f.v[:k, : f.filled]
                below.baddbmm_(torch.bmm(grad, u.mT), v)
        width = x.shape[1]
        rows = slice(f.filled, f.filled + width)
        torch.mul(grad, -lr, out=f.u[:k, rows])
        f.v[:k, rows].copy_(x)
        f.filled += width
        if b is not None:  # a trainable bias: stacked
            b.sub_(grad.sum(1), alpha=lr)
        return below, None, None, None, None, None, None


def _start_product(x: torch.Tensor, start: torch.Tensor, k: int, transpose: bool) -> torch.Tensor:
    """``x W0^T`` (or ``x W0`` with ``transpose``) for [k, B, features] ``x``: one product over
    every client's rows when W0 is shared, a batched one when each client has its own."""
    if start.dim() == 2:
        w = start if transpose else start.T
        flat = x.reshape(-1, x.shape[-1])
        out = torch.empty(flat.shape[0], w.shape[1], dtype=x.dtype)
        with _routed("matmul", flat, w, out):
            torch.matmul(flat, w, out=out)
        return out.view(x.shape[0], x.shape[1], -1)
    w = start[:k] if transpose else start[:k].mT
    out = torch.empty(k, x.shape[1], w.shape[-1], dtype=x.dtype)
    with _routed("matmul", x, w, out):
        torch.matmul(x, w, out=out)
    return out


class _routed:
    """Inside: this product on oneDNN's float32 kernels when ``onednn.routes`` sends it there."""

    def __init__(self, form: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
        self.on = onednn.routes([(form, a, b, out)])[0]
        self.before: str | None = None

    def __enter__(self) -> None:
        if self.on:
            self.before = onednn.begin()

    def __exit__(self, *exc: object) -> None:
        if self.before is not None:
            onednn.end(self.before)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
