"""FedBone's split network: client embedding -> server general model -> client adapter -> task head.

Scaled to 28x28 MNIST on a CPU, with the parts the secondary sources describe:

- ``embed`` (client): a strided 3x3 conv, image -> (E, H/2, W/2) activations, the only tensor
  that leaves the client in the forward pass;
- ``general`` (server): the large model, a conv stem, a strided stage of residual blocks at H/4
  and a skip-connected merge back to H/2, so the features it returns are two-scale;
- ``adapter`` (client, the task-adaptation module): 1x1 channel reduction, a deformable 3x3 conv
  (Dai et al. 2017: learned per-position sampling offsets, here through ``grid_sample``) and a
  single-head self-attention whose keys/values are pooled 2x2 to stay cheap;
- ``head`` (client): a pooled linear classifier for vector outputs, or a 2x upsampling decoder for
  per-pixel maps (``MapOutputs``).

Every part is a named submodule, so parameter keys are ``embed.*``, ``general.*``, ``adapter.*``,
``head.*`` and the split is a key prefix. The same module composed end to end is the full model
that Local/FedAvg baselines train and that evaluation runs."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn import functional as F

from fedmtl.errors import ConfigError
from fedmtl.fedbone.tasks import is_map

CLIENT_PARTS = ("embed", "adapter", "head")
SERVER_PART = "general"


class FedBoneNetParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    embed_channels: int = Field(8, ge=1, description="client embedding channels (the activations sent up)")
    width: int = Field(48, ge=2, description="general model channels at the coarse scale")
    depth: int = Field(2, ge=0, description="residual blocks of the general model")
    feature_channels: int = Field(16, ge=1, description="channels of the features sent back down")
    adapter_channels: int = Field(16, ge=1)
    deformable: bool = True
    attention: bool = True


class Embedding(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x))


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class GeneralModel(nn.Module):
    """(E, h, w) -> (F, h, w): stem at h, residual stage at h/2, merged back with a skip."""

    def __init__(self, in_channels: int, width: int, depth: int, out_channels: int) -> None:
        super().__init__()
        half = max(1, width // 2)
        self.stem = nn.Conv2d(in_channels, half, 3, padding=1)
        self.down = nn.Conv2d(half, width, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(*[ResBlock(width) for _ in range(depth)])
        self.merge = nn.Conv2d(width + half, out_channels, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        fine = F.relu(self.stem(z))
        coarse = self.blocks(F.relu(self.down(fine)))
        up = F.interpolate(coarse, size=fine.shape[-2:], mode="nearest")
        return F.relu(self.merge(torch.cat([fine, up], dim=1)))


class DeformConv3x3(nn.Module):
    """Deformable 3x3 convolution (v1): each of the 9 taps samples at its grid offset plus a learned
    per-position offset (bilinear, zero outside). Offsets start at zero, where it equals a 3x3 conv."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.offset = nn.Conv2d(c_in, 18, 3, padding=1)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.mix = nn.Conv2d(9 * c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        off = self.offset(x).view(n, 9, 2, h, w)
        ys = torch.arange(h, dtype=x.dtype).view(1, h, 1)
        xs = torch.arange(w, dtype=x.dtype).view(1, 1, w)
        taps = []
        for i, (dy, dx) in enumerate((a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)):
            py = ys + dy + off[:, i, 0]
            px = xs + dx + off[:, i, 1]
            grid = torch.stack([2 * px / max(w - 1, 1) - 1, 2 * py / max(h - 1, 1) - 1], dim=-1)
            taps.append(F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True))
        return self.mix(torch.cat(taps, dim=1))


class PooledSelfAttention(nn.Module):
    """Single-head self-attention over positions; keys/values average-pooled 2x2 (4x fewer)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.q = nn.Conv2d(c, c, 1)
        self.kv = nn.Conv2d(c, 2 * c, 1)
        self.out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q = self.q(x).flatten(2).transpose(1, 2)  # n, hw, c
        kv = self.kv(F.avg_pool2d(x, 2, ceil_mode=True)).flatten(2)
        k, v = kv[:, :c], kv[:, c:]  # n, c, m
        attn = torch.softmax(q @ k / c**0.5, dim=-1)  # n, hw, m
        y = (attn @ v.transpose(1, 2)).transpose(1, 2).reshape(n, c, h, w)
        return x + self.out(y)


class Adapter(nn.Module):
    def __init__(self, c_in: int, c: int, deformable: bool, attention: bool) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(c_in, c, 1)
        self.spatial = DeformConv3x3(c, c) if deformable else nn.Conv2d(c, c, 3, padding=1)
        self.attend = PooledSelfAttention(c) if attention else nn.Identity()

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.reduce(f))
        a = F.relu(self.spatial(a))
        return self.attend(a)


class ClassifierHead(nn.Module):
    """Average-pool to a 4x4 grid (digits need their layout, not just channel means), then linear."""

    def __init__(self, c: int, out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(16 * c, out)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(a, 4).flatten(1))


class MapHead(nn.Module):
    """2x upsampling decoder to a per-pixel map of ``out`` channels."""

    def __init__(self, c: int, out: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size
        self.conv = nn.Conv2d(c, 8, 3, padding=1)
        self.proj = nn.Conv2d(8, out, 1)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(a, size=self.size, mode="bilinear", align_corners=False)
        return self.proj(F.relu(self.conv(up)))


class FedBoneNet(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_outputs: int, p: FedBoneNetParams) -> None:
        super().__init__()
        if len(input_shape) != 3 or input_shape[1] % 4 or input_shape[2] % 4:
            raise ConfigError(
                f"config: model.name = 'fedbone_net': needs (C, H, W) images with H, W divisible by 4, "
                f"this dataset has {tuple(input_shape)}"
            )
        c, h, w = input_shape
        self.embed = Embedding(c, p.embed_channels)
        self.general = GeneralModel(p.embed_channels, p.width, p.depth, p.feature_channels)
        self.adapter = Adapter(p.feature_channels, p.adapter_channels, p.deformable, p.attention)
        _he_init(self)  # before the head: every task then starts from the same general model
        self.head: nn.Module = (
            MapHead(p.adapter_channels, int(num_outputs), (h, w))
            if is_map(num_outputs)
            else ClassifierHead(p.adapter_channels, int(num_outputs))
        )
        _he_init(self.head)

    def client_front(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)

    def client_back(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(self.adapter(f))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.client_back(self.general(self.client_front(x)))


def _he_init(net: nn.Module) -> None:
    """He (fan-in, ReLU) initialisation: with torch's default (gain 1/sqrt(3)) the ~10 unnormalised
    layers from pixels to head shrink the signal until the classifier barely trains. The deformable
    offsets and the attention's output projection start at zero (a plain 3x3 conv, an identity)."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    for m in net.modules():
        zero = (
            m.offset
            if isinstance(m, DeformConv3x3)
            else m.out
            if isinstance(m, PooledSelfAttention)
            else None
        )
        if zero is not None:
            nn.init.zeros_(zero.weight)
            nn.init.zeros_(zero.bias)


def part_of(key: str) -> str:
    return key.split(".", 1)[0]


def count_params(model: nn.Module, part: str) -> int:
    return int(sum(v.numel() for k, v in model.named_parameters() if part_of(k) == part))


def register_model() -> None:
    """Make ``model.name: fedbone_net`` known to the model registry (idempotent)."""
    from fedmtl.models.registry import _MODELS

    _MODELS.setdefault(
        "fedbone_net",
        (FedBoneNetParams, lambda p, i: FedBoneNet(i.shape, i.num_outputs, p)),
    )
