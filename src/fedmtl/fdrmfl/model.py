"""FDRMFL's network: one encoder per modality, attention fusion, a low-dimensional feature Z and a
regression head.

``body(x)`` returns Z (the extracted feature, ``feature_dim`` wide) and ``head(Z)`` the prediction,
as every fedmtl net (``body.*`` shared base, ``head.*`` head). ``body.encode(x)`` also returns the
per-modality embeddings the alignment loss needs.

Missing modalities (mask column < 0, see ``fedmtl.fdrmfl.data``) are zeroed *before* their encoder
and their embedding is zeroed after it; attention never looks at them (key padding) and the
modality weighting gives them weight 0. So the output does not depend on a missing modality's
values at all, NaN included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.func import functional_call

from fedmtl.fdrmfl.data import Layout, Modality
from fedmtl.training.tensors import Arrays, Params, to_torch


class NetParams(BaseModel):
    """Sizes of the network (kept small: the benchmark must run on two busy CPU cores)."""

    model_config = ConfigDict(extra="forbid")
    embed_dim: int = Field(32, ge=2, description="width of each modality embedding")
    feature_dim: int = Field(16, ge=1, description="size of the extracted feature Z")
    heads: int = Field(2, ge=1, description="attention heads of the cross-modal attention")
    hidden: int = Field(64, ge=1, description="hidden width of the vector encoders, fusion and head")
    channels: int = Field(16, ge=1, description="conv channels of the sequence and image encoders")

    @model_validator(mode="after")
    def _heads_divide(self) -> NetParams:
        if self.embed_dim % self.heads:
            raise ValueError(f"embed_dim = {self.embed_dim} must be a multiple of heads = {self.heads}")
        return self


class VectorEncoder(nn.Module):
    """MLP with a residual hidden layer, for tabular vectors."""

    def __init__(self, d: int, out: int, hidden: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(self.inp(x))
        h = h + nn.functional.gelu(self.mid(h))
        return self.out(h)


class SequenceEncoder(nn.Module):
    """1-D convolutions over (steps, channels) sequences or single-channel spectra, then a pooled
    summary that keeps coarse position (a global mean would lose where a peak sits)."""

    def __init__(self, shape: tuple[int, ...], out: int, channels: int) -> None:
        super().__init__()
        self.steps = shape[0]
        self.cin = shape[1] if len(shape) > 1 else 1
        self.conv1 = nn.Conv1d(self.cin, channels, 5, padding=2)
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=1)
        self.bins = min(8, self.steps)
        self.pool = nn.AdaptiveAvgPool1d(self.bins)
        self.out = nn.Linear(channels * self.bins, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(len(x), self.steps, self.cin).transpose(1, 2)
        h = nn.functional.gelu(self.conv1(h))
        h = h + nn.functional.gelu(self.conv2(h))
        return self.out(self.pool(h).flatten(1))


class ImageEncoder(nn.Module):
    """Small CNN: two conv blocks, a 4x4 pooled map (coarse position kept), a dense layer."""

    def __init__(self, shape: tuple[int, ...], out: int, channels: int) -> None:
        super().__init__()
        self.shape = tuple(shape)
        c = shape[0]
        self.conv1 = nn.Conv2d(c, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.out = nn.Linear(2 * channels * 16, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(len(x), *self.shape)
        h = nn.functional.max_pool2d(nn.functional.gelu(self.conv1(h)), 2)
        h = nn.functional.gelu(self.conv2(h))
        return self.out(self.pool(h).flatten(1))


def make_encoder(m: Modality, p: NetParams) -> nn.Module:
    """The encoder for a modality's kind: MLP for vectors, 1-D conv for sequences, CNN for images."""
    if m.kind == "vector":
        return VectorEncoder(m.size, p.embed_dim, p.hidden)
    if m.kind == "sequence":
        return SequenceEncoder(m.shape, p.embed_dim, p.channels)
    return ImageEncoder(m.shape, p.embed_dim, p.channels)


@dataclass
class Encoded:
    z: torch.Tensor  # (B, feature_dim)
    h: torch.Tensor  # (B, M, embed_dim): per-modality embeddings (zero where missing)
    mask: torch.Tensor  # (B, M) bool: modality present
    weights: torch.Tensor  # (B, M): learned per-sample modality weights (0 where missing)


