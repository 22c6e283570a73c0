"""Validation rows carved from each client's training data (``data.val_fraction``).

Hyper-parameters and the "best round" are chosen on validation data, never on test data. Each
client keeps a seeded random ``val_fraction`` of its own training rows apart (at least one when it has
two or more), so the training rows shrink and the test split is never touched. Rows are carved after
derived tasks are assigned (validation labels are the client's task) and before the corruption
harness, so each client holds a small clean validation set, as a curated hold-out would be."""

from __future__ import annotations

import dataclasses

import numpy as np

from fedmtl.data.federated import ClientData

VAL_STREAM = 9  # rng purpose: the seed stream of validation carving


def carve(client: ClientData, fraction: float, seed: int) -> ClientData:
    n = client.n_train
    k = min(max(int(round(fraction * n)), 1), n - 1) if n >= 2 else 0
    rng = np.random.default_rng([seed, VAL_STREAM, client.cid])
    picked = np.zeros(n, dtype=bool)
    picked[rng.permutation(n)[:k]] = True
    return dataclasses.replace(
        client,
        x_train=client.x_train[~picked],
        y_train=client.y_train[~picked],
        x_val=client.x_train[picked],
        y_val=client.y_train[picked],
    )


def carve_all(clients: list[ClientData], fraction: float, seed: int) -> list[ClientData]:
    return [carve(c, fraction, seed) for c in clients]
