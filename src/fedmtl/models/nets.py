"""Network definitions. Every net ends in a module named ``head`` so the personal part is declared
by name (``head.*``) rather than by position; everything else is the shared base (``body.*``)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from fedmtl.errors import ConfigError


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MLPParams(_Params):
    hidden: list[int] = Field(default_factory=lambda: [200])


#: The literature's CNNs, by ``model.preset`` (docs/models.md has their sources and sizes): what
#: each fixes of ``channels``, ``kernel`` and ``fc``. ``fedavg_cifar`` also pools 3x3 with stride 2
#: and normalises (LRN) as the TensorFlow tutorial model it names does.
CNN_PRESETS: dict[str, dict[str, Any]] = {
    # LEAF's FEMNIST CNN (Caldas et al. 2018): 6,603,710 parameters at 62 classes
    "femnist": {"channels": [32, 64], "kernel": 5, "fc": [2048]},
    # FedAvg's MNIST CNN (McMahan et al. 2017, section 3): 1,663,370 parameters at 10 classes
    "fedavg_mnist": {"channels": [32, 64], "kernel": 5, "fc": [512]},
    # FedAvg's CIFAR-10 CNN (the TensorFlow tutorial model): 1,068,298 parameters on 24x24 crops
    "fedavg_cifar": {"channels": [64, 64], "kernel": 5, "fc": [384, 192]},
}


class CNNParams(_Params):
    """Conv-ReLU-pool blocks, then dense ReLU layers; ``preset`` names a published architecture
    and fills in the keys it fixes (giving one of them a different value is an error)."""

    preset: Literal["femnist", "fedavg_mnist", "fedavg_cifar"] | None = None
    channels: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [32, 64], min_length=1)
    #: square kernels, zero-padded to keep the image size ("same"); odd
    kernel: int = Field(3, ge=1)
    #: hidden dense widths between the convolutions and the head (one int: one layer)
    fc: int | list[int] = 128

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, raw: Any) -> Any:
        if not isinstance(raw, dict) or raw.get("preset") is None:
            return raw
        fixed = CNN_PRESETS.get(raw["preset"])
        if fixed is None:  # the Literal reports it
            return raw
        for key, value in fixed.items():
            given = raw.get(key)
            if given is not None and _as_list(given) != _as_list(value):
                raise ValueError(
                    f"preset {raw['preset']!r} fixes {key} = {value}; leave {key} out or drop the preset"
                )
        return {**raw, **fixed}

    @field_validator("kernel")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("must be odd (the convolutions keep the image size)")
        return v

    @field_validator("fc")
    @classmethod
    def _widths(cls, v: int | list[int]) -> int | list[int]:
        if min(_as_list(v), default=1) < 1:
            raise ValueError("widths must be at least 1 (an empty list: no hidden dense layer)")
        return v

    @property
    def dense(self) -> list[int]:
        return _as_list(self.fc)


def _as_list(v: Any) -> list[Any]:
    return list(v) if isinstance(v, list | tuple) else [v]


class LinearParams(_Params):
    pass


class RNNParams(_Params):
    """LEAF's Shakespeare model by default: 8-dim character embedding, 2 x 256 LSTM."""

    cell: Literal["lstm", "gru"] = "lstm"
    embed: int = Field(8, ge=1)
    hidden: int = Field(256, ge=1)
    layers: int = Field(2, ge=1)


class MLP(nn.Module):
    def __init__(self, in_features: int, out_features: int, p: MLPParams) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in p.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class CNN(nn.Module):
    """Conv-ReLU-MaxPool blocks then hidden dense ReLU layers; for (C, H, W) inputs.

    ``fedavg_cifar`` is the TensorFlow CIFAR-10 tutorial model as FedAvg used it: 3x3 max pooling
    with stride 2 and local response normalisation (TensorFlow's ``lrn(depth_radius=4, bias=1,
    alpha=0.001 / 9, beta=0.75)``) after the first block's pooling and before the second's. Its
    pooling pads one pixel on every side where TensorFlow's "SAME" pads only the bottom and
    right; the output sizes are the same."""

    def __init__(self, input_shape: tuple[int, ...], out_features: int, p: CNNParams) -> None:
        super().__init__()
        c, h, w = input_shape
        cifar = p.preset == "fedavg_cifar"
        layers: list[nn.Module] = []
        for i, ch in enumerate(p.channels):
            layers += [nn.Conv2d(c, ch, p.kernel, padding=p.kernel // 2), nn.ReLU()]
            if cifar:
                lrn = nn.LocalResponseNorm(9, alpha=0.001, beta=0.75, k=1.0)
                pool = nn.MaxPool2d(3, stride=2, padding=1)
                layers += [pool, lrn] if i == 0 else [lrn, pool]
                h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
            else:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = ch
        if h < 1 or w < 1:
            raise ConfigError(
                f"config: model.channels = {p.channels}: {len(p.channels)} pooling blocks shrink "
                f"{tuple(input_shape)} images to nothing; use fewer blocks"
            )
        layers.append(nn.Flatten())
        width = c * h * w
        for units in p.dense:
            layers += [nn.Linear(width, units), nn.ReLU()]
            width = units
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Linear(nn.Module):
    """Logistic / linear regression: the whole model is the head."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.body = nn.Flatten()
        self.head = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class RecurrentBody(nn.Module):
    """Token ids -> embedding -> stacked LSTM/GRU -> the state after each sequence's last token
    (sequences are right-padded with id 0)."""

    def __init__(self, vocab: int, p: RNNParams) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, p.embed, padding_idx=0)
        cell = nn.LSTM if p.cell == "lstm" else nn.GRU
        self.rnn = cell(p.embed, p.hidden, num_layers=p.layers, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.long()
        out, _ = self.rnn(self.embed(ids))
        last = ((ids > 0).sum(dim=1) - 1).clamp(min=0)
        return out[torch.arange(len(ids)), last]


class RNN(nn.Module):
    """Next-token (or sequence) classification over token ids; the head reads the last state."""

    def __init__(self, vocab: int, out_features: int, p: RNNParams) -> None:
        super().__init__()
        self.body = RecurrentBody(vocab, p)
        self.head = nn.Linear(p.hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def flat_size(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape))
