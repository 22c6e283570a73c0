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
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import vmap
from torch.overrides import TorchFunctionMode

from fedmtl.data.federated import TaskSpec
from fedmtl.training import optim
from fedmtl.training.buffers import POOL
from fedmtl.training.convnet import ConvNetStep, conv_program
from fedmtl.training.device import current as current_device
from fedmtl.training.device import on_cpu, to_device, to_host
from fedmtl.training.fused import linear_chain
from fedmtl.training.local import LocalSpec, batch_lengths, batch_orders
from fedmtl.training.objectives import TASK_LOSS, Objective, add_prox_grad
from fedmtl.training.rows import StackedRows

ArrayLike = np.ndarray | torch.Tensor
ParamsLike = Mapping[str, ArrayLike]

#: Default budget for one group's stacked parameters, gradients, optimizer state and batches.
DEFAULT_MEMORY_BYTES = 2 * 2**30
#: Default cap on one group's per-step working set (see ``batched_local_train``).
STEP_BYTES = 12 * 2**20
#: Cap on any one stacked tensor a step allocates. Larger blocks come from mmap and are returned
#: on free, so every step would page-fault them in again (measured: 10x slower than reusing heap
#: memory for a 40 MB gradient); blocks below glibc's 32 MiB mmap ceiling get recycled.
TENSOR_BYTES = 16 * 2**20
_F32 = 4
#: Cap on a conv net group's per-step working set (activations, gradients, factor rows): its steps
#: are large products and convolutions, which need no cache blocking across clients, so this only
#: bounds the activations of one step.
CONV_STEP_BYTES = 512 * 2**20
#: Peak bytes of the step plan per (sample, step) entry (index, mask and scale arrays and the
#: temporaries that build them).
PLAN_BYTES = 64


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

    def all_arrays(self) -> list[dict[str, np.ndarray]]:
        """``[self.arrays(i) for i in range(len(self))]``, each group's row views built at once."""
        per_group = [self._rows(grp).rows() for grp in self.groups]
        return [per_group[g][r] for g, r in self.where]

    def _rows(self, grp: _Group) -> StackedRows:
        if grp.rows is None:
            grp.rows = StackedRows(
                self.keys,
                {k: to_host(v).numpy() for k, v in grp.stacked.items()},
                {k: to_host(v).numpy() for k, v in grp.shared.items()},
            )
        return grp.rows

    def arrays(self, i: int, copy: bool = False) -> dict[str, np.ndarray]:
        """Client i's parameters as numpy arrays: a ``RowView`` of views into the stacks unless
        ``copy`` (copy what outlives the round, such as client state, so it does not pin the
        whole stack)."""
        g, r = self.where[i]
        rows = self._rows(self.groups[g])
        if copy:
            return {
                k: rows.stacked[k][r].copy() if k in rows.stacked else rows.shared[k].copy()
                for k in self.keys
            }
        return rows.row(r)


class _Repeated(list):
    """A list that is one object repeated (``_column_reader``'s answer for a shared dict)."""


def _is_shared(values: Sequence[ArrayLike]) -> bool:
    if type(values) is _Repeated:
        return True
    first = values[0]
    return all(v is first for v in values[1:])


def _column_reader(dicts: Sequence[ParamsLike], members: list[int]) -> Callable[[str], list[ArrayLike]]:
    """``key -> [dicts[i][key] for i in members]``, read once when every member holds the very
    same dict (FedAvg's broadcast model): then each key's values are one object, repeated."""
    first = dicts[members[0]]
    if all(dicts[i] is first for i in members):
        m = len(members)
        return lambda key: _Repeated([first[key]] * m)
    return lambda key: [dicts[i][key] for i in members]


