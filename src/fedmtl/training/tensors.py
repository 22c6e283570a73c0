"""Parameters travel as ``dict[str, np.ndarray]`` (the wire and checkpoint format) and are trained
as ``dict[str, torch.Tensor]``; these helpers convert without copying where possible."""

from __future__ import annotations

import numpy as np
import torch

Params = dict[str, torch.Tensor]
Arrays = dict[str, np.ndarray]


def to_torch(arrays: Arrays) -> Params:
    return {k: torch.as_tensor(v) for k, v in arrays.items()}


def to_numpy(params: Params) -> Arrays:
    return {k: v.detach().cpu().numpy().copy() for k, v in params.items()}


def model_arrays(model: torch.nn.Module) -> Arrays:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.named_parameters()}


def select(arrays: dict, prefixes: tuple[str, ...] | None) -> dict:
    """Keys under any of ``prefixes`` (all keys when ``prefixes`` is None)."""
    if prefixes is None:
        return dict(arrays)
    return {k: v for k, v in arrays.items() if k.startswith(prefixes)}
