"""One shared body, one head per task: the model of a client that holds several tasks.

Any registered model works whose output is its ``head``'s output (every built-in one does): the
body is the builder's model for the first task, and its ``head`` is replaced by ``TaskHeads``, which
holds the head the builder makes for each task (the same seed, so a task's head starts the same in
every client's model) and returns a dict of outputs by task. Parameter names stay plain: the body's
as in the single-task model, each head under ``head.<task>.*``. With uncertainty weighting the
heads also hold a learned log-variance per task (``head.log_var.<task>``), which the loss reads
from the outputs (``fedmtl.training.objectives``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedmtl.data.federated import TaskSpec
from fedmtl.errors import ConfigError

LOG_VAR = "log_var"


class TaskHeads(nn.Module):
    """The task heads on the body's features: ``{task: head(features)}`` (plus the log-variances).
    Each head is a submodule named after its task, so its parameters are ``head.<task>.*``."""

    def __init__(self, heads: dict[str, nn.Module], log_var: bool = False) -> None:
        super().__init__()
        if LOG_VAR in heads:
            raise ConfigError(f"config: tasks: {LOG_VAR!r} is reserved; name the task otherwise")
        self.tasks = list(heads)
        for t, head in heads.items():
            self.add_module(t, head)
        self.log_var = nn.ParameterDict({t: nn.Parameter(torch.zeros(1)) for t in heads}) if log_var else None

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {t: getattr(self, t)(features) for t in self.tasks}
        if self.log_var is not None:  # one row per sample, like every other output
            s = torch.cat([self.log_var[t] for t in self.tasks])
            out[LOG_VAR] = s.expand(features.shape[0], len(self.tasks))
        return out


def multi_head_model(
    task: TaskSpec, build: Callable[[TaskSpec], nn.Module], uncertainty: bool = False
) -> nn.Module:
    """The model of a multi-task client: ``build(part)`` makes the single-task model of a part
    (seeded alike), whose body is shared and whose head serves that part, or an MLP head of the
    part's ``head_hidden`` widths in its place; ``uncertainty``: a learned log-variance per part
    (``train.task_weighting: uncertainty``)."""
    models = {p.name: build(p) for p in task.parts}
    first = next(iter(models.values()))
    heads = {}
    for p in task.parts:
        head = models[p.name].head
        widths = list(p.head_hidden)
        if widths:
            if not isinstance(head, nn.Linear):
                raise ConfigError(
                    f"config: tasks.{p.name}.head: a hidden-layer head needs a model whose head is one "
                    f"linear layer, not {type(head).__name__}"
                )
            heads[p.name] = mlp_head(head.in_features, widths, head.out_features)
        else:
            heads[p.name] = head
    first.head = TaskHeads(heads, log_var=uncertainty)
    return first


def mlp_head(features: int, widths: list[int], outputs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Linear(features, w), nn.ReLU()]
        features = w
    layers.append(nn.Linear(features, outputs))
    return nn.Sequential(*layers)