def _empty(shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A working tensor: from the host's buffer pool, or on the device."""
    if on_cpu():
        return POOL.empty(shape, dtype)
    return torch.empty(tuple(shape), dtype=dtype, device=current_device())


def _stack(values: Sequence[ArrayLike]) -> torch.Tensor:
    """A fresh contiguous [n, ...] tensor to train in place (never a view of the inputs)."""
    first = torch.as_tensor(values[0])
    out = _empty((len(values), *first.shape), dtype=first.dtype)
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
    dtype = next(model.parameters(), torch.zeros(())).dtype
    try:
        with torch.no_grad():
            model(torch.zeros((1, *sample_shape), dtype=dtype))
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
) -> tuple[int, int]:
    """Estimated (memory, per-step working set) one client adds to a group, in bytes, apart from
    its data and step plan (they depend on its size; ``batched_local_train`` adds them).

    Memory: parameters, gradients and their temporaries, optimizer state, per-client frozen or
    centre tensors and one batch of activations. Working set: what one step
    reads and writes (parameters, gradients, optimizer state, the batch and its activations)."""
    slots = _slots(spec)
    acts = 2 * spec.batch_size * _activation_elems(model, sample_shape)
    batch = spec.batch_size * (math.prod(sample_shape) + 1)
    memory = n_trainable * (3 + slots) + n_personal + acts + batch
    working = n_trainable * (2 + slots) + n_personal + acts + batch
    return _F32 * memory, _F32 * working


def _slots(spec: LocalSpec) -> int:
    """Optimizer state tensors per parameter."""
    return 2 if spec.optimizer.name == "adam" else (1 if spec.optimizer.momentum > 0 else 0)


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.named_parameters()}


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


@dataclass
class _StepPlan:
    """Every step's padded batches for one group, laid out step after step and built once with
    array operations (not per step and client). Step t trains the first ``live[t]`` clients on
    batches padded to ``width[t]``: its entries (client-major, ``width[t]`` per client) are
    ``entry[t]:entry[t + 1]`` and its (client, step) pairs ``pair[t]:pair[t + 1]``."""

    live: list[int]
    width: list[int]
    entry: list[int]
    pair: list[int]
    local: np.ndarray  # row of each entry in its client's own data; padding repeats row 0
    entry_client: np.ndarray  # group row of each entry's client
    mask: np.ndarray  # 1.0 for a real sample, 0.0 for padding (float32)
    scale: np.ndarray  # mask / the batch's real length: d(batch mean) / d(sample loss) (float32)
    pair_client: np.ndarray  # group row of each pair
    pair_count: np.ndarray  # real samples of each pair's batch


