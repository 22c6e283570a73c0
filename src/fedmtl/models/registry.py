"""Model lookup by name; the config validates model keys through ``model_params``.

A builder takes the model's validated config keys and a ``ModelInput`` (sample shape, number of
outputs, vocabulary size for token inputs) and returns an ``nn.Module`` with a submodule named
``head``: the personal part personalised algorithms keep per client or per task; every other
parameter is the shared body. ``register_model`` adds one from user code."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from fedmtl.errors import ConfigError
from fedmtl.models.nets import (
    CNN,
    MLP,
    RNN,
    CNNParams,
    Linear,
    LinearParams,
    MLPParams,
    RNNParams,
    flat_size,
)
from fedmtl.registration import described, same_definition, strict


@dataclass(frozen=True)
class ModelInput:
    """What a builder knows about the data it will see."""

    #: one sample's shape: (features,), (C, H, W) for images, (sequence length,) for token ids
    shape: tuple[int, ...]
    #: classes (classification) or 1 (regression) of the task this model serves
    num_outputs: int
    #: token inputs only: ids run 0..vocab-1, 0 is padding (LEAF text); None for numeric samples
    vocab: int | None = None


Builder = Callable[[Any, ModelInput], nn.Module]


class NoParams(BaseModel):
    """A registered model without config keys."""

    model_config = ConfigDict(extra="forbid")


def _image_shape(name: str, inp: ModelInput) -> tuple[int, int, int]:
    if len(inp.shape) != 3 or inp.vocab is not None:
        raise ConfigError(
            f"config: model.name = {name!r}: needs image inputs (C, H, W), this dataset has "
            f"{inp.shape}; for flattened images set data.input_shape (e.g. [1, 28, 28])"
        )
    return inp.shape  # type: ignore[return-value]


def _tokens(name: str, inp: ModelInput) -> int:
    if inp.vocab is None or len(inp.shape) != 1:
        raise ConfigError(
            f"config: model.name = {name!r}: needs token inputs (text such as LEAF Shakespeare), "
            f"this dataset has numeric samples of shape {inp.shape}"
        )
    return inp.vocab


_MODELS: dict[str, tuple[type[BaseModel], Builder]] = {
    "mlp": (MLPParams, lambda p, i: MLP(flat_size(i.shape), i.num_outputs, p)),
    "cnn": (CNNParams, lambda p, i: CNN(_image_shape("cnn", i), i.num_outputs, p)),
    "linear": (LinearParams, lambda p, i: Linear(flat_size(i.shape), i.num_outputs)),
    "rnn": (RNNParams, lambda p, i: RNN(_tokens("rnn", i), i.num_outputs, p)),
}


def register_model(
    name: str, build: Builder | None = None, *, params: type[BaseModel] | None = None, replace: bool = False
) -> Any:
    """Make ``model.name: <name>`` build ``build(params, ModelInput)``; usable as a decorator.

    ``params`` is a pydantic model of the config keys the model takes (``model: {name: ..., key:
    value}``), validated like the built-in models' keys (a key it does not declare is an error);
    without it the model takes none. Registering the same function again (a notebook cell run
    twice) replaces the earlier registration; another function under a taken name needs
    ``replace=True``."""

    def add(fn: Builder) -> Builder:
        if name in _MODELS and not replace and not same_definition(_MODELS[name][1], fn):
            raise ValueError(
                f"model {name!r} is already registered; pass replace=True to replace it (registered: "
                f"{described(_MODELS[name][1])})"
            )
        _MODELS[name] = (strict(params) if params is not None else NoParams, fn)
        return fn

    return add if build is None else add(build)


def model_names() -> list[str]:
    return sorted(_MODELS)


def model_params(name: str) -> type[BaseModel]:
    if name not in _MODELS:
        raise ConfigError(
            f"config: model.name = {name!r}: unknown model; allowed: {', '.join(model_names())}"
        )
    return _MODELS[name][0]


def build_model(
    cfg: BaseModel,
    input_shape: tuple[int, ...],
    num_outputs: int,
    seed: int,
    vocab: int | None = None,
) -> nn.Module:
    """Build with a seeded initialisation so every client and every run starts from the same weights."""
    raw = cfg.model_dump()
    name = raw.pop("name")
    params_cls, builder = _MODELS[name]
    inp = ModelInput(tuple(input_shape), num_outputs, vocab)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builder(params_cls.model_validate(raw), inp)
    if not isinstance(model, nn.Module) or not isinstance(getattr(model, "head", None), nn.Module):
        raise ConfigError(
            f"config: model.name = {name!r}: its builder must return an nn.Module with a submodule "
            "named 'head' (the personal part; every other parameter is the shared body)"
        )
    model.eval()
    return model
