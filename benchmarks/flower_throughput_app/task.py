"""Model, data and local training for the throughput workload, in plain PyTorch.

The usual research-code shape: an ``nn.Module``, ``torch.optim.SGD``, a loop over mini-batches.
Mini-batches follow a fresh order per epoch, taken from fedmtl's batch-order hash of
(seed, 3, round, client) (``fedmtl.training.shuffle.permutation``; a plain-PyTorch project would
call ``rng.permutation(n)`` here), so every framework in the benchmark performs the same
computation and their accuracies can be compared directly."""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import lru_cache

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedmtl.training.shuffle import Stream, permutation

#: fedmtl's purpose tag for training randomness (``fedmtl.runtime.simulation.TRAIN``).
TRAIN_PURPOSE = 3


class Net(nn.Module):
    """784-200-10 MLP, the same layers (and parameter order) as fedmtl's ``mlp`` model."""

    def __init__(self, in_features: int = 784, hidden: int = 200, out: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def client_rng(seed: int, round: int, client: int) -> Stream:
    return Stream(seed, TRAIN_PURPOSE, round, client)


def batches(n: int, batch_size: int, steps: int, rng: Stream) -> list[np.ndarray]:
    """Index sets for ``steps`` mini-batches: a fresh permutation per epoch, short last batch."""
    out: list[np.ndarray] = []
    bs = min(batch_size, n)
    while len(out) < steps:
        perm = permutation(n, rng, epoch=len(out) // -(-n // bs))
        out.extend(perm[i : i + bs] for i in range(0, n, bs))
    return out[:steps]


def train(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: float,
    batch_size: int,
    lr: float,
    rng: Stream,
) -> float:
    """Local SGD on one client's data; returns the mean training loss."""
    steps = max(1, math.ceil(epochs * math.ceil(len(y) / batch_size)))
    indices = (torch.from_numpy(idx) for idx in batches(len(y), batch_size, steps, rng))
    return sgd(net, ((x[ix], y[ix]) for ix in indices), lr)


def train_with_loader(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: float,
    batch_size: int,
    lr: float,
    rng: Stream,
) -> float:
    """``train`` written the way most federated research code writes it (PFLlib's and FL-bench's
    clients): mini-batches come from a ``DataLoader`` over a ``TensorDataset``. Its batch sampler
    yields the very batches ``train`` uses, so the arithmetic (and the accuracy) is the same; what
    differs is the per-sample indexing and collation a DataLoader does."""
    steps = max(1, math.ceil(epochs * math.ceil(len(y) / batch_size)))
    loader = DataLoader(
        TensorDataset(x, y), batch_sampler=[b.tolist() for b in batches(len(y), batch_size, steps, rng)]
    )
    return sgd(net, loader, lr)


def sgd(net: nn.Module, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], lr: float) -> float:
    """One ``torch.optim.SGD`` step per (inputs, labels) batch; returns the mean training loss."""
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    net.train()
    total, seen = 0.0, 0
    for xb, yb in pairs:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(xb), yb)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(yb)
        seen += len(yb)
    return total / max(seen, 1)


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    return float((net(x).argmax(1) == y).float().mean())


def save_federation(
    path: str, xs: list[np.ndarray], ys: list[np.ndarray], x_test: np.ndarray, y_test: np.ndarray
) -> None:
    """Write the partitioned data once; each ClientApp process loads only what it needs."""
    sizes = np.array([len(y) for y in ys])
    np.savez(path, x=np.concatenate(xs), y=np.concatenate(ys), sizes=sizes, x_test=x_test, y_test=y_test)


@lru_cache(maxsize=1)
def _federation(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.load(path) as f:
        return f["x"], f["y"], np.concatenate([[0], np.cumsum(f["sizes"])])


def load_partition(path: str, partition: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One client's training data (cached per process, like Flower apps cache their datasets)."""
    x, y, offsets = _federation(path)
    lo, hi = offsets[partition], offsets[partition + 1]
    return torch.from_numpy(x[lo:hi]), torch.from_numpy(y[lo:hi])


@lru_cache(maxsize=1)
def load_test(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(path) as f:
        return torch.from_numpy(f["x_test"]), torch.from_numpy(f["y_test"])