def _step_plan(
    order_rows: np.ndarray, totals: np.ndarray, sizes: np.ndarray, batch_size: int, steps: np.ndarray
) -> _StepPlan:
    """The plan from every client's ``batch_order``, concatenated (``batch_orders``: the rows and
    each client's count); ``steps`` must be descending (the clients still training at any step
    are then a prefix)."""
    lens = batch_lengths(sizes, batch_size, steps)  # [clients, steps]
    batch_start = np.cumsum(lens, axis=1) - lens + (np.cumsum(totals) - totals)[:, None]
    n_steps = lens.shape[1]
    live = (steps[None, :] > np.arange(n_steps)[:, None]).sum(1)
    pair = np.concatenate([[0], np.cumsum(live)])
    pair_t = np.repeat(np.arange(n_steps), live)
    pair_j = np.arange(pair[-1]) - np.repeat(pair[:-1], live)
    pair_len = lens[pair_j, pair_t]
    width = np.maximum.reduceat(pair_len, pair[:-1])
    pair_width = width[pair_t]
    entry_of_pair = np.concatenate([[0], np.cumsum(pair_width)])
    e_pair = np.repeat(np.arange(pair[-1]), pair_width)
    pos = np.arange(entry_of_pair[-1]) - entry_of_pair[:-1][e_pair]
    real = pos < pair_len[e_pair]
    src = np.where(real, batch_start[pair_j, pair_t][e_pair] + pos, 0)
    mask = real.astype(np.float32)
    return _StepPlan(
        live=live.tolist(),
        width=width.tolist(),
        entry=entry_of_pair[pair].tolist(),
        pair=pair.tolist(),
        local=np.where(real, order_rows[src], 0),
        entry_client=pair_j[e_pair],
        mask=mask,
        scale=mask / pair_len[e_pair].astype(np.float32),
        pair_client=pair_j,
        pair_count=pair_len,
    )


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
    objective: Objective = TASK_LOSS,
    bounds: Sequence[tuple[str, float, float]] = (),
) -> BatchedResult:
    """Train client i from ``starts[i]`` on ``(xs[i], ys[i])`` for ``steps[i]`` steps, all at once.

    Arguments mirror ``local_train`` with one entry per client. Inputs that are the same object
    for every client (FedAvg's broadcast model, FedProx's centre) are shared, not copied.
    Clients are trained in groups that fit ``memory_bytes`` and whose per-step working set fits
    ``step_bytes`` (default ``STEP_BYTES``: large enough to amortise per-step overhead, small
    enough that a step's parameters and gradients are still in cache when the update reads them).
    ``fused``: train Flatten-Linear-ReLU chains with the hand-written step of
    ``fedmtl.training.fused`` (same numbers, fewer passes over memory); False forces the generic
    vmapped autograd step, which also serves custom ``objective``s and ``bounds``."""
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
    bounds = [b for b in bounds if b[0] in train_keys]  # a frozen key keeps its value anyway
    # the hand-written steps are host code (buffer pool, oneDNN): devices take the vmapped step
    host = fused and not task.dense and on_cpu()
    chain = linear_chain(model) if host else None
    kernel = None
    if chain is not None:
        kernel = objective.chain_step(chain, task, spec.optimizer, set(train_keys), prox_mu, bounds)
    program = conv_program(model) if host and chain is None and len(sample_shape) == 3 else None
    if program is not None:
        kernel = objective.conv_step(
            program, _shapes(model), task, spec.optimizer, set(train_keys), prox_mu, bounds
        )
    mem, work = client_bytes(model, sum(numel[k] for k in train_keys), personal, spec, sample_shape)
    per_row = _F32 * (math.prod(sample_shape) + 1)
    # The largest stacked tensor a step allocates (a weight's gradient or the gathered batch).
    widest = _F32 * max([numel[k] for k in train_keys] + [spec.batch_size * math.prod(sample_shape)])
    cost = np.empty((n, 3), dtype=np.int64)
    sizes = np.fromiter((len(y) for y in ys), dtype=np.int64, count=n)
    # The step plan holds a few numbers per (sample, step) entry, built with temporaries.
    entries = np.asarray(steps, dtype=np.int64) * np.minimum(spec.batch_size, sizes)
    cost[:, 0] = mem + per_row * sizes + PLAN_BYTES * entries
    cost[:, 1], cost[:, 2] = work, widest
    caps = (memory_bytes, step_bytes, TENSOR_BYTES)
    if isinstance(kernel, ConvNetStep):
        # A conv net's step is big enough on its own: more clients per group only share the
        # dense layers' start products better. Its per-client memory is one copy of the parameters
        # (the result), the low-rank rows its steps add, gradients of the rest and activations.
        spared = _F32 * (2 + _slots(spec)) * kernel.low_rank_numel(entries) - kernel.factor_bytes(entries)
        cost[:, 0] -= spared
        cost[:, 1] -= spared
        caps = (memory_bytes, CONV_STEP_BYTES, memory_bytes)

    # Longest-training clients first: at every step the clients still training form a prefix.
    order = np.argsort(-np.asarray(steps, dtype=np.int64), kind="stable")
    loss = np.zeros(n)
    seen = np.zeros(n, dtype=np.int64)
    where: list[tuple[int, int]] = [(0, 0)] * n
    groups: list[_Group] = []
    # Every client's batch order, in training order, from one call: a group's are then a slice.
    steps_at, sizes_at = np.asarray(steps, dtype=np.int64)[order], sizes[order]
    all_rows, all_totals = batch_orders(sizes_at, spec.batch_size, steps_at, [rngs[i] for i in order])
    row_start = [0, *np.cumsum(all_totals).tolist()]  # client j's rows: row_start[j]:row_start[j + 1]
    done = 0
    for members in _groups(order, cost, caps):
        grp = _Group(clients=members)
        for row, i in enumerate(members):
            where[i] = (len(groups), row)
        groups.append(grp)
        lo, hi = done, done + len(members)
        batches = (
            all_rows[row_start[lo] : row_start[hi]],
            all_totals[lo:hi],
            steps_at[lo:hi],
            sizes_at[lo:hi],
        )
        done = hi
        _train_group(
            model, grp, starts, xs, ys, task, spec, batches, train_keys, frozen_keys,
            prox_centers if use_prox else None, center_keys, prox_mu, loss, seen, kernel, objective, bounds,
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
    batches: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    train_keys: list[str],
    frozen_keys: list[str],
    prox_centers: Sequence[ParamsLike] | None,
    center_keys: list[str],
    prox_mu: float,
    loss_out: np.ndarray,
    seen_out: np.ndarray,
    kernel: Any = None,
    objective: Objective = TASK_LOSS,
    bounds: Sequence[tuple[str, float, float]] = (),
) -> None:
    members = grp.clients
    m = len(members)
    column = _column_reader(starts, members)
    # Parameters: trainable ones are always stacked (they diverge); frozen ones and the proximal
    # centre only when they differ between clients.
    starts_shared: dict[str, torch.Tensor] = {}  # the start every member shares, by key
    for k in train_keys:
        vals = column(k)
        grp.stacked[k] = _stack(vals)
        if _is_shared(vals):
            starts_shared[k] = to_device(torch.as_tensor(vals[0]))
    frozen: dict[str, torch.Tensor] = {}
    frozen_dims: dict[str, int | None] = {}
    for k in frozen_keys:
        vals = column(k)
        if _is_shared(vals):
            grp.shared[k] = frozen[k] = to_device(torch.as_tensor(vals[0]))
            frozen_dims[k] = None
        else:
            grp.stacked[k] = frozen[k] = _stack(vals)
            frozen_dims[k] = 0
    center: dict[str, torch.Tensor] = {}
    center_dims: dict[str, int | None] = {}
    center_column = None if prox_centers is None else _column_reader(prox_centers, members)
    for k in center_keys:
        vals = center_column(k)  # type: ignore[misc]
        shared = _is_shared(vals)
        # Shared centres are the caller's tensors: safe, since only fresh stacks are trained in place.
        center[k] = to_device(torch.as_tensor(vals[0])) if shared else _stack(vals)
        center_dims[k] = None if shared else 0

    # Each step gathers its padded batches from the group's samples held as rows of one tensor.
    x_all, x_first = _rows_of([xs[i] for i in members])
    y_all, y_first = _rows_of([ys[i] for i in members])
    sample_shape = tuple(x_all.shape[1:])
    x_flat = x_all.view(len(x_all), -1)
    order_rows, totals, n_steps, sizes = batches  # the members' batch orders, lengths, steps, sizes
    plan = _step_plan(order_rows, totals, sizes, spec.batch_size, n_steps)
    x_rows = to_device(torch.from_numpy(x_first[plan.entry_client] + plan.local))
    y_rows = to_device(torch.from_numpy(y_first[plan.entry_client] + plan.local))
    mask_t, scale_t = to_device(torch.from_numpy(plan.mask)), to_device(torch.from_numpy(plan.scale))
    # One buffer for every step's gathered batch (reused, so never page-faulted in again; the
    # fused step also keeps its views of them from step to step).
    widest = m * min(spec.batch_size, int(sizes.max()))
    x_buf = _empty((widest, x_flat.shape[1]), dtype=x_flat.dtype)
    y_buf = _empty((widest, *y_all.shape[1:]), dtype=y_all.dtype)

    step_fn = (
        None
        if kernel is not None
        else _step_fn(model, task, prox_mu if center else 0.0, frozen_dims, center_dims, objective)
    )
    state = optim.init_state(spec.optimizer, {k: grp.stacked[k] for k in train_keys}, zeros=_pooled_zeros)
    if kernel is not None:
        kernel.begin_group(grp.stacked, starts_shared, int(sum(plan.width)))
    pair_loss = torch.empty(plan.pair[-1], dtype=torch.float32, device=x_flat.device)
    views: dict[int, tuple[dict, dict, dict, dict]] = {}  # live clients -> their parameter views
    for t, (k, width) in enumerate(zip(plan.live, plan.width, strict=True)):
        lo, hi = plan.entry[t], plan.entry[t + 1]
        xb = torch.index_select(x_flat, 0, x_rows[lo:hi], out=x_buf[: k * width])
        xb = xb.view(k, width, *sample_shape)
        yb = torch.index_select(y_all, 0, y_rows[lo:hi], out=y_buf[: k * width])
        yb = yb.view(k, width, *y_all.shape[1:])  # per step: dense targets are large
        if k not in views:
            views[k] = (
                {key: grp.stacked[key][:k] for key in train_keys},
                {key: v[:k] if frozen_dims[key] == 0 else v for key, v in frozen.items()},
                {key: v[:k] if center_dims[key] == 0 else v for key, v in center.items()},
                _state_view(state, k),
            )
        live, fz, ct, opt_state = views[k]
        if "t" in state:
            opt_state["t"] = t  # every client still training has done exactly t steps
        if kernel is not None:
            batch_loss = kernel(live, fz, ct, xb, yb, scale_t[lo:hi].view(k, width), opt_state)
        else:
            grads, batch_loss = step_fn(live, fz, ct, xb, yb, mask_t[lo:hi].view(k, width))
            optim.step_(spec.optimizer, live, grads, opt_state)
            for key, low, high in bounds:
                live[key].clamp_(low, high)
        pair_loss[plan.pair[t] : plan.pair[t + 1]] = batch_loss.detach()
    if kernel is not None:
        kernel.end_group(grp.stacked)
    seen = np.bincount(plan.pair_client, weights=plan.pair_count, minlength=m).astype(np.int64)
    loss_sum = np.bincount(
        plan.pair_client, weights=to_host(pair_loss).numpy().astype(np.float64) * plan.pair_count, minlength=m
    )
    idx_members = np.asarray(members)
    seen_out[idx_members] = seen
    loss_out[idx_members] = loss_sum / np.maximum(seen, 1)


