"""The corruption harness: seeded label flips, open-set images, duplicates and a backdoor.

Sample selection is only measurable when we know which samples are bad, so every change is
recorded per client in a ``Corruption`` (what kind, which original label, which source sample).
The functions that change data are plain and public so that other features (malicious clients in
``fedmtl.attacks``) can reuse label flipping and the backdoor on their own terms; ``corrupt_clients``
applies ``data.corrupt`` to a federation after partitioning.

Only training splits change; test splits and the global test set stay clean. Randomness comes
from ``np.random.default_rng([seed, RNG_CORRUPT, client, purpose])``, so a seed reproduces it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from fedmtl.errors import ConfigError

if TYPE_CHECKING:
    from fedmtl.data.config import BackdoorConfig, CorruptConfig
    from fedmtl.data.federated import ClientData

RNG_CORRUPT = 5  # purpose id next to datasets.RNG_* (1-4)
_FLIP, _OPEN, _DUP, _BACKDOOR, _PICK = 1, 2, 3, 4, 5

CLEAN, LABEL_FLIP, OPEN_SET, DUPLICATE, BACKDOOR = 0, 1, 2, 3, 4
KIND_NAMES = {CLEAN: "clean", LABEL_FLIP: "label_flip", OPEN_SET: "open_set", DUPLICATE: "duplicate"}
KIND_NAMES[BACKDOOR] = "backdoor"


@dataclass
class Corruption:
    """Ground truth for one client's (corrupted) training split, one entry per training sample.

    ``kind[i]`` is CLEAN or the change made to sample i; ``label[i]`` its label before any change;
    ``source[i]`` the index of the sample a duplicate copies (-1 otherwise)."""

    kind: np.ndarray  # int8
    label: np.ndarray
    source: np.ndarray  # int64

    @property
    def bad(self) -> np.ndarray:
        """Boolean mask of every changed sample: what a perfect selector would drop."""
        return self.kind != CLEAN

    def counts(self) -> dict[str, int]:
        return {name: int((self.kind == k).sum()) for k, name in KIND_NAMES.items()}


# ------------------------------------------------------------------------------------ primitives


def pick(n: int, rate: float, rng: np.random.Generator, allowed: np.ndarray | None = None) -> np.ndarray:
    """``round(rate * n)`` distinct indices (sorted) among ``allowed`` (default: all of 0..n-1)."""
    pool = np.arange(n) if allowed is None else np.flatnonzero(allowed)
    k = min(len(pool), int(round(rate * n)))
    return np.sort(rng.choice(pool, size=k, replace=False)) if k else np.zeros(0, dtype=np.int64)


def flip_labels(y: np.ndarray, idx: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Symmetric label flipping: each ``y[idx]`` becomes a uniformly drawn *different* class."""
    if num_classes < 2:
        raise ConfigError("config: data.corrupt.label_flip: needs a classification task with 2+ classes")
    out = y.copy()
    shift = rng.integers(1, num_classes, size=len(idx))
    out[idx] = (y[idx] + shift) % num_classes
    return out


