"""Functional local training shared by the algorithms (parameters are plain dicts of tensors)."""

from fedmtl.training.local import LocalSpec, batch_schedule, evaluate_params, local_train, num_local_steps
from fedmtl.training.tensors import Params, to_numpy, to_torch

__all__ = [
    "LocalSpec",
    "Params",
    "batch_schedule",
    "evaluate_params",
    "local_train",
    "num_local_steps",
    "to_numpy",
    "to_torch",
]