#: Concatenated group data kept between calls, least recently used first, up to DATA_CACHE_BYTES;
#: an entry goes when any of its arrays does (clients made on access free theirs).
_DATA_CACHE: OrderedDict[tuple[int, ...], tuple[list[weakref.ref], torch.Tensor]] = OrderedDict()
DATA_CACHE_BYTES = 256 * 2**20


def _rows_of(arrays: list[np.ndarray]) -> tuple[torch.Tensor, np.ndarray]:
    """The arrays as rows of one tensor, and where each array's first row is in it.

    Without a copy when they are row blocks of one array (``load_federated`` lays clients out
    so); else their concatenation, which is kept for the next call (with full participation the
    same groups come back every round; least recently used dropped beyond ``DATA_CACHE_BYTES``).
    Entries are keyed by the arrays' ids and dropped when any of those arrays dies, so an id
    cannot be reused while its entry exists; client data is never modified in place, so a kept
    concatenation cannot go stale."""
    if not on_cpu():
        return _device_rows(arrays)
    key = tuple(map(id, arrays))
    shared = _known_layout(key, arrays)
    if shared is None:
        shared = _shared_base(arrays)
        if shared is not None:
            _remember_layout(key, arrays, *shared)
    if shared is not None:
        return torch.from_numpy(shared[0]), shared[1]
    first = np.concatenate([[0], np.cumsum([len(a) for a in arrays])[:-1]]).astype(np.int64)
    hit = _DATA_CACHE.get(key)
    if hit is not None:
        _DATA_CACHE.move_to_end(key)
        return hit[1], first
    rows = torch.from_numpy(np.concatenate(arrays))
    if rows.nbytes <= DATA_CACHE_BYTES:

        def gone(_: weakref.ref, key: tuple[int, ...] = key) -> None:
            _DATA_CACHE.pop(key, None)  # an array of the group died: its id may be reused

        _DATA_CACHE[key] = ([weakref.ref(a, gone) for a in arrays], rows)
        while sum(v[1].nbytes for v in _DATA_CACHE.values()) > DATA_CACHE_BYTES:
            _DATA_CACHE.popitem(last=False)
    return rows, first


