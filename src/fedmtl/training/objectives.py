"""What local training minimises: the task loss, the proximal term, and custom objectives.

Each term is written here once and used by every executor: the sequential trainer
(``fedmtl.training.local``), the batched one (``fedmtl.training.batched``, whose hand-written
chain step folds the proximal term into its update) and DP-SGD (``fedmtl.training.dp_sgd``).

- The **task loss**: cross-entropy for classification, mean squared error for regression.
- The **proximal term** (mu/2)||w - c||^2 toward a centre ``c``: FedProx's pull toward the global
  model and Ditto's regulariser of the personal model. It is data-independent, so it enters as its
  gradient mu (w - c), added to the data gradient (also after DP-SGD's clipping and noise).
- An **objective** replaces the task loss by another per-sample loss of the parameters (APFL's two
  models and their mixture). The executors back-propagate its mean over each batch's real samples
  and report the mean of its ``loss`` part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from fedmtl.data.federated import TaskSpec

ArrayLike = np.ndarray | torch.Tensor


def task_loss(out: Any, y: torch.Tensor, task: TaskSpec) -> torch.Tensor:
    """The batch mean of the task's loss (several tasks: ``multi_task_loss``)."""
    if task.is_multi:
        return multi_task_loss(out, y, task)
    if task.is_classification:
        return nn.functional.cross_entropy(out, y)
    if task.kind == "multilabel" or task.loss not in ("", "mse"):
        return per_sample_loss(out, y, task).mean()
    return nn.functional.mse_loss(out.reshape(y.shape), y)


