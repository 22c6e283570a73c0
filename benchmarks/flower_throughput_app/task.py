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


class FemnistCNN(nn.Module):
    """LEAF's FEMNIST CNN for 28x28 images: 5x5 convolutions of 32 and 64 filters ("same"
    padding), each with ReLU and 2x2 max pooling, a 2048-unit dense layer and the output; the same
    layers and parameter names as fedmtl's ``cnn`` model with ``preset: femnist``."""

    def __init__(self, out: int = 62) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(7 * 7 * 64, 2048), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(2048, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class _CharBody(nn.Module):
    def __init__(self, vocab: int, embed: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed, padding_idx=0)
        self.rnn = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.long()  # token ids, stored as numbers like every sample
        out, _ = self.rnn(self.embed(ids))
        last = ((ids > 0).sum(dim=1) - 1).clamp(min=0)  # sequences are right-padded with id 0
        return out[torch.arange(len(ids)), last]


class CharLSTM(nn.Module):
    """LEAF's Shakespeare model: an 8-dimensional character embedding, two LSTM layers of 256 units
    and the next character from the state after the last one; the same layers and parameter
    names as fedmtl's ``rnn`` model."""

    def __init__(self, vocab: int, out: int, embed: int = 8, hidden: int = 256, layers: int = 2) -> None:
        super().__init__()
        self.body = _CharBody(vocab, embed, hidden, layers)
        self.head = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def make_net(spec: dict | None = None) -> nn.Module:
    """The benchmark's model from its description (JSON-able, so Flower's apps get it as a string):
    ``{"kind": "mlp", "hidden": 200}`` (the default), ``{"kind": "femnist_cnn", "out": 10}`` or
    ``{"kind": "char_lstm", "vocab": V, "out": C}``."""
    spec = dict(spec or {"kind": "mlp"})
    kind = spec.pop("kind")
    if kind == "mlp":
        return Net(**spec)
    if kind == "femnist_cnn":
        return FemnistCNN(**spec)
    if kind == "char_lstm":
        return CharLSTM(**spec)
    raise ValueError(f"unknown model kind {kind!r}")


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
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1000) -> float:
    """Test accuracy, evaluated ``chunk`` samples at a time (a CNN's activations for 10,000 images
    at once would take gigabytes)."""
    net.eval()
    right = sum(
        int((net(x[i : i + chunk]).argmax(1) == y[i : i + chunk]).sum()) for i in range(0, len(y), chunk)
    )
    return right / max(len(y), 1)


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
