"""Per-sample score vectors, computed by a client on its own training samples.

A score vector is low-dimensional (one entry per configured feature: ``ce``, ``recon``,
``centre``), so it can leave the client in global mode while the samples never do. Scores use
the parameters the client received this round (the current global model) in inference mode."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from fedmtl.training.tensors import Arrays

CHUNK = 2048


@dataclass
class Parts:
    """What scoring needs from one forward pass over a client's samples."""

    code: np.ndarray  # (n, code) encoder output
    ce: np.ndarray  # (n,) cross-entropy of the given labels
    recon: np.ndarray | None  # (n,) reconstruction MSE per input element (autoencoders only)


def has_decoder(model: nn.Module) -> bool:
    return hasattr(model, "decoder") and hasattr(model, "parts")


def _sub(params: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}


@torch.no_grad()
def forward_parts(model: nn.Module, arrays: Arrays, x: np.ndarray, y: np.ndarray) -> Parts:
    """Code, per-sample cross-entropy and (autoencoders) reconstruction error, in chunks."""
    params = {k: torch.as_tensor(v) for k, v in arrays.items()}
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    codes, ces, recons = [], [], []
    for i in range(0, len(xt), CHUNK):
        xb, yb = xt[i : i + CHUNK], yt[i : i + CHUNK]
        if has_decoder(model):
            code, logits, err = functional_call(model, params, (xb,), {"parts": True})
            recons.append(err)
        else:
            code = functional_call(model.body, _sub(params, "body."), (xb,))
            logits = functional_call(model.head, _sub(params, "head."), (code,))
        codes.append(code.reshape(len(xb), -1))
        ces.append(nn.functional.cross_entropy(logits, yb, reduction="none"))
    if not codes:
        return Parts(
            np.zeros((0, 1), np.float32), np.zeros(0), None if not has_decoder(model) else np.zeros(0)
        )
    return Parts(
        torch.cat(codes).numpy(),
        torch.cat(ces).double().numpy(),
        torch.cat(recons).double().numpy() if recons else None,
    )


def centre_distance(code: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Distance of each code to the mean code of its (given) class on this client."""
    out = np.zeros(len(y))
    for cls in np.unique(y):
        m = y == cls
        out[m] = np.linalg.norm(code[m] - code[m].mean(axis=0), axis=1)
    return out


def score_vectors(parts: Parts, y: np.ndarray, features: list[str], w_ce: float) -> np.ndarray:
    """(n, len(features)) score vectors: w_ce * CE, reconstruction MSE, centre distance."""
    cols = []
    for f in features:
        if f == "ce":
            cols.append(w_ce * parts.ce)
        elif f == "recon":
            if parts.recon is None:
                raise ValueError("score feature 'recon' needs a model with a decoder")
            cols.append(parts.recon)
        elif f == "centre":
            cols.append(centre_distance(parts.code, y))
        else:
            raise ValueError(f"unknown score feature {f!r}")
    out = np.stack(cols, axis=1) if cols else np.zeros((len(y), 0))
    return np.nan_to_num(out, nan=0.0, posinf=1e6, neginf=-1e6)


def near_duplicates(code: np.ndarray, eps: float) -> np.ndarray:
    """Mask of samples whose code lies within ``eps`` times the median nearest-neighbour
    distance of an earlier sample: the later copies of (near-)duplicated inputs."""
    n = len(code)
    if n < 2:
        return np.zeros(n, dtype=bool)
    c = torch.as_tensor(code, dtype=torch.float32)
    d = torch.cdist(c, c, compute_mode="donot_use_mm_for_euclid_dist")  # exact zeros for copies
    d.fill_diagonal_(float("inf"))
    nn_dist = d.min(dim=1).values
    positive = nn_dist[nn_dist > 0]
    scale = float(positive.median()) if len(positive) else 1.0
    earlier = torch.tril(d <= eps * scale, diagonal=-1)
    return earlier.any(dim=1).numpy()
