"""Local training of many clients as one computation over parameters stacked on a client axis.

``batched_local_train`` gives every client what ``local_train`` would (same mini-batches from the
same rng, same optimizer arithmetic, same proximal term and frozen keys, equal to float tolerance),
but runs one vmapped forward and one backward pass per step for all clients still training,
instead of a Python loop per client:

- ragged data: each step's batches are padded to the longest one and masked, so a padded row adds
  nothing to the loss or the gradient;
- stragglers: clients are ordered by step count (descending), so the clients still training at
  step t are a prefix of the stack and each step works on views; a finished client's parameters
  and optimizer state are simply never touched again;
- memory: clients are split into groups whose stacked state fits ``memory_bytes`` (and whose
  per-step working set stays cache- and allocator-friendly); only the clients handed in (the ones
  sampled this round) are ever stacked.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.overrides import TorchFunctionMode

from fedmtl.data.federated import TaskSpec
from fedmtl.training import optim
from fedmtl.training.buffers import POOL
from fedmtl.training.fused import FusedChainStep, linear_chain
from fedmtl.training.local import LocalSpec, batch_lengths, batch_order
from fedmtl.training.rows import StackedRows

ArrayLike = np.ndarray | torch.Tensor
ParamsLike = Mapping[str, ArrayLike]

#: Default budget for one group's stacked parameters, gradients, optimizer state and batches.
DEFAULT_MEMORY_BYTES = 2 * 2**30
#: Default cap on one group's per-step working set (see ``batched_local_train``).
STEP_BYTES = 12 * 2**20
#: Groups of at most this many clients gather their batches from each client's array directly.
GATHER_PER_CLIENT = 32
#: Cap on any one stacked tensor a step allocates. Larger blocks come from mmap and are returned
#: on free, so every step would page-fault them in again (measured: 10x slower than reusing heap
#: memory for a 40 MB gradient); blocks below glibc's 32 MiB mmap ceiling get recycled.
TENSOR_BYTES = 16 * 2**20
_F32 = 4


@dataclass
class _Group:
    """Clients trained together: ``clients[r]`` owns row r of every stacked tensor."""

    clients: list[int]
    stacked: dict[str, torch.Tensor] = field(default_factory=dict)
    shared: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: StackedRows | None = None


@dataclass
class BatchedResult:
    """Trained parameters of every client, kept in the stacks they were trained in (no copies)."""

    keys: list[str]
    loss: np.ndarray
    seen: np.ndarray
    groups: list[_Group]
    where: list[tuple[int, int]]  # client -> (group, row)

    def __len__(self) -> int:
        return len(self.where)

    def params(self, i: int) -> dict[str, torch.Tensor]:
        """Client i's parameters (views into the stacks; frozen shared keys are the input tensors)."""
        g, r = self.where[i]
        grp = self.groups[g]
        return {k: grp.stacked[k][r] if k in grp.stacked else grp.shared[k] for k in self.keys}

    def arrays(self, i: int, copy: bool = False) -> dict[str, np.ndarray]:
        """Client i's parameters as numpy arrays: a ``RowView`` of views into the stacks unless
        ``copy`` (copy what outlives the round, such as client state, so it does not pin the
        whole stack)."""
        g, r = self.where[i]
        grp = self.groups[g]
        if grp.rows is None:
            grp.rows = StackedRows(
                self.keys,
                {k: v.numpy() for k, v in grp.stacked.items()},
                {k: v.numpy() for k, v in grp.shared.items()},
            )
        if copy:
            rows = grp.rows
            return {
                k: rows.stacked[k][r].copy() if k in rows.stacked else rows.shared[k].copy()
                for k in self.keys
            }
        return grp.rows.row(r)


