"""Client partitions of a pooled dataset, as lists of sorted index arrays.

All functions are pure and draw only from the ``np.random.Generator`` they are given, so a seed
reproduces a partition exactly. Impossible requests raise ``ConfigError`` naming the config key.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedmtl.errors import ConfigError

KEY = "config: data.partition"
DIRICHLET_TRIES = 5


def _check_capacity(n: int, num_clients: int, min_samples: int) -> None:
    if num_clients < 1:
        raise ConfigError(f"{KEY}.num_clients = {num_clients}: must be at least 1")
    if num_clients > n:
        raise ConfigError(f"{KEY}.num_clients = {num_clients}: more clients than the {n} available samples")
    if num_clients * min_samples > n:
        raise ConfigError(
            f"{KEY}.min_samples = {min_samples}: {num_clients} clients x {min_samples} samples "
            f"need {num_clients * min_samples} but only {n} are available"
        )


def _sorted(parts: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def iid(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Uniform random split; client sizes differ by at most one."""
    _check_capacity(n, num_clients, 1)
    return _sorted(np.array_split(rng.permutation(n), num_clients))


def _dirichlet_draw(
    by_class: list[np.ndarray], num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for idx in by_class:
        idx = rng.permutation(idx)
        props = rng.dirichlet(np.full(num_clients, alpha))
        cuts = np.round(np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
        for client, part in enumerate(np.split(idx, cuts)):
            pieces[client].append(part)
    return [np.concatenate(p) for p in pieces]


def _repair(parts: list[np.ndarray], min_samples: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Top up clients below ``min_samples`` with random samples taken from the largest clients."""
    sizes = np.array([len(p) for p in parts])
    for client in np.flatnonzero(sizes < min_samples):
        while sizes[client] < min_samples:
            donor = int(np.argmax(sizes))
            take = min(min_samples - sizes[client], sizes[donor] - min_samples)
            moved = rng.choice(sizes[donor], size=take, replace=False)
            keep = np.ones(sizes[donor], dtype=bool)
            keep[moved] = False
            parts[client] = np.concatenate([parts[client], parts[donor][moved]])
            parts[donor] = parts[donor][keep]
            sizes[client] += take
            sizes[donor] -= take
    return parts


def dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, min_samples: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Label skew: each class is spread over clients with proportions ~ Dir(alpha).

    Draws up to ``DIRICHLET_TRIES`` times and keeps the first draw where every client has
    ``min_samples``; otherwise the draw with the smallest total shortfall is repaired by moving
    random samples from the largest clients, so it always terminates quickly.
    """
    labels = np.asarray(labels)
    _check_capacity(len(labels), num_clients, min_samples)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    best: list[np.ndarray] = []
    best_short = -1
    for _ in range(DIRICHLET_TRIES):
        parts = _dirichlet_draw(by_class, num_clients, alpha, rng)
        short = int(sum(max(0, min_samples - len(p)) for p in parts))
        if best_short < 0 or short < best_short:
            best, best_short = parts, short
        if short == 0:
            break
    return _sorted(_repair(best, min_samples, rng))


def shards(
    labels: np.ndarray, num_clients: int, classes_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Pathological non-IID: every client holds exactly ``classes_per_client`` classes.

    Classes are dealt round-robin over a random class order, so each class goes to nearly the same
    number of clients, and each class's samples are split evenly among its holders. When
    ``num_clients * classes_per_client`` is below the number of classes, the classes nobody
    holds are dropped.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    k, num_classes = classes_per_client, len(classes)
    if k > num_classes:
        raise ConfigError(f"{KEY}.classes_per_client = {k}: the data has only {num_classes} classes")
    _check_capacity(len(labels), num_clients, 1)
    order = rng.permutation(num_classes)
    holders: list[list[int]] = [[] for _ in range(num_classes)]
    for client in range(num_clients):
        for j in range(k):
            holders[order[(client * k + j) % num_classes]].append(client)
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c, who in enumerate(holders):
        if not who:
            continue
        idx = rng.permutation(np.flatnonzero(labels == classes[c]))
        if len(idx) < len(who):
            raise ConfigError(
                f"{KEY}.num_clients = {num_clients}: class {classes[c]} has {len(idx)} samples "
                f"but {len(who)} clients should hold it"
            )
        for client, part in zip(who, np.array_split(idx, len(who)), strict=True):
            pieces[client].append(part)
    return _sorted([np.concatenate(p) for p in pieces])


def quantity_skew(
    n: int, num_clients: int, sigma: float, min_samples: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Size skew with IID labels: sizes are ``min_samples`` plus a lognormal(0, sigma) share of the rest."""
    _check_capacity(n, num_clients, min_samples)
    weights = rng.lognormal(0.0, sigma, num_clients)
    spare = n - num_clients * min_samples
    share = weights / weights.sum() * spare
    extra = np.floor(share).astype(np.int64)
    # Largest remainders get the leftover samples so the sizes sum to n exactly.
    extra[np.argsort(extra - share)[: spare - int(extra.sum())]] += 1
    sizes = min_samples + extra
    return _sorted(np.split(rng.permutation(n), np.cumsum(sizes)[:-1]))


def sorted_groups(
    score: np.ndarray, num_clients: int, jitter: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Contiguous, equal-sized groups of the samples sorted by ``score`` plus seeded Gaussian
    jitter of ``jitter`` score standard deviations: each client sees its own range of the score
    (the target: label/target skew; an input direction: covariate shift), with overlap set by the
    jitter."""
    score = np.asarray(score, np.float64)
    n = len(score)
    _check_capacity(n, num_clients, 1)
    noise = jitter * score.std() * rng.standard_normal(n)
    order = np.argsort(score + noise, kind="stable")
    return _sorted(np.array_split(order, num_clients))


def first_component(x: np.ndarray) -> np.ndarray:
    """Each sample's score along the first principal direction of the standardised inputs; used
    only to assign samples to clients (simulated covariate shift), never as a feature."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    _, vecs = np.linalg.eigh(x.T @ x)  # d x d: fast for many samples (MNIST: 784 x 784)
    v = vecs[:, -1]
    v = v if v[np.argmax(np.abs(v))] > 0 else -v  # a fixed sign: the same data, the same clients
    return x @ v


def natural(task_sizes: Sequence[int]) -> list[np.ndarray]:
    """Identity partition: task ``t`` is client ``t``; indices address the concatenated tasks."""
    offsets = np.concatenate([[0], np.cumsum(np.asarray(task_sizes, dtype=np.int64))])
    return [np.arange(offsets[t], offsets[t + 1], dtype=np.int64) for t in range(len(task_sizes))]


def _allocate(counts: np.ndarray, total: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Integer split of ``total`` proportional to ``counts`` within [lo, hi], by largest remainder."""
    share = counts / counts.sum() * total
    alloc = np.clip(np.floor(share).astype(np.int64), lo, hi)
    remainder = share - alloc
    while alloc.sum() < total:
        open_ = alloc < hi
        alloc[np.flatnonzero(open_)[np.argmax(remainder[open_])]] += 1
        remainder = share - alloc
    while alloc.sum() > total:
        open_ = alloc > lo
        alloc[np.flatnonzero(open_)[np.argmin(remainder[open_])]] -= 1
        remainder = share - alloc
    return alloc


def split_train_test(
    labels: np.ndarray | int, test_fraction: float, rng: np.random.Generator, stratify: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``n`` samples into (train, test) index arrays, both sorted and disjoint.

    ``labels`` is the label array (used only when ``stratify``) or just the sample count. Stratified
    when every class has at least two samples, random otherwise. With ``n >= 2`` both sides get at
    least one sample; a single sample goes to train.
    """
    n = int(labels) if isinstance(labels, int | np.integer) else len(labels)
    if n < 2:
        return np.arange(n, dtype=np.int64), np.zeros(0, dtype=np.int64)
    n_test = int(np.clip(round(n * test_fraction), 1, n - 1))
    if stratify and not isinstance(labels, int | np.integer):
        classes, inverse, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
        if counts.min() >= 2:
            lo = np.full(len(classes), 1 if n_test >= len(classes) else 0)
            hi = counts - (1 if n - n_test >= len(classes) else 0)
            per_class = _allocate(counts, int(np.clip(n_test, lo.sum(), hi.sum())), lo, hi)
            test = [
                rng.choice(np.flatnonzero(inverse == c), t, replace=False) for c, t in enumerate(per_class)
            ]
            test_idx = np.sort(np.concatenate(test).astype(np.int64))
            return np.setdiff1d(np.arange(n), test_idx), test_idx
    perm = rng.permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])