@lru_cache(maxsize=1)
def _grey_photos() -> tuple[np.ndarray, ...]:
    """scikit-learn's two bundled photos in grey, values in [0, 1] (shipped with the wheel)."""
    from sklearn.datasets import load_sample_images

    return tuple(img.astype(np.float32).mean(axis=2) / 255.0 for img in load_sample_images().images)


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Area-average resize of a 2-D array (down-sampling crops to the dataset's image size)."""
    import torch

    t = torch.as_tensor(img, dtype=torch.float32)[None, None]
    return torch.nn.functional.adaptive_avg_pool2d(t, (h, w))[0, 0].numpy()


def open_set_images(
    count: int, shape: tuple[int, ...], rng: np.random.Generator, source: str = "photos"
) -> np.ndarray:
    """``count`` out-of-distribution inputs of ``shape`` (C, H, W) or (features,), in [0, 1].

    'photos': random square crops (side 1/8 to 1/2 of the photo's height) of the bundled natural
    photos, grey, area-resized; every channel gets the same grey image. 'noise': uniform noise."""
    shape = tuple(shape)
    if source == "noise" or len(shape) != 3:
        return rng.random((count, *shape), dtype=np.float32)
    c, h, w = shape
    photos = _grey_photos()
    out = np.empty((count, c, h, w), dtype=np.float32)
    for i in range(count):
        photo = photos[int(rng.integers(len(photos)))]
        side = int(rng.integers(photo.shape[0] // 8, photo.shape[0] // 2 + 1))
        top = int(rng.integers(0, photo.shape[0] - side + 1))
        left = int(rng.integers(0, photo.shape[1] - side + 1))
        out[i] = _resize(photo[top : top + side, left : left + side], h, w)[None]
    return out


def apply_trigger(x: np.ndarray, size: int = 3, value: float = 1.0) -> np.ndarray:
    """A copy of ``x`` with the backdoor trigger stamped on every sample.

    Images (n, C, H, W): a ``size`` x ``size`` square in the bottom-right corner of every channel.
    Vectors (n, d): the last ``size`` features. Use it on a test set to measure attack success."""
    out = np.array(x, copy=True)
    if out.ndim == 4:
        out[:, :, -size:, -size:] = value
    elif out.ndim == 2:
        out[:, -size:] = value
    else:
        raise ValueError(f"apply_trigger: expected (n, C, H, W) or (n, d) inputs, got shape {out.shape}")
    return out


def backdoor(
    x: np.ndarray, y: np.ndarray, bcfg: BackdoorConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Poison ``bcfg.rate`` of the samples whose label is not the target: trigger + target label.

    Returns (x, y, poisoned indices); the inputs are not modified."""
    idx = pick(len(y), bcfg.rate, rng, allowed=y != bcfg.target)
    x2, y2 = x.copy(), y.copy()
    if len(idx):
        x2[idx] = apply_trigger(x[idx], bcfg.size, bcfg.value)
        y2[idx] = bcfg.target
    return x2, y2, idx


def attack_success_rate(pred: np.ndarray, y_true: np.ndarray, target: int) -> float:
    """Fraction of triggered samples whose true class is not the target that are predicted as it."""
    mask = np.asarray(y_true) != target
    return float((np.asarray(pred)[mask] == target).mean()) if mask.any() else float("nan")


# ------------------------------------------------------------------------------------ harness


def malicious_clients(bcfg: BackdoorConfig, train_clients: list[int], seed: int) -> list[int]:
    """The backdoor's clients: ``bcfg.clients`` or a seeded ``bcfg.fraction`` of the training ones."""
    if bcfg.clients is not None:
        unknown = sorted(set(bcfg.clients) - set(train_clients))
        if unknown:
            raise ConfigError(
                f"config: data.corrupt.backdoor.clients = {bcfg.clients}: clients {unknown} do not exist "
                f"or do not train (0..{max(train_clients, default=-1)})"
            )
        return sorted(set(bcfg.clients))
    if bcfg.fraction == 0:
        return []
    k = max(1, int(round(bcfg.fraction * len(train_clients))))
    rng = np.random.default_rng([seed, RNG_CORRUPT, _BACKDOOR])
    return sorted(int(c) for c in rng.choice(train_clients, size=k, replace=False))


def noisy_clients(cfg: CorruptConfig, train_clients: list[int], seed: int) -> list[int]:
    """The clients that get label flips, open-set images and duplicates (seeded ``cfg.clients``)."""
    if cfg.clients >= 1:
        return list(train_clients)
    k = max(1, int(round(cfg.clients * len(train_clients))))
    rng = np.random.default_rng([seed, RNG_CORRUPT, _PICK])
    return sorted(int(c) for c in rng.choice(train_clients, size=k, replace=False))


def corrupt_client(
    client: ClientData,
    cfg: CorruptConfig,
    seed: int,
    noisy: bool,
    malicious: bool,
    to_model: Callable[[np.ndarray], np.ndarray] | None = None,
) -> ClientData:
    """One client's corrupted copy with its ``Corruption`` record (the input is not modified).

    Order: label flips and open-set images on disjoint samples, then the backdoor (on samples
    still clean), then duplicates of the resulting samples appended at the end."""
    x, y = client.x_train, client.y_train
    n = len(y)
    kind = np.zeros(n, dtype=np.int8)
    label = y.copy()
    source = np.full(n, -1, dtype=np.int64)
    cls = client.task.is_classification
    if noisy and (cfg.label_flip > 0 or cfg.open_set > 0):
        rng = np.random.default_rng([seed, RNG_CORRUPT, client.cid, _FLIP])
        n_flip, n_open = int(round(cfg.label_flip * n)), int(round(cfg.open_set * n))
        chosen = rng.choice(n, size=min(n, n_flip + n_open), replace=False)
        flip_idx, open_idx = np.sort(chosen[:n_flip]), np.sort(chosen[n_flip:])
        if len(flip_idx):
            if not cls:
                raise ConfigError("config: data.corrupt.label_flip: needs a classification task")
            y = flip_labels(y, flip_idx, client.task.num_outputs, rng)
            kind[flip_idx] = LABEL_FLIP
        if len(open_idx):
            orng = np.random.default_rng([seed, RNG_CORRUPT, client.cid, _OPEN])
            x = x.copy()
            subs = open_set_images(len(open_idx), x.shape[1:], orng, cfg.open_set_source)
            x[open_idx] = subs if to_model is None else to_model(subs)  # [0, 1] pixels as the model sees them
            kind[open_idx] = OPEN_SET
    if malicious:
        if not cls:
            raise ConfigError("config: data.corrupt.backdoor: needs a classification task")
        b = cfg.backdoor
        if b.target >= client.task.num_outputs:
            raise ConfigError(
                f"config: data.corrupt.backdoor.target = {b.target}: the task has "
                f"{client.task.num_outputs} classes (0..{client.task.num_outputs - 1})"
            )
        brng = np.random.default_rng([seed, RNG_CORRUPT, client.cid, _BACKDOOR])
        idx = pick(n, b.rate, brng, allowed=(kind == CLEAN) & (y != b.target))
        if len(idx):
            x = x.copy() if x is client.x_train else x
            y = y.copy() if y is client.y_train else y
            x[idx] = apply_trigger(x[idx], b.size, b.value)
            y[idx] = b.target
            kind[idx] = BACKDOOR
    if noisy and cfg.duplicate > 0:
        drng = np.random.default_rng([seed, RNG_CORRUPT, client.cid, _DUP])
        k = int(round(cfg.duplicate * n))
        src = np.sort(drng.choice(n, size=k, replace=k > n)) if k and n else np.zeros(0, dtype=np.int64)
        copies = x[src]
        if cfg.duplicate_noise > 0 and len(src) and np.issubdtype(x.dtype, np.floating):
            std = float(x.std()) * cfg.duplicate_noise
            noise = drng.normal(0.0, std, size=copies.shape).astype(x.dtype)
            copies = np.clip(copies + noise, x.min(), x.max()).astype(x.dtype)
        x = np.concatenate([x, copies])
        y = np.concatenate([y, y[src]])
        kind = np.concatenate([kind, np.full(len(src), DUPLICATE, dtype=np.int8)])
        label = np.concatenate([label, label[src]])
        source = np.concatenate([source, src.astype(np.int64)])
    return replace(client, x_train=x, y_train=y, corruption=Corruption(kind, label, source))


def corrupt_clients(
    clients: list[ClientData],
    cfg: CorruptConfig,
    seed: int,
    train_clients: list[int],
    to_model: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[list[ClientData], dict]:
    """Apply ``data.corrupt`` to a federation; returns the clients and a summary for ``data.info``.
    ``to_model`` maps open-set images, made as [0, 1] pixels, into the samples' normalisation."""
    if not cfg.enabled:
        return clients, {}
    noisy = set(noisy_clients(cfg, train_clients, seed))
    bad = set(malicious_clients(cfg.backdoor, train_clients, seed))
    out = [
        corrupt_client(c, cfg, seed, c.cid in noisy, c.cid in bad, to_model)
        if (c.cid in noisy or c.cid in bad)
        else c
        for c in clients
    ]
    totals: dict[str, int] = {name: 0 for name in KIND_NAMES.values()}
    for c in out:
        if c.corruption is not None:
            for name, v in c.corruption.counts().items():
                totals[name] += v
        else:
            totals["clean"] += c.n_train
    info = {"counts": totals, "noisy_clients": len(noisy), "malicious_clients": sorted(bad)}
    if bad:
        b = cfg.backdoor
        info["backdoor"] = {"target": b.target, "size": b.size, "value": b.value}
    return out, info
