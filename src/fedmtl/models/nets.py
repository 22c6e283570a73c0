"""Network definitions. Every net ends in a module named ``head`` so the personal part is declared
by name (``head.*``) rather than by position; everything else is the shared base (``body.*``)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MLPParams(_Params):
    hidden: list[int] = Field(default_factory=lambda: [200])


class CNNParams(_Params):
    channels: list[int] = Field(default_factory=lambda: [32, 64])
    fc: int = Field(128, ge=1)


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
    """Conv-ReLU-MaxPool blocks then one hidden dense layer; for (C, H, W) inputs."""

    def __init__(self, input_shape: tuple[int, ...], out_features: int, p: CNNParams) -> None:
        super().__init__()
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for ch in p.channels:
            layers += [nn.Conv2d(c, ch, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w = ch, h // 2, w // 2
        layers += [nn.Flatten(), nn.Linear(c * h * w, p.fc), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(p.fc, out_features)

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
