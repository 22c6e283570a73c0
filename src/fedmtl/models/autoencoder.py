"""A multi-task autoencoder-classifier: one encoder (``body``), a classifier ``head`` on the code
and a ``decoder`` that reconstructs the input from the code (Ardic & Genc 2025, section 2).

Training minimises ``CE + (w_re / w_ce) * MSE``: the paper's ``w_ce * CE + w_re * MSE`` divided by
``w_ce`` (the paper's learning rate ``lr`` corresponds to ``train.lr = lr * w_ce``). fedmtl's local
training (sequential and batched alike) minimises the cross-entropy of the model's output, so the
reconstruction term rides inside that output while gradients are on: the output gets one extra
logit ``c = logsumexp(logits) + log(expm1(R))`` with ``R = (w_re / w_ce) * MSE``, for which
``CE([logits, c], y) = CE(logits, y) + R`` exactly, for every sample. Without gradients (every
prediction and evaluation path) the output is the plain class logits, so metrics, FedAvg and the
personalised algorithms see an ordinary classifier; ``decoder.*`` is shared like the body."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

#: Keeps log(expm1(R)) finite (and its gradient defined) for a perfect reconstruction.
_MIN_RECON = 1e-12


class AutoencoderParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: encoder hidden widths (the decoder mirrors them)
    hidden: list[int] = Field(default_factory=lambda: [256])
    #: size of the code the classifier head and the decoder read
    code: int = Field(32, ge=1)
    #: loss weights of the cross-entropy and of the per-pixel reconstruction MSE
    w_ce: float = Field(0.05, gt=0)
    w_re: float = Field(1.0, ge=0)


class Autoencoder(nn.Module):
    """MLP encoder/decoder; images (C, H, W) in [0, 1] are reconstructed through a sigmoid,
    feature vectors (standardised) through a linear output."""

    def __init__(self, input_shape: tuple[int, ...], out_features: int, p: AutoencoderParams) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.w_ce, self.w_re = float(p.w_ce), float(p.w_re)
        n_in = 1
        for s in self.input_shape:
            n_in *= int(s)
        enc: list[nn.Module] = [nn.Flatten()]
        width = n_in
        for h in p.hidden:
            enc += [nn.Linear(width, h), nn.ReLU()]
            width = h
        enc.append(nn.Linear(width, p.code))
        self.body = nn.Sequential(*enc)
        self.head = nn.Linear(p.code, out_features)
        dec: list[nn.Module] = []
        width = p.code
        for h in reversed(p.hidden):
            dec += [nn.Linear(width, h), nn.ReLU()]
            width = h
        dec.append(nn.Linear(width, n_in))
        if len(self.input_shape) > 1:
            dec.append(nn.Sigmoid())
        self.decoder = nn.Sequential(*dec)

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(code, class logits, per-sample reconstruction MSE averaged over input elements)."""
        code = self.body(x)
        recon = self.decoder(code)
        err = ((recon - x.reshape(len(x), -1)) ** 2).mean(dim=1)
        return code, self.head(code), err

    def forward(self, x: torch.Tensor, parts: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if parts:
            return self.parts(x)
        if not torch.is_grad_enabled() or self.w_re == 0:
            return self.head(self.body(x))
        _, logits, err = self.parts(x)
        r = (self.w_re / self.w_ce) * err
        extra = torch.logsumexp(logits, dim=-1) + torch.log(torch.expm1(r.clamp_min(_MIN_RECON)))
        return torch.cat([logits, extra.unsqueeze(-1)], dim=-1)