def per_sample_loss(out: Any, y: torch.Tensor, task: TaskSpec) -> torch.Tensor:
    """The summands of ``task_loss``: its mean over a batch is ``task_loss`` (for several tasks
    when every sample has every label; ``multi_task_loss`` says what a missing label does).

    Cross-entropy is written as log-softmax + gather, which is what ``cross_entropy`` computes;
    under vmap the fused op goes through a Python decomposition whose first call imports sympy."""
    if task.is_multi:
        parts, log_var = _part_losses(out, y, task)
        total = torch.zeros_like(parts[0][0])
        for i, (p, (loss, labelled)) in enumerate(zip(task.parts, parts, strict=True)):
            total = total + _weighted(p, loss * labelled, log_var, i)
        return total
    if task.is_classification:
        return -torch.log_softmax(out, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    if task.kind == "multilabel":
        bce = nn.functional.binary_cross_entropy_with_logits(out, y.to(out.dtype), reduction="none")
        return bce.reshape(len(y), -1).mean(1)
    diff = out.reshape(y.shape) - y
    if task.loss == "l1":
        err = diff.abs()
    elif task.loss == "huber":
        err = nn.functional.huber_loss(out.reshape(y.shape), y, reduction="none")
    else:
        err = diff * diff
    return err.reshape(len(y), -1).mean(1) if err.dim() > 1 else err


def multi_task_loss(
    out: dict[str, torch.Tensor], y: torch.Tensor, task: TaskSpec, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """The objective of a client with several tasks: the weighted sum over its tasks of each task's
    mean loss over the samples labelled for it (a missing label is masked, never imputed), among
    ``rows`` (1 for a real sample, 0 for padding) when given. With uncertainty weighting (Kendall
    et al. 2018) each task's term is ``exp(-s) L / 2 + s / 2`` with its learned log-variance ``s``."""
    parts, log_var = _part_losses(out, y, task)
    total = torch.zeros((), dtype=parts[0][0].dtype, device=parts[0][0].device)
    for i, (p, (loss, labelled)) in enumerate(zip(task.parts, parts, strict=True)):
        weight = labelled if rows is None else labelled * rows
        mean = (loss * weight).sum() / weight.sum().clamp_min(1.0)
        total = total + _weighted(p, mean, log_var, i)
    return total


def _weighted(part: TaskSpec, loss: torch.Tensor, log_var: torch.Tensor | None, i: int) -> torch.Tensor:
    if log_var is None:
        return part.weight * loss
    s = log_var[..., i]  # one row per sample, all equal: the task's learned log-variance
    if loss.dim() == 0:
        s = s.mean()
    return 0.5 * torch.exp(-s) * loss + 0.5 * s


def _part_losses(
    out: dict[str, torch.Tensor], y: torch.Tensor, task: TaskSpec
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
    """Per part: (each sample's loss, 1 where the sample is labelled for it), and the log-variances."""
    from fedmtl.models.multihead import LOG_VAR

    parts = []
    col = 0
    for p in task.parts:
        width = p.columns
        target = y[..., col : col + width]
        col += width
        if p.kind == "multilabel":
            labelled = ~torch.isnan(target)
            clean = torch.where(labelled, target, torch.zeros_like(target))
            bce = nn.functional.binary_cross_entropy_with_logits(out[p.name], clean, reduction="none")
            counts = labelled.sum(-1)
            loss = (bce * labelled).sum(-1) / counts.clamp_min(1)
            parts.append((loss, (counts > 0).to(loss.dtype)))
            continue
        target = target[..., 0]
        labelled = ~torch.isnan(target)
        clean = torch.where(labelled, target, torch.zeros_like(target))
        if p.is_classification:
            clean = clean.long()
        loss = per_sample_loss(out[p.name], clean, p)
        parts.append((loss, labelled.to(loss.dtype)))
    log_var = out.get(LOG_VAR) if isinstance(out, dict) else None
    return parts, log_var


@dataclass(frozen=True, slots=True)
class Prox:
    """The proximal term (mu/2)||w - center||^2 over the keys ``center`` holds (and that train)."""

    center: Mapping[str, ArrayLike]
    mu: float


def add_prox_grad(
    grads: dict[str, torch.Tensor],
    params: Mapping[str, torch.Tensor],
    center: Mapping[str, torch.Tensor],
    mu: float,
) -> dict[str, torch.Tensor]:
    """``grads`` plus the proximal term's gradient mu (w - c) on every key with a centre (in
    place; a centre shared by stacked clients broadcasts over the client axis)."""
    if mu > 0:
        for k, c in center.items():
            if k in grads:
                grads[k] = grads[k].add_(params[k].detach() - c, alpha=mu)
    return grads


class Objective:
    """The loss minimised on each batch. The default is the task loss of the model under the
    trained parameters; subclasses override ``per_sample`` (and are then trained by the generic
    autograd steps only: the fused chain step computes the task loss alone)."""

    #: True only for the plain task loss (what the fused chain step computes by hand).
    is_task_loss = True

    def per_sample(
        self,
        model: nn.Module,
        params: Mapping[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        task: TaskSpec,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective, reported loss) of every sample, each of shape [B]."""
        out = per_sample_loss(functional_call(model, dict(params), (x,)), y, task)
        return out, out

    def chain_step(
        self,
        chain: list[Any],
        task: TaskSpec,
        opt: Any,
        trainable: set[str],
        mu: float,
        bounds: Sequence[tuple[str, float, float]],
    ) -> Any:
        """A hand-written batched step (``fedmtl.training.fused``) computing this objective on a
        Linear/ReLU ``chain``, or None for the generic vmapped autograd step."""
        if not self.is_task_loss or bounds:
            return None
        from fedmtl.training.fused import FusedChainStep

        return FusedChainStep(chain, task, opt, trainable, mu)

    def conv_step(
        self,
        program: list[Any],
        shapes: Mapping[str, tuple[int, ...]],
        task: TaskSpec,
        opt: Any,
        trainable: set[str],
        mu: float,
        bounds: Sequence[tuple[str, float, float]],
    ) -> Any:
        """The batched step of conv nets (``fedmtl.training.convnet``) computing this objective
        on ``program``, or None for the generic vmapped autograd step."""
        if not self.is_task_loss or bounds:
            return None
        from fedmtl.training.convnet import ConvNetStep

        return ConvNetStep(program, shapes, task, opt, trainable, mu)

    def batch(
        self,
        model: nn.Module,
        params: Mapping[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        task: TaskSpec,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective, reported loss) as batch means (what the sequential trainer minimises)."""
        if self.is_task_loss:
            loss = task_loss(functional_call(model, dict(params), (x,)), y, task)
            return loss, loss
        objective, loss = self.per_sample(model, params, x, y, task)
        return objective.mean(), loss.mean()

    def masked(
        self,
        model: nn.Module,
        params: Mapping[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        task: TaskSpec,
        rows: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch`` over the real rows of a padded batch (``rows``: 1 real, 0 padding), what the
        batched executor minimises for each client."""
        if self.is_task_loss and task.is_multi:
            loss = multi_task_loss(functional_call(model, dict(params), (x,)), y, task, rows)
            return loss, loss
        value, loss = self.per_sample(model, params, x, y, task)
        count = rows.sum()
        mean = (value * rows).sum() / count
        return mean, mean if loss is value else (loss * rows).sum() / count


#: The task loss: what every method but a few minimises.
TASK_LOSS = Objective()