class FusionBody(nn.Module):
    """Encoders -> cross-modal attention -> per-sample modality weighting -> MLP -> Z."""

    def __init__(self, layout: Layout, p: NetParams) -> None:
        super().__init__()
        self.layout = layout
        self.encoders = nn.ModuleDict({m.name: make_encoder(m, p) for m in layout.modalities})
        e, k = p.embed_dim, layout.num
        self.modality_bias = nn.Parameter(torch.zeros(k, e))  # tells attention which modality a token is
        self.attn = nn.MultiheadAttention(e, p.heads, batch_first=True)
        self.norm = nn.LayerNorm(e)
        self.score = nn.Linear(e, 1)
        self.fuse = nn.Sequential(nn.Linear(k * e, p.hidden), nn.GELU(), nn.Linear(p.hidden, p.feature_dim))

    def encode(self, x: torch.Tensor) -> Encoded:
        lay = self.layout
        mask = x[:, lay.mask_start : lay.width] >= 0
        if x.shape[1] != lay.width:
            raise ValueError(f"fdrmfl: input has {x.shape[1]} columns, the layout needs {lay.width}")
        hs = []
        for j, m in enumerate(lay.modalities):
            present = mask[:, j : j + 1]
            xm = torch.where(present, x[:, m.start : m.stop], torch.zeros((), dtype=x.dtype))
            hs.append(torch.where(present, self.encoders[m.name](xm), torch.zeros((), dtype=x.dtype)))
        h = torch.stack(hs, 1)  # (B, M, E)
        tokens = h + self.modality_bias
        # Each modality attends to every present modality (itself included, so one present
        # modality still has a key); missing ones are padding. A row with no modality at all
        # (not produced by the data module, but possible from a user) keeps every key so nothing
        # turns NaN, and ends with all weights 0: a constant Z.
        keep = mask | ~mask.any(1, keepdim=True)
        att, _ = self.attn(tokens, tokens, tokens, key_padding_mask=~keep, need_weights=False)
        tokens = self.norm(tokens + att)
        tokens = torch.where(mask.unsqueeze(-1), tokens, torch.zeros((), dtype=x.dtype))
        logits = self.score(tokens).squeeze(-1).masked_fill(~keep, float("-inf"))
        weights = torch.softmax(logits, dim=1) * mask
        fused = (weights.unsqueeze(-1) * tokens * lay.num).flatten(1)
        return Encoded(self.fuse(fused), h, mask, weights)

    def forward(self, x: torch.Tensor, full: bool = False) -> torch.Tensor | Encoded:
        """Z, or with ``full`` everything ``encode`` returns (``functional_call`` reaches only
        ``forward``)."""
        enc = self.encode(x)
        return enc if full else enc.z


class FDRMFLNet(nn.Module):
    def __init__(self, layout: Layout, p: NetParams) -> None:
        super().__init__()
        self.body = FusionBody(layout, p)
        self.head = nn.Sequential(nn.Linear(p.feature_dim, p.hidden), nn.GELU(), nn.Linear(p.hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class MIProbe(nn.Module):
    """The frozen, randomly initialised MLP f of the MI surrogate corr(f(Z), y) (spec section 3).

    Its weights are non-persistent buffers drawn from a fixed seed: identical on every client and
    server, never trained and never sent."""

    def __init__(self, feature_dim: int, hidden: int = 32, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w1", torch.randn(feature_dim, hidden, generator=g) / feature_dim**0.5, False)
        self.register_buffer("w2", torch.randn(hidden, 1, generator=g) / hidden**0.5, False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(z @ self.w1) @ self.w2).squeeze(-1)


def build_net(layout: Layout, p: NetParams, seed: int) -> FDRMFLNet:
    """Seeded initialisation: every client and every run starts from the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FDRMFLNet(layout, p)
    net.eval()
    return net


def _sub(params: Params, prefix: str) -> Params:
    return {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}


def encode(net: FDRMFLNet, params: Params, x: torch.Tensor) -> Any:
    """``body.encode`` under ``params`` (functional: no module state is touched)."""
    return functional_call(net.body, _sub(params, "body."), (x,), {"full": True})


def head(net: FDRMFLNet, params: Params, z: torch.Tensor) -> torch.Tensor:
    return functional_call(net.head, _sub(params, "head."), (z,))


@torch.no_grad()
def extract_features(net: FDRMFLNet, arrays: Arrays, x: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Z for every row of ``x`` under ``arrays``: the features a downstream regressor uses."""
    params = to_torch(arrays)
    xt = torch.as_tensor(x)
    out = [encode(net, params, xt[i : i + chunk]).z for i in range(0, len(xt), chunk)]
    return torch.cat(out).numpy() if out else np.zeros((0, net.head[0].in_features), np.float32)
