"""Model lookup by name; the config validates model keys through ``model_params``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import BaseModel
from torch import nn

from fedmtl.errors import ConfigError
from fedmtl.models.nets import CNN, MLP, CNNParams, Linear, LinearParams, MLPParams, flat_size

_Builder = Callable[[BaseModel, tuple[int, ...], int], nn.Module]

_MODELS: dict[str, tuple[type[BaseModel], _Builder]] = {
    "mlp": (MLPParams, lambda p, shape, out: MLP(flat_size(shape), out, p)),  # type: ignore[arg-type]
    "cnn": (CNNParams, lambda p, shape, out: CNN(_image_shape(shape), out, p)),  # type: ignore[arg-type]
    "linear": (LinearParams, lambda p, shape, out: Linear(flat_size(shape), out)),
}


def _image_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ConfigError(
            f"config: model.name = 'cnn': needs image inputs (C, H, W), this dataset has {shape}"
        )
    return shape  # type: ignore[return-value]


def model_names() -> list[str]:
    return sorted(_MODELS)


def model_params(name: str) -> type[BaseModel]:
    if name not in _MODELS:
        raise ConfigError(
            f"config: model.name = {name!r}: unknown model; allowed: {', '.join(model_names())}"
        )
    return _MODELS[name][0]


def build_model(cfg: BaseModel, input_shape: tuple[int, ...], num_outputs: int, seed: int) -> nn.Module:
    """Build with a seeded initialisation so every client and every run starts from the same weights."""
    raw = cfg.model_dump()
    name = raw.pop("name")
    params_cls, builder = _MODELS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builder(params_cls.model_validate(raw), tuple(input_shape), num_outputs)
    model.eval()
    return model