def per_sample_loss(out: torch.Tensor, y: torch.Tensor, task: TaskSpec) -> torch.Tensor:
    """The summands of ``task_loss``: its mean over a batch is ``task_loss``.

    Cross-entropy is written as log-softmax + gather, which is what ``cross_entropy`` computes;
    under vmap the fused op goes through a Python decomposition whose first call imports sympy."""
    if task.is_classification:
        return -torch.log_softmax(out, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    diff = out.reshape(y.shape) - y
    sq = diff * diff
    return sq.reshape(len(y), -1).mean(1) if sq.dim() > 1 else sq


def _is_shared(values: Sequence[ArrayLike]) -> bool:
    first = values[0]
    return all(v is first for v in values[1:])


def _stack(values: Sequence[ArrayLike]) -> torch.Tensor:
    """A fresh contiguous [n, ...] tensor to train in place (never a view of the inputs)."""
    first = torch.as_tensor(values[0])
    out = POOL.empty((len(values), *first.shape), dtype=first.dtype)
    if _is_shared(values):
        return out.copy_(first)
    for i, v in enumerate(values):
        out[i].copy_(torch.as_tensor(v))
    return out


class _WeightMajorLinear(TorchFunctionMode):
    """Runs ``F.linear(x, W, b)`` as ``(W @ x^T)^T + b`` (the same product).

    Autograd then forms the weight gradient as ``g^T @ x``: shaped and laid out like the stacked
    weight [clients, out, in], which batched GEMM computes about 1.5x faster than the ``x^T @ g``
    that the usual form leads to, and which the in-place update then reads contiguously."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is nn.functional.linear and args and args[0].dim() >= 2:
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            out = torch.matmul(w, x.mT).mT
            return out if bias is None else out + bias
        return func(*args, **kwargs)


@lru_cache(maxsize=16)
def _activation_elems(model: nn.Module, sample_shape: tuple[int, ...]) -> int:
    """Elements of all leaf-module outputs for one sample (views such as Flatten excluded): a
    proxy for activation memory."""
    total = 0

    def hook(_m: nn.Module, inputs: tuple, out: object) -> None:
        nonlocal total
        if isinstance(out, torch.Tensor) and not any(
            isinstance(i, torch.Tensor) and i.data_ptr() == out.data_ptr() for i in inputs
        ):
            total += out.numel()

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model(torch.zeros((1, *sample_shape)))
    finally:
        for h in handles:
            h.remove()
    return total


def client_bytes(
    model: nn.Module,
    n_trainable: int,
    n_personal: int,
    spec: LocalSpec,
    sample_shape: tuple[int, ...],
    n_samples: int,
) -> tuple[int, int]:
    """Estimated (memory, per-step working set) one client adds to a group, in bytes.

    Memory: parameters, gradients and their temporaries, optimizer state, per-client frozen or
    centre tensors, one batch of activations and the client's data. Working set: what one step
    reads and writes (parameters, gradients, optimizer state, the batch and its activations)."""
    slots = 2 if spec.optimizer.name == "adam" else (1 if spec.optimizer.momentum > 0 else 0)
    acts = 2 * spec.batch_size * _activation_elems(model, sample_shape)
    batch = spec.batch_size * (math.prod(sample_shape) + 1)
    memory = n_trainable * (3 + slots) + n_personal + acts + batch + n_samples * (math.prod(sample_shape) + 1)
    working = n_trainable * (2 + slots) + n_personal + acts + batch
    return _F32 * memory, _F32 * working


def _groups(order: Sequence[int], cost: Sequence[Sequence[int]], budget: tuple[int, ...]) -> list[list[int]]:
    """Consecutive runs of ``order`` whose summed costs fit ``budget`` in every component (at
    least one client per group): the greedy packing, one jump per group instead of one test per
    client (cumulative sums and a binary search per component)."""
    order = np.asarray(order, dtype=np.int64)
    costs = np.asarray(cost, dtype=np.int64).reshape(-1, len(budget))[order]
    cum = np.concatenate([np.zeros((1, len(budget)), dtype=np.int64), np.cumsum(costs, axis=0)])
    groups: list[list[int]] = []
    start, n = 0, len(order)
    while start < n:
        end = n
        for c, limit in enumerate(budget):
            end = min(end, int(np.searchsorted(cum[:, c], cum[start, c] + limit, side="right")) - 1)
        end = max(end, start + 1)
        groups.append(order[start:end].tolist())
        start = end
    return groups


def _step_plan(
    orders: list[np.ndarray], sizes: np.ndarray, offsets: np.ndarray, batch_size: int, steps: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every client's mini-batches laid out for stepping: (rows of the group data in batch order,
    where each (client, step) batch starts in it, its length [clients, steps], 0 once a client is
    done). Built from one index array per client (``batch_order``), not one per client and step."""
    lens = batch_lengths(sizes, batch_size, steps)
    totals = np.fromiter((len(o) for o in orders), dtype=np.int64, count=len(orders))
    rows = np.concatenate(orders).astype(np.int64) + np.repeat(offsets, totals)
    starts = np.cumsum(lens, axis=1) - lens + (np.cumsum(totals) - totals)[:, None]
    return rows, starts, lens


def batched_local_train(
    model: nn.Module,
    starts: Sequence[ParamsLike],
    xs: Sequence[np.ndarray],
    ys: Sequence[np.ndarray],
    task: TaskSpec,
    spec: LocalSpec,
    steps: Sequence[int],
    rngs: Sequence[np.random.Generator],
    trainable: Iterable[str] | None = None,
    prox_centers: Sequence[ParamsLike] | None = None,
    prox_mu: float = 0.0,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    step_bytes: int | None = None,
    fused: bool = True,
) -> BatchedResult:
    """Train client i from ``starts[i]`` on ``(xs[i], ys[i])`` for ``steps[i]`` steps, all at once.

    Arguments mirror ``local_train`` with one entry per client. Inputs that are the same object
    for every client (FedAvg's broadcast model, FedProx's centre) are shared, not copied.
    Clients are trained in groups that fit ``memory_bytes`` and whose per-step working set fits
    ``step_bytes`` (default ``STEP_BYTES``: large enough to amortise per-step overhead, small
    enough that a step's parameters and gradients are still in cache when the update reads them).
    ``fused``: train Flatten-Linear-ReLU chains with the hand-written step of
    ``fedmtl.training.fused`` (same numbers, fewer passes over memory); False forces the generic
    vmapped autograd step."""
    step_bytes = STEP_BYTES if step_bytes is None else step_bytes
    n = len(starts)
    if not (len(xs) == len(ys) == len(steps) == len(rngs) == n) or n == 0:
        raise ValueError("batched_local_train: starts, xs, ys, steps and rngs need one entry per client")
    if prox_centers is not None and len(prox_centers) != n:
        raise ValueError("batched_local_train: prox_centers needs one entry per client")
    keys = list(starts[0])
    wanted = set(keys) if trainable is None else set(trainable)
    train_keys = [k for k in keys if k in wanted]
    frozen_keys = [k for k in keys if k not in wanted]
    use_prox = prox_mu > 0 and prox_centers is not None
    center_keys = [k for k in train_keys if use_prox and k in prox_centers[0]]  # type: ignore[index]

    numel = {k: torch.as_tensor(starts[0][k]).numel() for k in keys}
    personal = sum(numel[k] for k in frozen_keys if not _is_shared([s[k] for s in starts]))
    if use_prox:
        personal += sum(numel[k] for k in center_keys if not _is_shared([c[k] for c in prox_centers]))  # type: ignore[union-attr]
    sample_shape = tuple(xs[0].shape[1:])
    mem, work = client_bytes(model, sum(numel[k] for k in train_keys), personal, spec, sample_shape, 0)
    per_row = _F32 * (math.prod(sample_shape) + 1)
    # The largest stacked tensor a step allocates (a weight's gradient or the gathered batch).
    widest = _F32 * max([numel[k] for k in train_keys] + [spec.batch_size * math.prod(sample_shape)])
    cost = np.empty((n, 3), dtype=np.int64)
    cost[:, 0] = mem + per_row * np.fromiter((len(y) for y in ys), dtype=np.int64, count=n)
    cost[:, 1], cost[:, 2] = work, widest
    chain = linear_chain(model) if fused and not task.dense else None
    kernel = None if chain is None else FusedChainStep(chain, task, spec.optimizer, set(train_keys), prox_mu)

    # Longest-training clients first: at every step the clients still training form a prefix.
    order = np.argsort(-np.asarray(steps, dtype=np.int64), kind="stable")
    loss = np.zeros(n)
    seen = np.zeros(n, dtype=np.int64)
    where: list[tuple[int, int]] = [(0, 0)] * n
    groups: list[_Group] = []
    for members in _groups(order, cost, (memory_bytes, step_bytes, TENSOR_BYTES)):
        grp = _Group(clients=members)
        for row, i in enumerate(members):
            where[i] = (len(groups), row)
        groups.append(grp)
        _train_group(
            model, grp, starts, xs, ys, task, spec, steps, rngs, train_keys, frozen_keys,
            prox_centers if use_prox else None, center_keys, prox_mu, loss, seen, kernel,
        )  # fmt: skip
    return BatchedResult(keys=keys, loss=loss, seen=seen, groups=groups, where=where)


def _train_group(
    model: nn.Module,
    grp: _Group,
    starts: Sequence[ParamsLike],
    xs: Sequence[np.ndarray],
    ys: Sequence[np.ndarray],
    task: TaskSpec,
    spec: LocalSpec,
    steps: Sequence[int],
    rngs: Sequence[np.random.Generator],
    train_keys: list[str],
    frozen_keys: list[str],
    prox_centers: Sequence[ParamsLike] | None,
    center_keys: list[str],
    prox_mu: float,
    loss_out: np.ndarray,
    seen_out: np.ndarray,
    kernel: FusedChainStep | None = None,
) -> None:
    members = grp.clients
    m = len(members)
    # Parameters: trainable ones are always stacked (they diverge); frozen ones and the proximal
    # centre only when they differ between clients.
    for k in train_keys:
        grp.stacked[k] = _stack([starts[i][k] for i in members])
    frozen: dict[str, torch.Tensor] = {}
    frozen_dims: dict[str, int | None] = {}
    for k in frozen_keys:
        vals = [starts[i][k] for i in members]
        if _is_shared(vals):
            grp.shared[k] = frozen[k] = torch.as_tensor(vals[0])
            frozen_dims[k] = None
        else:
            grp.stacked[k] = frozen[k] = _stack(vals)
            frozen_dims[k] = 0
    center: dict[str, torch.Tensor] = {}
    center_dims: dict[str, int | None] = {}
    for k in center_keys:
        vals = [prox_centers[i][k] for i in members]  # type: ignore[index]
        shared = _is_shared(vals)
        # Shared centres are the caller's tensors: safe, since only fresh stacks are trained in place.
        center[k] = torch.as_tensor(vals[0]) if shared else _stack(vals)
        center_dims[k] = None if shared else 0

    # Data of the group in one tensor; each step gathers its padded batches from it.
    sizes = np.array([len(ys[i]) for i in members])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    sample_shape = tuple(xs[members[0]].shape[1:])
    if m <= GATHER_PER_CLIENT:
        # Few clients, each with many samples: gather every step's rows from each client's own
        # array (k small copies per step) rather than first copying the whole group's data.
        x_src = [torch.from_numpy(xs[i]).reshape(len(ys[i]), -1) for i in members]
        y_all = torch.from_numpy(np.concatenate([ys[i] for i in members]))
        x_flat = None
    else:
        x_all, y_all = _group_data([xs[i] for i in members], [ys[i] for i in members])
        x_flat = x_all.view(len(x_all), -1)
    row_elems = math.prod(sample_shape)
    # One buffer for every step's gathered batch (reused, so never page-faulted in again).
    x_dtype = torch.from_numpy(xs[members[0]][:0]).dtype
    x_buf = POOL.empty((m * min(spec.batch_size, int(sizes.max())), row_elems), dtype=x_dtype)
    n_steps = np.fromiter((int(steps[i]) for i in members), dtype=np.int64, count=m)
    orders = [batch_order(len(ys[i]), spec.batch_size, int(steps[i]), rngs[i]) for i in members]
    order_rows, batch_start, batch_len = _step_plan(orders, sizes, offsets, spec.batch_size, n_steps)

    step_fn = (
        None
        if kernel is not None
        else _step_fn(model, task, prox_mu if center else 0.0, frozen_dims, center_dims)
    )
    state = optim.init_state(spec.optimizer, {k: grp.stacked[k] for k in train_keys}, zeros=_pooled_zeros)
    loss_sum = torch.zeros(m, dtype=torch.float64)
    for t in range(int(n_steps.max())):
        k = int((n_steps > t).sum())
        lens = batch_len[:k, t]
        width = int(lens.max())
        pos = np.arange(width)
        real = pos[None, :] < lens[:, None]
        # Padding repeats each client's first sample; the mask keeps it out of loss and gradient.
        src = np.where(real, batch_start[:k, t, None] + pos[None, :], 0)
        idx = np.where(real, order_rows[src], offsets[:k, None])
        mask = real.astype(np.float32)
        counts = lens.astype(np.float32)
        gi = torch.from_numpy(idx)
        rows = x_buf[: k * width]
        if x_flat is not None:
            torch.index_select(x_flat, 0, gi.view(-1), out=rows)
        else:
            local = torch.from_numpy(idx - offsets[:k, None])
            for j in range(k):
                torch.index_select(x_src[j], 0, local[j], out=rows[j * width : (j + 1) * width])
        xb = rows.view(k, width, *sample_shape)
        yb, mb = y_all[gi], torch.from_numpy(mask)
        live = {key: grp.stacked[key][:k] for key in train_keys}
        fz = {key: v[:k] if frozen_dims[key] == 0 else v for key, v in frozen.items()}
        ct = {key: v[:k] if center_dims[key] == 0 else v for key, v in center.items()}
        counts_t = torch.from_numpy(counts)
        if kernel is not None:
            batch_loss = kernel(live, fz, ct, xb, yb, mb, counts_t, _state_view(state, k, t))
        else:
            grads, batch_loss = step_fn(live, fz, ct, xb, yb, mb)
            optim.step_(spec.optimizer, live, grads, _state_view(state, k, t))
        loss_sum[:k] += batch_loss.detach().double() * counts_t.double()
    seen = batch_len.sum(1)
    idx_members = np.asarray(members)
    seen_out[idx_members] = seen
    loss_out[idx_members] = loss_sum.numpy() / np.maximum(seen, 1)


#: Concatenated group data kept between calls, least recently used first, up to DATA_CACHE_BYTES.
_DATA_CACHE: OrderedDict[tuple[int, ...], tuple[list[np.ndarray], torch.Tensor, torch.Tensor]] = OrderedDict()
DATA_CACHE_BYTES = 256 * 2**20


def _group_data(xs: list[np.ndarray], ys: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's samples in one tensor each for x and y.

    With full participation the same groups come back every round, so their concatenations are
    kept (least recently used dropped beyond ``DATA_CACHE_BYTES``). Entries are keyed by the
    arrays' ids and hold the arrays, so an id cannot be reused while its entry exists; client
    data is never modified in place, so a kept concatenation cannot go stale."""
    key = tuple(id(a) for a in xs) + tuple(id(a) for a in ys)
    hit = _DATA_CACHE.get(key)
    if hit is not None:
        _DATA_CACHE.move_to_end(key)
        return hit[1], hit[2]
    x_all = torch.from_numpy(np.concatenate(xs))
    y_all = torch.from_numpy(np.concatenate(ys))
    size = x_all.nbytes + y_all.nbytes
    if size <= DATA_CACHE_BYTES:
        _DATA_CACHE[key] = (xs + ys, x_all, y_all)
        while sum(v[1].nbytes + v[2].nbytes for v in _DATA_CACHE.values()) > DATA_CACHE_BYTES:
            _DATA_CACHE.popitem(last=False)
    return x_all, y_all


def _pooled_zeros(like: torch.Tensor) -> torch.Tensor:
    return POOL.zeros(like.shape, like.dtype)


def _state_view(state: dict, k: int, t: int) -> dict:
    """The optimizer state of the first k clients, as views (updates land in the full state)."""
    out: dict = {name: {key: v[:k] for key, v in slot.items()} for name, slot in state.items() if name != "t"}
    if "t" in state:
        out["t"] = t  # every client still training has done exactly t steps
    return out


StepFn = Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]]


def _step_fn(
    model: nn.Module,
    task: TaskSpec,
    mu: float,
    frozen_dims: dict[str, int | None],
    center_dims: dict[str, int | None],
) -> StepFn:
    """Per-client gradients for one step of all live clients: (grads [k, ...], losses [k]).

    The forward pass is vmapped over clients; the backward pass is ordinary autograd of the summed
    objectives, whose gradient w.r.t. client i's slice is client i's own gradient (the clients do
    not interact). This avoids ``torch.func.grad``, whose first call imports torch._dynamo
    (seconds of start-up) while giving the same numbers."""

    def client_loss(
        params: dict[str, torch.Tensor],
        frozen: dict[str, torch.Tensor] | None,
        x: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        out = functional_call(model, {**(frozen or {}), **params}, (x,))
        return (per_sample_loss(out, y, task) * mask).sum() / mask.sum()

    losses_fn = vmap(client_loss, in_dims=(0, frozen_dims or None, 0, 0, 0))

    def step(
        live: dict[str, torch.Tensor],
        frozen: dict[str, torch.Tensor],
        center: dict[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        leaves = {k: v.detach().requires_grad_(True) for k, v in live.items()}
        with _WeightMajorLinear():
            losses = losses_fn(leaves, frozen or None, x, y, mask)
        objective = losses.sum()
        if mu > 0 and center:
            # A shared centre broadcasts over the client axis; a stacked one matches it.
            objective = objective + 0.5 * mu * sum(((leaves[k] - c) ** 2).sum() for k, c in center.items())
        grads = torch.autograd.grad(objective, list(leaves.values()))
        return dict(zip(leaves, grads, strict=True)), losses.detach()

    return step


def batch_support(model: nn.Module, task: TaskSpec, x: np.ndarray, y: np.ndarray) -> str | None:
    """None when ``model`` trains under ``vmap``, else a one-line reason (data-dependent control
    flow, ``.item()``, in-place buffer updates and random ops cannot be batched)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    spec = LocalSpec(optimizer=optim.OptimizerSpec(lr=0.0), batch_size=2, steps=1)
    xs, ys = [x[:2], x[:1]], [y[:2], y[:1]]
    try:
        batched_local_train(
            model, [params, params], xs, ys, task, spec, [1, 1],
            [np.random.default_rng(0), np.random.default_rng(1)],
        )  # fmt: skip
    except Exception as exc:  # noqa: BLE001 (any failure means: run this model sequentially)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"model {type(model).__name__} cannot be batched ({type(exc).__name__}: {first[:160]})"
    return None
