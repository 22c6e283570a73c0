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

The two terms above are the ``notebook`` formulation: the authors' notebooks, and the paper
abstract's reading (KL for aligning modalities, the contrastive term against representation drift
from earlier global models). The ``described`` formulation follows this project's seed description
instead (a client-to-global KL and a contrastive term across modalities); these two replace them
there:

- ``consensus_kl``: symmetric KL between the *client's* feature distribution and the *global*
  model's on the same batch, each a diagonal Gaussian from the batch mean and (biased) variance of
  Z per dimension (plus a small variance floor): ``mean_d (KL(p_d || q_d) + KL(q_d || p_d)) / 2``
  ``= mean_d [(v_p + (m_p - m_q)^2) / (4 v_q) + (v_q + (m_p - m_q)^2) / (4 v_p) - 1/2]``. Identical
  distributions give 0; the log terms of the two directions cancel.
- ``cross_modal_infonce``: InfoNCE across the modalities of one sample: for each ordered pair of
  modalities (m, n), the anchor is modality m's embedding of sample i, the positive modality n's
  embedding of the same sample, the negatives modality n's embeddings of the batch's other samples
  (cosine similarity / tau). Only samples holding both m and n are anchors, only samples holding n
  are candidates; a missing modality never enters, and with one modality the term is 0.

Beside ``mi_loss`` (I(Z; Y), the abstract's and the notebooks' term), the seed describes mutual
information *between modalities*:

- ``cross_modal_mi_loss``: for each pair of modalities (m, n), ``-log max(|corr(g(h_m), g(h_n))|, eps)``
  over the rows holding both, g one frozen random MLP applied to every modality's embedding: the
  same Gaussian-style correlation surrogate as ``mi_loss`` (for jointly Gaussian scalars
  I = -1/2 log(1 - corr^2), which grows with |corr|), averaged over the pairs with at least two such
  rows; 0 with one modality.
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


def gaussian_symmetric_kl(
    mean_p: torch.Tensor, var_p: torch.Tensor, mean_q: torch.Tensor, var_q: torch.Tensor
) -> torch.Tensor:
    """``(KL(p || q) + KL(q || p)) / 2`` of diagonal Gaussians, averaged over dimensions.

    Written without the logs (they cancel between the two directions), so it is exact and cheap."""
    d2 = (mean_p - mean_q) ** 2
    per_dim = (var_p + d2) / (4.0 * var_q) + (var_q + d2) / (4.0 * var_p) - 0.5
    return per_dim.mean()


def consensus_kl(z: torch.Tensor, z_global: torch.Tensor, var_floor: float = 1e-4) -> torch.Tensor:
    """Symmetric KL between the client's Z distribution and the global model's on the same rows.

    ``z``: (B, D) features of the model being trained; ``z_global``: (B, D) features of the frozen
    global model (detached here: the consensus is a target, not something the client moves). Each
    is summarised as a diagonal Gaussian from its batch mean and biased variance; ``var_floor`` keeps
    a collapsed dimension (or a batch of one) finite."""
    z_global = z_global.detach()
    return gaussian_symmetric_kl(
        z.mean(0),
        z.var(0, unbiased=False) + var_floor,
        z_global.mean(0),
        z_global.var(0, unbiased=False) + var_floor,
    )


def cross_modal_infonce(h: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """InfoNCE between two modalities of the same sample, against the other samples of the batch.

    ``h``: (B, M, E) modality embeddings; ``mask``: (B, M) bool, modality present. For every
    ordered pair (m, n), anchors are rows holding m and n, candidates the rows holding n; the loss
    is the cross-entropy of picking the anchor's own row among the candidates by ``cos / tau``,
    averaged over anchors, then over pairs that have an anchor. 0 when no pair has one."""
    hn = nn.functional.normalize(h, dim=-1)
    terms = []
    m = h.shape[1]
    for a in range(m):
        for b in range(m):
            if a == b:
                continue
            anchors = mask[:, a] & mask[:, b]
            if not bool(anchors.any()):
                continue
            cand = torch.nonzero(mask[:, b]).reshape(-1)
            logits = hn[anchors, a] @ hn[cand, b].T / tau  # (anchors, candidates)
            # the anchor's own row among the candidates
            pos = torch.searchsorted(cand, torch.nonzero(anchors).reshape(-1))
            terms.append(nn.functional.cross_entropy(logits, pos))
    if not terms:
        return h.new_zeros(())
    return torch.stack(terms).mean()


def cross_modal_mi_loss(
    h: torch.Tensor, mask: torch.Tensor, probe: nn.Module, eps: float = 1e-6
) -> torch.Tensor:
    """Mean over modality pairs of ``-log max(|corr(g(h_m), g(h_n))|, eps)`` on rows holding both.

    ``h``: (B, M, E) modality embeddings; ``mask``: (B, M) bool; ``probe``: the frozen g, E -> scalar."""
    m = h.shape[1]
    terms = []
    for a in range(m):
        for b in range(a + 1, m):
            both = mask[:, a] & mask[:, b]
            if int(both.sum()) < 2:  # a correlation needs two rows
                continue
            terms.append(mi_loss(probe(h[both, a]), probe(h[both, b]), eps))
    if not terms:
        return h.new_zeros(())
    return torch.stack(terms).mean()


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
