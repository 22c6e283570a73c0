"""FDRMFL's objective: MSE + mu * (w_mi L_MI + w_kl L_KL + w_cl L_CL).

Each term is a pure function of tensors, so its value can be checked by hand (tests do):

- ``mi_loss``: ``-log max(|corr(s, y)|, eps)`` with ``s = f(Z)`` for a frozen random MLP f: a
  Gaussian-style surrogate of I(Z; Y) (as in the authors' code). corr = 1 gives 0, corr = 0.5
  gives log 2.
- ``kl_alignment``: for each pair of modalities (m, n), the symmetric KL
  ``(KL(N(mu_m, s^2) || N(mu_n, s^2)) + KL(N(mu_n, s^2) || N(mu_m, s^2))) / 2`` per embedding
  dimension, averaged over dimensions and pairs, which equals ``mean_d (mu_m - mu_n)^2 / (2 s^2)``
  (``s`` = ``kl_sigma``, 0.1 in the authors' code: ``50 * mean_d (mu_m - mu_n)^2``). ``mu`` is the
  batch mean of each embedding (``kl_mean = "batch"``, default) or the per-sample embedding
  (``"sample"``, then also averaged over samples). Only samples holding both modalities count;
  a pair no sample holds is skipped.
- ``contrastive_loss``: MOON-style ``CE([cos(z, p) / tau, cos(z, n_1) / tau, ...], label 0)``:
  the positive p is the current global model's Z for the *same* sample, the negatives are older
  global models' Z for it (the authors' code took positives from other samples of the server's test
  set; not reproduced). With no negatives yet (first rounds) the term is 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of two 1-D tensors (0 where either is constant)."""
    a = a - a.mean()
    b = b - b.mean()
    denom = torch.sqrt((a * a).sum() * (b * b).sum())
    return torch.where(denom > 0, (a * b).sum() / denom.clamp_min(1e-12), torch.zeros((), dtype=a.dtype))


def mi_loss(score: torch.Tensor, y: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """-log max(|corr(score, y)|, eps)."""
    return -torch.log(correlation(score.reshape(-1), y.reshape(-1)).abs().clamp_min(eps))


def kl_alignment(
    h: torch.Tensor, mask: torch.Tensor, sigma: float = 0.1, mean: str = "batch"
) -> torch.Tensor:
    """Symmetric KL between fixed-variance Gaussians centred on modality embeddings.

    ``h``: (B, M, E) embeddings; ``mask``: (B, M) bool, modality present."""
    m = h.shape[1]
    terms = []
    for i in range(m):
        for j in range(i + 1, m):
            both = mask[:, i] & mask[:, j]
            if not bool(both.any()):
                continue
            hi, hj = h[both, i], h[both, j]
            diff2 = (hi.mean(0) - hj.mean(0)) ** 2 if mean == "batch" else (hi - hj) ** 2
            terms.append(diff2.mean() / (2.0 * sigma**2))
    if not terms:
        return h.new_zeros(())
    return torch.stack(terms).mean()


def contrastive_loss(
    z: torch.Tensor, positive: torch.Tensor, negatives: list[torch.Tensor], tau: float
) -> torch.Tensor:
    """MOON-style inter-model contrastive loss; 0 without negatives."""
    if not negatives:
        return z.new_zeros(())
    cos = nn.functional.cosine_similarity
    logits = torch.stack([cos(z, positive, dim=-1)] + [cos(z, n, dim=-1) for n in negatives], dim=1) / tau
    return nn.functional.cross_entropy(logits, torch.zeros(len(z), dtype=torch.long))


@dataclass(frozen=True)
class Weights:
    """The multipliers of one training step (after the phase schedule)."""

    mu: float
    mi: float
    kl: float
    cl: float


def phase_weights(mi: float, kl: float, cl: float, schedule: str, step: int, steps: int) -> tuple[float, ...]:
    """``constant``: the configured weights. ``halves`` (the authors' real-data schedule): the first
    half of the local steps uses (mi, kl/2, cl/2), the second half (mi/2, kl, cl)."""
    if schedule == "constant":
        return mi, kl, cl
    if step < steps / 2:
        return mi, 0.5 * kl, 0.5 * cl
    return 0.5 * mi, kl, cl
