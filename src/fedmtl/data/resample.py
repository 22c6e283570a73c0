"""A population larger than its pool: ``data.partition.kind: resample``.

Cross-device studies need 10^4-10^6 clients with a few dozen samples each, more than a benchmark
pool holds. Each client draws ``samples`` (uniform in the range) from the pool with its own
Dirichlet(alpha) class mix, never the same sample twice (so its test samples are not in its
training data), while clients may share samples. Everything is vectorised over the population and
the clients are index ranges into the pool (``fedmtl.data.clients.ClientList``): 100,000 clients
hold one index array, not 100,000 copies."""

from __future__ import annotations

import numpy as np

from fedmtl.data.config import PartitionConfig
from fedmtl.errors import ConfigError

KEY = "config: data.partition"
MAX_REDRAWS = 200
CHUNK = 1 << 20


def _classes(mix_cum: np.ndarray, client_of: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One class per drawn sample from its client's cumulative class mix (inverse CDF, chunked)."""
    out = np.empty(len(client_of), dtype=np.int64)
    k = mix_cum.shape[1]
    for a in range(0, len(client_of), CHUNK):
        cum = mix_cum[client_of[a : a + CHUNK]]
        u = rng.random(len(cum))[:, None]
        out[a : a + CHUNK] = np.minimum((u > cum).sum(axis=1), k - 1)
    return out


def resample(
    labels: np.ndarray, pcfg: PartitionConfig, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train index, train offsets, test index, test offsets) into the pool, client after client."""
    n_clients = pcfg.num_clients
    lo, hi = pcfg.samples
    classes, inverse = np.unique(labels, return_inverse=True)
    by_class = [np.flatnonzero(inverse == c) for c in range(len(classes))]
    if hi > len(labels):
        raise ConfigError(f"{KEY}.samples = {list(pcfg.samples)}: more than the pool's {len(labels)} samples")
    sizes = rng.integers(lo, hi + 1, n_clients)
    client_of = np.repeat(np.arange(n_clients), sizes)
    mix = rng.dirichlet(np.full(len(classes), pcfg.alpha), n_clients)
    cls = _classes(np.cumsum(mix, axis=1), client_of, rng)
    pick = np.empty(len(cls), dtype=np.int64)
    todo = np.arange(len(cls))
    pool = len(labels)
    for attempt in range(MAX_REDRAWS):
        for c, members in enumerate(by_class):
            where = todo[cls[todo] == c]
            pick[where] = members[rng.integers(0, len(members), len(where))]
        # a sample drawn twice by one client: redraw the later copy, in its class at first, from
        # any class once that keeps failing (a client asked a class for more than it holds)
        key = client_of * pool + pick
        order = np.argsort(key, kind="stable")
        todo = order[1:][key[order[1:]] == key[order[:-1]]]
        if len(todo) == 0:
            break
        if attempt >= MAX_REDRAWS // 2:
            cls[todo] = rng.integers(0, len(by_class), len(todo))
    else:
        raise ConfigError(f"{KEY}.samples = {list(pcfg.samples)}: too many samples per client for this pool")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    position = np.arange(len(pick)) - starts[client_of]
    n_test = np.clip(np.round(sizes * test_fraction).astype(np.int64), 1, sizes - 1)
    is_test = position < n_test[client_of]
    train_sizes, test_sizes = sizes - n_test, n_test
    return (
        pick[~is_test],
        np.concatenate([[0], np.cumsum(train_sizes)]).astype(np.int64),
        pick[is_test],
        np.concatenate([[0], np.cumsum(test_sizes)]).astype(np.int64),
    )