def _device_rows(arrays: list[np.ndarray]) -> tuple[torch.Tensor, np.ndarray]:
    """``_rows_of`` on a device: the group's samples copied over once per call (only the sampled
    clients' rows travel, not the pool they are views of)."""
    first = np.concatenate([[0], np.cumsum([len(a) for a in arrays])[:-1]]).astype(np.int64)
    return to_device(torch.from_numpy(np.ascontiguousarray(np.concatenate(arrays)))), first


#: Layouts found by ``_shared_base``, by the arrays' ids: checking a layout costs 1.5 us per array,
#: two arrays per client and round; held by weak references, so a cached entry pins no data, and
#: an entry counts only while every array it names is alive (so no id has been reused).
_LAYOUTS: OrderedDict[tuple[int, ...], tuple[list[weakref.ref], weakref.ref, np.ndarray]] = OrderedDict()
_MAX_LAYOUTS = 512


def _known_layout(key: tuple[int, ...], arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    hit = _LAYOUTS.get(key)
    if hit is None:
        return None
    refs, base_ref, first = hit
    base = base_ref()
    if base is None or not all(r() is a for r, a in zip(refs, arrays, strict=True)):
        del _LAYOUTS[key]
        return None
    _LAYOUTS.move_to_end(key)
    return base, first


def _remember_layout(
    key: tuple[int, ...], arrays: list[np.ndarray], base: np.ndarray, first: np.ndarray
) -> None:
    first.flags.writeable = False  # handed out again: nobody may edit it
    _LAYOUTS[key] = ([weakref.ref(a) for a in arrays], weakref.ref(base), first)
    while len(_LAYOUTS) > _MAX_LAYOUTS:
        _LAYOUTS.popitem(last=False)


def _shared_base(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """(the one C-contiguous array every array is a block of whole rows of, each block's first
    row), or None."""
    base = arrays[0].base
    if not isinstance(base, np.ndarray) or base.ndim == 0 or not base.flags.c_contiguous:
        return None
    start, row = base.__array_interface__["data"][0], base.strides[0]
    if row <= 0:  # rows of no elements
        return None
    first = np.empty(len(arrays), dtype=np.int64)
    for i, a in enumerate(arrays):
        if a.base is not base or a.dtype != base.dtype or a.shape[1:] != base.shape[1:]:
            return None
        if not a.flags.c_contiguous:
            return None
        offset = a.__array_interface__["data"][0] - start
        if offset % row or not 0 <= offset // row <= len(base) - len(a):
            return None
        first[i] = offset // row
    return base, first


def _pooled_zeros(like: torch.Tensor) -> torch.Tensor:
    if like.device.type != "cpu":
        return torch.zeros_like(like)
    return POOL.zeros(like.shape, like.dtype)


def _state_view(state: dict, k: int) -> dict:
    """The optimizer state of the first k clients, as views (updates land in the full state)."""
    return {name: {key: v[:k] for key, v in slot.items()} for name, slot in state.items() if name != "t"}


StepFn = Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]]


def _step_fn(
    model: nn.Module,
    task: TaskSpec,
    mu: float,
    frozen_dims: dict[str, int | None],
    center_dims: dict[str, int | None],
    objective: Objective = TASK_LOSS,
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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return objective.masked(model, {**(frozen or {}), **params}, x, y, task, mask)

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
            values, losses = losses_fn(leaves, frozen or None, x, y, mask)
        grads = torch.autograd.grad(values.sum(), list(leaves.values()))
        # A shared centre broadcasts over the client axis; a stacked one matches it.
        grads = add_prox_grad(dict(zip(leaves, grads, strict=True)), leaves, center, mu)
        return grads, losses.detach()

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
