"""Forward FLOPs of the split network's parts, so a round can report client vs. server compute.

Counted with forward hooks on convolutions and linear layers (2 x multiply-adds), plus the two
attention products and the deformable conv's bilinear sampling, which hooks on standard layers
miss. A training step is counted as 3 x forward (the backward pass costs about twice the forward)."""

from __future__ import annotations

import torch
from torch import nn

from fedmtl.fedbone.model import DeformConv3x3, FedBoneNet, PooledSelfAttention

TRAIN_FACTOR = 3.0


def hook_flops(module: nn.Module, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    total = [0.0]

    def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        if isinstance(mod, nn.Linear):
            total[0] += 2.0 * mod.in_features * mod.out_features * out.shape[0]
        elif isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            total[0] += 2.0 * k * out.numel()
        elif isinstance(mod, PooledSelfAttention):
            n, c, h, w = out.shape
            m = ((h + 1) // 2) * ((w + 1) // 2)
            total[0] += 2.0 * 2.0 * n * h * w * m * c  # q.k and attn.v
        elif isinstance(mod, DeformConv3x3):
            total[0] += 9 * 8.0 * inp[0].numel()  # 9 bilinear taps, ~8 flops per sampled value

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    try:
        with torch.no_grad():
            out = module(x)
    finally:
        for h in handles:
            h.remove()
    return total[0], out


def part_flops(model: FedBoneNet, input_shape: tuple[int, ...]) -> dict[str, float]:
    """Forward FLOPs per sample of ``embed``, ``general``, ``adapter`` and ``head``."""
    x = torch.zeros((1, *input_shape))
    out: dict[str, float] = {}
    for name in ("embed", "general", "adapter", "head"):
        out[name], x = hook_flops(getattr(model, name), x)
    return out
