"""Concept shift between client groups (``data.concepts``): the same inputs, conflicting concepts.

Clustered and hierarchical FL only earn their place when client populations want different
models from similar data. This transform makes such a federation from any pooled dataset: clients
are dealt into ``groups`` (round-robin after a seeded shuffle, so group sizes differ by at most one)
and every group but group 0 changes its data the same way on train and test rows (validation rows,
carved from the training rows afterwards, inherit it):

- ``label_permutation``: group g relabels class c as ``perm_g[c]``, a seeded permutation of the
  classes (group 0: the identity; no two groups share one). The inputs are untouched, so a shared
  body helps every group while the heads conflict.
- ``rotation``: group g rotates its images by g x 360 / groups degrees (exact ``np.rot90`` for
  multiples of 90 degrees, bilinear otherwise, corners filled with 0). Labels are untouched.

Each client's group is written to ``data.info["concepts"]["group_of"]`` for evaluation and
reports; it is never a task id, so an algorithm sees no more than without the option."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmtl.errors import ConfigError

if TYPE_CHECKING:
    from fedmtl.data.config import ConceptsConfig
    from fedmtl.data.federated import ClientData

RNG_CONCEPT = 61  # rng purpose: [seed, RNG_CONCEPT, ...]; fixed so old seeds stay valid
_ASSIGN, _PERMUTE = 1, 2


def concept_groups(num_clients: int, groups: int, seed: int) -> list[int]:
    """Each client's group: round-robin over a seeded shuffle of the clients (sizes differ by <= 1)."""
    order = np.random.default_rng([seed, RNG_CONCEPT, _ASSIGN]).permutation(num_clients)
    group_of = np.empty(num_clients, dtype=np.int64)
    group_of[order] = np.arange(num_clients) % groups
    return [int(g) for g in group_of]


def label_permutations(num_classes: int, groups: int, seed: int) -> np.ndarray:
    """[groups, num_classes]: row g maps class c to ``out[g, c]``; row 0 is the identity, all rows
    distinct (redrawn on a repeat), so every group but 0 has a concept of its own."""
    if num_classes < 2:
        raise ConfigError("config: data.concepts.kind = 'label_permutation': needs 2+ classes")
    count = 1
    for k in range(2, num_classes + 1):  # num_classes! without overflow for large class counts
        count *= k
        if count >= groups:
            break
    if count < groups:
        raise ConfigError(
            f"config: data.concepts.groups = {groups}: {num_classes} classes have only {count} "
            f"label permutations; use at most {count} groups"
        )
    rng = np.random.default_rng([seed, RNG_CONCEPT, _PERMUTE, num_classes])
    rows = [np.arange(num_classes)]
    while len(rows) < groups:
        perm = rng.permutation(num_classes)
        if not any(np.array_equal(perm, r) for r in rows):
            rows.append(perm)
    return np.stack(rows).astype(np.int64)


def rotate_images(x: np.ndarray, degrees: float) -> np.ndarray:
    """``x`` (n, C, H, W) rotated counter-clockwise by ``degrees`` in the (H, W) plane."""
    quarter = degrees / 90.0
    if float(quarter).is_integer():
        return np.ascontiguousarray(np.rot90(x, k=int(quarter) % 4, axes=(2, 3)))
    from scipy.ndimage import rotate

    return rotate(x, degrees, axes=(2, 3), reshape=False, order=1, mode="constant", cval=0.0).astype(x.dtype)


def _check(cfg: ConceptsConfig, clients: list[ClientData], shape: tuple[int, ...], image: bool) -> None:
    where = f"config: data.concepts.kind = {cfg.kind!r}"
    if cfg.groups > len(clients):
        raise ConfigError(
            f"config: data.concepts.groups = {cfg.groups}: more groups than the {len(clients)} clients"
        )
    if any(c.task.dense for c in clients):
        raise ConfigError(f"{where}: not available for dense (per-pixel) tasks")
    if cfg.kind == "label_permutation" and not all(c.task.is_classification for c in clients):
        raise ConfigError(f"{where}: needs classification tasks (some clients regress)")
    if cfg.kind == "rotation" and (not image or len(shape) != 3 or shape[1] != shape[2]):
        raise ConfigError(
            f"{where}: needs square images of a known shape (C, H, W), got input shape {list(shape)}; "
            "set data.input_shape for flattened images, or use 'label_permutation'"
        )


def _repack(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """The clients' arrays as consecutive blocks of one array, as the loader lays training rows
    out (batched training then gathers mini-batches without copying clients together)."""
    if not arrays:
        return arrays
    return np.split(np.concatenate(arrays), np.cumsum([len(a) for a in arrays])[:-1])


def apply_concepts(
    clients: list[ClientData], cfg: ConceptsConfig, seed: int, shape: tuple[int, ...], image: bool
) -> tuple[list[ClientData], dict[str, Any]]:
    """Each client's data under its group's concept, and the facts for ``data.info["concepts"]``."""
    _check(cfg, clients, shape, image)
    group_of = concept_groups(len(clients), cfg.groups, seed)
    info: dict[str, Any] = {"kind": cfg.kind, "groups": cfg.groups, "group_of": group_of}
    out = list(clients)
    if cfg.kind == "label_permutation":
        perms: dict[int, np.ndarray] = {}
        for c in clients:
            k = c.task.num_outputs
            if k not in perms:
                perms[k] = label_permutations(k, cfg.groups, seed)
            p = perms[k][group_of[c.cid]]
            out[c.cid] = replace(c, y_train=p[c.y_train], y_test=p[c.y_test])
        info["permutations"] = {str(k): v.tolist() for k, v in sorted(perms.items())}
        for c, y in zip(out, _repack([c.y_train for c in out]), strict=True):
            out[c.cid] = replace(c, y_train=y)
    else:
        angles = [g * 360.0 / cfg.groups for g in range(cfg.groups)]
        for c in clients:
            a = angles[group_of[c.cid]]
            if a == 0:
                continue
            out[c.cid] = replace(c, x_train=rotate_images(c.x_train, a), x_test=rotate_images(c.x_test, a))
        info["degrees"] = angles
        for c, x in zip(out, _repack([c.x_train for c in out]), strict=True):
            out[c.cid] = replace(c, x_train=x)
    return out, info
