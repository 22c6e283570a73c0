"""A hand-written training step for Flatten-Linear-ReLU chains over parameters stacked on a client axis.

Most federated benchmarks train MLPs and linear models. For them the vmapped autograd step of
``fedmtl.training.batched`` spends much of its time outside the two big products of each layer
(the forward ``W @ a`` and the weight gradient ``delta @ a^T``): building the graph, writing every
gradient to memory and reading it back in the optimizer. This step does the same arithmetic by
hand with batched matrix products and, for SGD, folds the update into the gradient product
(``W <- beta*W - lr * delta @ a^T`` is one ``baddbmm_``), so the largest tensors are read and
written once per step. The numbers equal autograd's to float rounding (tested against
``local_train``); any model that is not such a chain uses the generic step."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from fedmtl.data.federated import TaskSpec
from fedmtl.training import onednn
from fedmtl.training.buffers import POOL
from fedmtl.training.optim import OptimizerSpec, step_


@dataclass(frozen=True)
class Layer:
    """One ``nn.Linear`` of a chain (parameter names as in ``named_parameters``), and whether a
    ReLU follows it."""

    weight: str
    bias: str | None
    relu: bool


def linear_chain(model: nn.Module) -> list[Layer] | None:
    """The model as a list of Linear(+ReLU) layers when its forward is exactly that chain (after
    an optional leading Flatten), else None.

    Recognised: ``nn.Sequential`` of ``Flatten``/``Linear``/``ReLU``/``Identity`` (nested
    Sequentials included) and fedmtl's ``mlp`` and ``linear`` models (``head(body(x))``). Only these
    exact types are accepted: a subclass may override ``forward``."""
    ops = _ops(model, "")
    if ops is None:
        return None
    while ops and ops[0] == ("flatten",):
        ops.pop(0)
    layers: list[Layer] = []
    for op in ops:
        if op[0] == "linear":
            layers.append(Layer(op[1], op[2], relu=False))
        elif op[0] == "relu" and layers and not layers[-1].relu:
            last = layers[-1]
            layers[-1] = Layer(last.weight, last.bias, relu=True)
        else:  # a Flatten after the first layer, or two ReLUs in a row
            return None
    return layers or None


def _ops(module: nn.Module, prefix: str) -> list[tuple] | None:
    from fedmtl.models.nets import MLP
    from fedmtl.models.nets import Linear as LinearModel

    kind = type(module)
    if kind is nn.Linear:
        return [("linear", f"{prefix}weight", f"{prefix}bias" if module.bias is not None else None)]
    if kind is nn.ReLU:
        return [("relu",)]
    if kind is nn.Identity:
        return []
    if kind is nn.Flatten:
        return [("flatten",)] if (module.start_dim, module.end_dim) == (1, -1) else None
    if kind is nn.Sequential:
        children = [(name, child) for name, child in module.named_children()]
    elif kind in (MLP, LinearModel):
        children = [("body", module.body), ("head", module.head)]
    else:
        return None
    out: list[tuple] = []
    for name, child in children:
        sub = _ops(child, f"{prefix}{name}.")
        if sub is None:
            return None
        out += sub
    return out


#: Bound step shapes kept per trainer (a group has about two: full batches and the last one).
_MAX_BINDINGS = 64


@dataclass
class _Bound:
    """Views one step shape reads: activations (``acts[0]`` is the input, feature-major), per
    layer (weight, bias view, whether the bias is the product's initial value), the layer-below
    gradient buffers with transposed weights, the update's inputs, labels and the -1 tensor."""

    acts: list[torch.Tensor]
    forward: list[tuple[torch.Tensor, torch.Tensor | None, bool]]
    below: dict[int, tuple[torch.Tensor, torch.Tensor]]
    inputs: dict[int, torch.Tensor]
    label: torch.Tensor
    minus_one: torch.Tensor
    #: each product's route, by ``_products``' tag: True sends it to oneDNN's float32 kernels
    #: (``fedmtl.training.onednn.routes``); empty when no product of the step goes there
    routes: dict[tuple[str, int], bool] = field(default_factory=dict)


class FusedChainStep:
    """One local step of every live client: forward, loss, backward and the optimizer update.

    Parameters arrive as dicts of tensors: ``live`` holds the trainable ones ([k, ...] views,
    updated in place), ``frozen`` the others, ``center`` the proximal centres; a frozen or centre
    tensor is either stacked ([k, ...]) or one tensor shared by every client. The loss of client i
    is the mean over its real samples, exactly ``task_loss`` on its batch: ``scale`` [k, B] is 1 /
    (client i's real batch length) on its real samples and 0 on padding."""

    def __init__(
        self,
        chain: list[Layer],
        task: TaskSpec,
        opt: OptimizerSpec,
        trainable: set[str],
        mu: float,
    ) -> None:
        self.chain = chain
        self.task = task
        self.opt = opt
        self.trainable = trainable
        self.mu = mu
        trained = [i for i, layer in enumerate(chain) if {layer.weight, layer.bias} & trainable]
        #: the lowest layer with a trainable parameter: backpropagation stops there
        self.lowest = min(trained) if trained else len(chain)
        self.workspace = Workspace()
        self._ones: torch.Tensor | None = None
        self._bindings: dict[tuple, _Bound] = {}

    @torch.no_grad()
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
        bound = self._bound(live, frozen, x, y, k, width)
        if not bound.routes:
            return self._step(bound, live, center, scale, state, None)
        before = onednn.begin()
        try:
            return self._step(bound, live, center, scale, state, before)
        finally:
            onednn.end(before)

    def _step(
        self,
        bound: _Bound,
        live: dict[str, torch.Tensor],
        center: dict[str, torch.Tensor],
        scale: torch.Tensor,
        state: dict,
        before: str | None,
    ) -> torch.Tensor:
        """``before``: the product setting to restore (``onednn.begin``'s answer) when some of the
        step's products go to oneDNN, else None (no product does)."""
        acts = bound.acts
        for i, (w, b, bias_first) in enumerate(bound.forward):
            out = acts[i + 1]
            if before is not None:
                onednn.select(bound.routes[("forward", i)], before)
            if bias_first:  # stacked weight and bias: the bias is the product's initial value
                torch.baddbmm(b, w, acts[i], out=out)
            else:
                torch.matmul(w, acts[i], out=out)
                if b is not None:
                    out += b
            if self.chain[i].relu:
                out.clamp_min_(0.0)
        losses, delta = self._loss_and_delta(acts[-1], bound.label, scale, bound.minus_one)
        grads: dict[str, torch.Tensor] = {}
        for i in range(len(self.chain) - 1, self.lowest - 1, -1):
            layer = self.chain[i]
            if layer.relu:  # zero where the unit was off (one fused kernel; a bool mask is far slower)
                torch.ops.aten.threshold_backward.grad_input(delta, acts[i + 1], 0.0, grad_input=delta)
            below = None
            if i > self.lowest:  # the gradient for the layer below, before this layer's weight changes
                below, w_t = bound.below[i]
                if before is not None:
                    onednn.select(bound.routes[("below", i)], before)
                torch.matmul(w_t, delta, out=below)
            if before is not None and ("update", i) in bound.routes:
                onednn.select(bound.routes[("update", i)], before)
            for key, inputs in ((layer.weight, bound.inputs[i]), (layer.bias, None)):
                if key is not None and key in self.trainable:
                    g = self._update(key, live, center, state, delta, inputs)
                    if g is not None:
                        grads[key] = g
            delta = below  # type: ignore[assignment]
        if self.opt.name == "adam":  # Adam needs the whole gradient: one generic in-place step
            step_(self.opt, {key: live[key] for key in grads}, grads, state)
        return losses

    def begin_group(self, stacked: dict, starts: dict, rank: int) -> None:
        """A new group (nothing to prepare: its views are bound on its first step)."""

    def end_group(self, stacked: dict) -> None:
        """Drop the bound views (a group's buffers and stacks), so the pool can hand that memory
        to the next group."""
        self._bindings.clear()

    def _bound(
        self,
        live: dict[str, torch.Tensor],
        frozen: dict[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        k: int,
        width: int,
    ) -> _Bound:
        """The step's views (activations, transposed weights, unsqueezed biases, buffers), made
        once per shape and inputs: a group repeats a handful of step shapes, and building ~20
        views per step costs more Python time than the small operations they feed. Keyed by the
        memory the views point into; an entry holds that memory (it is kept only when every view
        is one, not a copy), so an address cannot be reused while its entry exists."""
        params = {**frozen, **live}
        tensors = [params[n] for layer in self.chain for n in (layer.weight, layer.bias) if n]
        key = (k, width, x.data_ptr(), x.stride(), y.data_ptr(), *(t.data_ptr() for t in tensors))
        hit = self._bindings.get(key)
        if hit is not None:
            return hit
        if len(self._bindings) >= _MAX_BINDINGS:  # inputs that move every step: do not pile up
            self._bindings.clear()
        ws = self.workspace
        flat = x.reshape(k, width, -1)
        # A strided input is copied by reshape: that copy must not answer for the next step.
        keep = flat.data_ptr() == x.data_ptr()
        acts = [flat.mT]
        forward: list[tuple[torch.Tensor, torch.Tensor | None, bool]] = []
        for i, layer in enumerate(self.chain):
            w = params[layer.weight]
            b = params.get(layer.bias or "")
            acts.append(ws.take(f"act{i}", (k, w.shape[-2], width)))
            if w.dim() == 3 and b is not None and b.dim() == 2:
                forward.append((w, b.unsqueeze(-1), True))
            else:  # a shared (frozen) weight, or a shared bias: product, then add
                forward.append((w, None if b is None else b.unsqueeze(-1), False))
        below = {
            i: (
                ws.take(f"below{i}", (k, params[self.chain[i].weight].shape[-1], width)),
                params[self.chain[i].weight].mT,
            )
            for i in range(self.lowest + 1, len(self.chain))
        }
        inputs = {i: acts[i].mT for i in range(self.lowest, len(self.chain))}
        label = y.unsqueeze(-2) if self.task.is_classification else y
        bound = _Bound(acts, forward, below, inputs, label, self._minus_one(k, width, x.dtype))
        tagged = self._products(bound, params)
        verdicts = onednn.routes([product for _, product in tagged])
        if any(verdicts):
            bound.routes = dict(zip([tag for tag, _ in tagged], verdicts, strict=True))
        if keep:
            self._bindings[key] = bound
        return bound

    def _products(
        self, bound: _Bound, params: dict[str, torch.Tensor]
    ) -> list[tuple[tuple[str, int], tuple]]:
        """The step's matrix products, each tagged with its role and layer: ``("forward", i)``,
        ``("below", i)`` (the gradient for the layer under i) or ``("update", i)`` (layer i's
        weight), and given as ``onednn.routes`` takes them (form, a, b, out)."""
        acts = bound.acts
        out: list[tuple[tuple[str, int], tuple]] = []
        for i, (w, _, bias_first) in enumerate(bound.forward):
            out.append((("forward", i), ("baddbmm" if bias_first else "matmul", w, acts[i], acts[i + 1])))
        for i, (buf, w_t) in bound.below.items():  # the layer's delta is shaped as its output
            out.append((("below", i), ("matmul", w_t, acts[i + 1], buf)))
        form = "matmul" if self.opt.name == "adam" else "baddbmm"
        for i in range(self.lowest, len(self.chain)):
            key = self.chain[i].weight
            if key in self.trainable:
                out.append((("update", i), (form, acts[i + 1], bound.inputs[i], params[key])))
        return out

    def _loss_and_delta(
        self, out: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, minus_one: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-client mean losses [k] and d(sum of them)/d(out), both feature-major ([k, outputs,
        B]); the gradient is written over ``out`` unless a ReLU follows the last layer (its
        backward needs the outputs). ``y``: class labels as [k, 1, B], or regression targets."""
        k, width = scale.shape
        if self.task.is_classification:
            # Cross-entropy by hand: softmax - onehot(y) is the gradient. A handful of simple
            # kernels; the fused log-softmax and logsumexp are several times slower on 10 classes.
            picked = out.gather(-2, y)
            top = out.amax(-2, keepdim=True)
            delta = torch.sub(out, top) if self.chain[-1].relu else out.sub_(top)
            total = delta.exp_().sum(-2, keepdim=True)
            delta.div_(total)
            per_sample = total.log_().add_(top).sub_(picked).squeeze(-2)  # logsumexp - out[y]
            delta.scatter_add_(-2, y, minus_one)
            delta.mul_(scale.unsqueeze(-2))
        else:
            diff = out.mT.reshape(y.shape) - y
            per_elem = diff * diff
            inner = per_elem[0, 0].numel()
            per_sample = per_elem.reshape(k, width, -1).mean(-1)
            grad = diff.mul_((2.0 / inner) * scale.reshape(k, width, *([1] * (diff.dim() - 2))))
            delta = grad.reshape(k, width, -1).mT
        return (per_sample * scale).sum(1), delta

    def _minus_one(self, k: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """A [k, 1, B] tensor of -1 (the one-hot term of the cross-entropy gradient), kept."""
        ones = self._ones
        if ones is None or ones.dtype != dtype or ones.shape[0] < k or ones.shape[2] < width:
            ones = self._ones = torch.full((k, 1, width), -1.0, dtype=dtype)
        return ones[:k, :, :width]

    def _update(
        self,
        key: str,
        live: dict[str, torch.Tensor],
        center: dict[str, torch.Tensor],
        state: dict,
        delta: torch.Tensor,
        inputs: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """SGD (with momentum, weight decay and the proximal term) applied in place, the weight
        gradient formed inside the update's own product (returns None); for Adam, returns the
        gradient (prox included) for one generic step after the backward pass."""
        p = live[key]
        opt = self.opt
        c = center.get(key)
        mu = self.mu if c is not None else 0.0
        if opt.name == "adam":
            if inputs is not None:
                g = torch.bmm(delta, inputs, out=self.workspace.take(f"grad:{key}", p.shape))
            else:
                g = delta.sum(-1)
            return g.add_(p - c, alpha=mu) if mu else g
        sgd_update_(opt, p, c, mu, state["buf"][key] if opt.momentum > 0 else None, delta, inputs)
        return None


def sgd_update_(
    opt: OptimizerSpec,
    p: torch.Tensor,
    c: torch.Tensor | None,
    mu: float,
    buf: torch.Tensor | None,
    delta: torch.Tensor,
    inputs: torch.Tensor | None,
) -> None:
    """One SGD step of the stacked parameter ``p`` [k, ...] in place, its gradient given as the
    layer's feature-major output gradient ``delta`` [k, out, B] and, for a weight, its ``inputs``
    [k, B, in] (the gradient ``delta @ inputs`` is formed inside the update's own product; a
    bias's is ``delta.sum(-1)``): weight decay, the proximal term toward ``c`` (weight ``mu``)
    and momentum (``buf``, None without) as ``optim.step_`` applies them."""
    decay = opt.weight_decay + mu  # d/dp of (wd/2)||p||^2 + (mu/2)||p - c||^2, minus the mu*c part
    if buf is None:
        if inputs is not None:
            p.baddbmm_(delta, inputs, beta=1.0 - opt.lr * decay, alpha=-opt.lr)
        else:
            if decay:
                p.mul_(1.0 - opt.lr * decay)
            p.add_(delta.sum(-1), alpha=-opt.lr)
        if mu:
            p.add_(c, alpha=opt.lr * mu)  # type: ignore[arg-type]
        return
    if inputs is not None:
        buf.baddbmm_(delta, inputs, beta=opt.momentum)
    else:
        buf.mul_(opt.momentum).add_(delta.sum(-1))
    if decay:
        buf.add_(p, alpha=decay)
    if mu:
        buf.add_(c, alpha=-mu)  # type: ignore[arg-type]
    p.add_(buf, alpha=-opt.lr)


class MixtureChainStep:
    """One local step of APFL's objective f(w) + f(alpha v + (1 - alpha) sg(w)) on a Linear/ReLU
    chain, for every live client, by hand (plain SGD).

    The mixed model's layer i computes ``z = Q + alpha (P - Q) + lerp(b, c, alpha)`` with ``P = V a``
    and ``Q = W a`` (two batched products instead of a stacked copy of the mixed weights: the mixture
    never exists as a tensor). Back-propagating f(v_bar) then gives each personal weight its
    gradient ``alpha * delta a^T`` (folded into one ``baddbmm_``), and alpha its gradient
    ``sum(delta * (P - Q)) + sum(delta) . (c - b)`` from what the forward pass kept. Afterwards the
    plain chain step trains w on f(w) (the stop-gradient: the mixture gives w no gradient). The
    numbers equal autograd's on the same objective to float rounding (``tests/test_batched.py``)."""

    def __init__(
        self,
        chain: list[Layer],
        task: TaskSpec,
        opt: OptimizerSpec,
        personal: str,
        alpha: str,
        learn_alpha: bool,
    ) -> None:
        self.chain = chain
        self.task = task
        self.lr = opt.lr
        self.personal = personal
        self.alpha = alpha
        self.learn_alpha = learn_alpha
        keys = {n for layer in chain for n in (layer.weight, layer.bias) if n}
        self.plain = FusedChainStep(chain, task, opt, keys, 0.0)
        self.workspace = Workspace()

    @torch.no_grad()
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
        k, width = scale.shape
        params = {**frozen, **live}
        # The large products go to oneDNN where a probe finds them exact (``onednn.routes``), as in
        # the plain step; the setting is restored before the plain step, which routes its own.
        before = onednn.begin()
        try:
            self._mixture(params, x, y, scale, k, width, before)
        finally:
            onednn.end(before)
        return self.plain(live, frozen, {}, x, y, scale, state)

    def _mixture(
        self,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        scale: torch.Tensor,
        k: int,
        width: int,
        before: str,
    ) -> None:
        """The step of v and alpha on f(alpha v + (1 - alpha) w), in place."""
        pre = self.personal
        alpha = params[self.alpha]
        a3 = alpha.reshape(-1, 1, 1)  # [k or 1, 1, 1]
        ws = self.workspace
        act = x.reshape(k, width, -1).mT  # feature-major input [k, in, B]
        acts, kept = [act], []

        def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            onednn.select(onednn.routes([("matmul", a, b, out)])[0], before)
            return torch.matmul(a, b, out=out)

        for i, layer in enumerate(self.chain):
            w, v = params[layer.weight], params[pre + layer.weight]
            q = matmul(w, act, ws.take(f"q{i}", (k, w.shape[-2], width)))
            p = matmul(v, act, ws.take(f"p{i}", (k, w.shape[-2], width)))
            z = torch.lerp(q, p, a3)
            if layer.bias is not None:
                b, c = params[layer.bias], params[pre + layer.bias]
                z += torch.lerp(b, c, a3.reshape(-1, 1)).unsqueeze(-1)
            if layer.relu:
                z.clamp_min_(0.0)
            kept.append((p, q))
            acts.append(z)
            act = z
        label = y.unsqueeze(-2) if self.task.is_classification else y
        plain = self.plain
        _, delta = plain._loss_and_delta(acts[-1], label, scale, plain._minus_one(k, width, x.dtype))
        dalpha = torch.zeros(k, dtype=x.dtype)
        for i in range(len(self.chain) - 1, -1, -1):
            layer = self.chain[i]
            if layer.relu:
                delta = torch.ops.aten.threshold_backward(delta, acts[i + 1], 0.0)
            p, q = kept[i]
            w, v = params[layer.weight], params[pre + layer.weight]
            dalpha += (delta * (p - q)).sum((1, 2))
            summed = delta.sum(-1)  # [k, out]
            if layer.bias is not None:
                dalpha += (summed * (params[pre + layer.bias] - params[layer.bias])).sum(1)
            below = None
            if i > 0:  # the layer below's gradient, through the mixed weights, before v changes
                onednn.select(False, before)
                below = torch.lerp(torch.matmul(w.mT, delta), torch.matmul(v.mT, delta), a3)
            scaled = delta * a3  # d f(v_bar) / d v = alpha * d f / d v_bar
            onednn.select(onednn.routes([("baddbmm", scaled, acts[i].mT, v)])[0], before)
            v.baddbmm_(scaled, acts[i].mT, alpha=-self.lr)
            onednn.select(False, before)
            if layer.bias is not None:
                params[pre + layer.bias].add_(scaled.sum(-1), alpha=-self.lr)
            delta = below  # type: ignore[assignment]
        if self.learn_alpha:
            alpha.sub_(dalpha.view_as(alpha), alpha=self.lr).clamp_(0.0, 1.0)

    def begin_group(self, stacked: dict, starts: dict, rank: int) -> None:
        """A new group (see ``FusedChainStep.begin_group``)."""

    def end_group(self, stacked: dict) -> None:
        self.plain.end_group(stacked)


class Workspace:
    """Scratch tensors reused from step to step (and, through the pool, from round to round).

    A step's intermediates are a few hundred kilobytes each: freshly allocated, every one would be
    a new memory mapping whose pages fault in again (measured: 20-40x the cost of the operation
    that fills it). Each role keeps one flat buffer, grown when needed, viewed at each step's shape."""

    def __init__(self) -> None:
        self._flat: dict[str, torch.Tensor] = {}

    def take(self, role: str, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        n = math.prod(shape)
        flat = self._flat.get(role)
        if flat is None or flat.numel() < n:
            flat = self._flat[role] = POOL.empty((n,))
        return flat[:n].view(shape)
