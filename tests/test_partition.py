"""Partitions: coverage, size guarantees, skew and reproducibility."""

from __future__ import annotations

import numpy as np
import pytest

from fedmtl.data import partition as P
from fedmtl.data import resolve_data_dir
from fedmtl.data.formats import read_idx_gz
from fedmtl.errors import ConfigError

SEEDS = (0, 1, 7)


def _labels(per_class: int = 300, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(classes), per_class))


def _covers(parts: list[np.ndarray], n: int) -> bool:
    joined = np.concatenate(parts)
    return len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))


def _classes_for_90pct(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    counts = []
    for idx in parts:
        sizes = np.sort(np.bincount(labels[idx]))[::-1]
        counts.append(int(np.searchsorted(np.cumsum(sizes), 0.9 * len(idx)) + 1))
    return float(np.mean(counts))


@pytest.mark.parametrize("seed", SEEDS)
def test_iid(seed: int) -> None:
    parts = P.iid(1003, 10, np.random.default_rng(seed))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert _covers(parts, 1003)


@pytest.mark.parametrize("seed", SEEDS)
def test_dirichlet_sizes_and_coverage(seed: int) -> None:
    labels = _labels(seed=seed)
    parts = P.dirichlet(labels, 40, 0.1, 20, np.random.default_rng(seed))
    assert len(parts) == 40
    assert min(len(p) for p in parts) >= 20
    assert _covers(parts, len(labels))


def test_dirichlet_skew() -> None:
    labels = _labels()
    skewed = P.dirichlet(labels, 20, 0.1, 10, np.random.default_rng(0))
    flat = P.dirichlet(labels, 20, 100.0, 10, np.random.default_rng(0))
    assert _classes_for_90pct(labels, skewed) < 4 < _classes_for_90pct(labels, flat)


def test_dirichlet_reproducible() -> None:
    labels = _labels()
    a = P.dirichlet(labels, 10, 0.5, 10, np.random.default_rng(3))
    b = P.dirichlet(labels, 10, 0.5, 10, np.random.default_rng(3))
    c = P.dirichlet(labels, 10, 0.5, 10, np.random.default_rng(4))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_too_many_clients() -> None:
    with pytest.raises(ConfigError, match=r"num_clients = 30: more clients than the 20 available samples"):
        P.iid(20, 30, np.random.default_rng(0))
    with pytest.raises(ConfigError, match=r"data\.partition\.min_samples = 10: 50 clients x 10 samples"):
        P.dirichlet(_labels(per_class=40), 50, 0.5, 10, np.random.default_rng(0))


def test_dirichlet_1000_clients_on_mnist() -> None:
    root = resolve_data_dir(None)
    if root is None:
        pytest.skip("shared data folder not present")
    labels = read_idx_gz(root / "mnist" / "train-labels-idx1-ubyte.gz")
    parts = P.dirichlet(labels, 1000, 0.1, 10, np.random.default_rng(0))
    assert len(parts) == 1000 and min(len(p) for p in parts) >= 10
    assert _covers(parts, 60000)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 2, 3, 10])
def test_shards_exact_classes(seed: int, k: int) -> None:
    labels = _labels(seed=seed)
    parts = P.shards(labels, 25, k, np.random.default_rng(seed))
    assert [len(np.unique(labels[p])) for p in parts] == [k] * 25
    assert _covers(parts, len(labels))  # 25 * k >= 10 classes, so nothing is dropped


def test_shards_errors() -> None:
    with pytest.raises(ConfigError, match="classes_per_client = 11: the data has only 10 classes"):
        P.shards(_labels(), 5, 11, np.random.default_rng(0))
    with pytest.raises(
        ConfigError, match="num_clients = 30: class . has 5 samples but 6 clients should hold it"
    ):
        P.shards(_labels(per_class=5), 30, 2, np.random.default_rng(0))


@pytest.mark.parametrize("seed", SEEDS)
def test_quantity_skew(seed: int) -> None:
    parts = P.quantity_skew(5000, 30, 1.0, 10, np.random.default_rng(seed))
    sizes = np.array([len(p) for p in parts])
    assert sizes.sum() == 5000 and sizes.min() >= 10
    assert sizes.max() > 3 * sizes.min()
    assert _covers(parts, 5000)
    even = [len(p) for p in P.quantity_skew(5000, 30, 0.0, 10, np.random.default_rng(seed))]
    assert max(even) - min(even) <= 1


def test_natural() -> None:
    parts = P.natural([3, 0, 2])
    assert [p.tolist() for p in parts] == [[0, 1, 2], [], [3, 4]]


@pytest.mark.parametrize("seed", SEEDS)
def test_split_stratified(seed: int) -> None:
    labels = np.repeat([0, 1, 2], [600, 300, 100])
    train, test = P.split_train_test(labels, 0.25, np.random.default_rng(seed), stratify=True)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 1000
    assert len(test) == 250
    assert np.bincount(labels[test]).tolist() == [150, 75, 25]


def test_split_small_and_fallback() -> None:
    rng = np.random.default_rng(0)
    for n in (2, 3, 5):
        train, test = P.split_train_test(n, 0.25, rng, stratify=False)
        assert len(train) >= 1 and len(test) >= 1 and len(train) + len(test) == n
    train, test = P.split_train_test(np.array([4]), 0.25, rng)
    assert train.tolist() == [0] and test.tolist() == []
    # A class with one sample cannot be stratified: random split, still disjoint and complete.
    labels = np.array([0] * 9 + [1])
    train, test = P.split_train_test(labels, 0.3, rng, stratify=True)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(10)) and len(test) == 3
    # Many tiny classes: each keeps one sample on each side.
    labels = np.repeat(np.arange(6), 2)
    train, test = P.split_train_test(labels, 0.5, rng, stratify=True)
    assert sorted(labels[test].tolist()) == list(range(6)) and sorted(labels[train].tolist()) == list(
        range(6)
    )


# ------------------------------------------------------------------------ target / covariate
def test_sorted_groups_cover_every_sample_and_order_the_score():
    score = np.random.default_rng(0).normal(size=1000)
    for jitter, max_overlap in ((0.0, 0.0), (0.25, 0.1)):
        parts = P.sorted_groups(score, 4, jitter, np.random.default_rng(1))
        assert _covers(parts, 1000) and [len(p) for p in parts] == [250] * 4
        means = [score[p].mean() for p in parts]
        assert means == sorted(means)
        # without jitter the ranges are disjoint; with it neighbours overlap a little
        overlap = np.mean(score[parts[0]] > np.median(score[parts[1]]))
        assert (score[parts[0]].max() <= score[parts[1]].min()) == (jitter == 0)
        assert overlap <= max_overlap
    again = P.sorted_groups(score, 4, 0.25, np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_first_component_follows_the_main_direction_with_a_fixed_sign():
    rng = np.random.default_rng(0)
    t = rng.normal(size=500)
    x = np.stack([3 * t, -2 * t, 0.01 * rng.normal(size=500)], axis=1)
    pc = P.first_component(x)
    assert abs(np.corrcoef(pc, t)[0, 1]) > 0.999
    assert np.array_equal(pc, P.first_component(x.copy()))


def test_covariate_and_target_partitions_from_the_config():
    from fedmtl.config import parse_config
    from fedmtl.data import load_federated

    def load(dataset: str, kind: str, k: int):  # noqa: ANN202
        cfg = parse_config({"data": {"dataset": dataset, "partition": {"kind": kind, "num_clients": k}}})
        return load_federated(cfg.data, 0)

    data = load("diabetes", "target", 4)
    means = [float(c.y_train.mean()) for c in data.clients]
    assert means == sorted(means) and means[-1] - means[0] > 1.5  # standardised target
    data = load("digits", "covariate", 3)
    x = np.concatenate([c.x_train for c in data.clients]).reshape(-1, 64)
    pc = P.first_component(x)
    bounds = np.cumsum([0] + [len(c.y_train) for c in data.clients])
    centres = [pc[a:b].mean() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    assert abs(centres[0] - centres[2]) > 1.0 * pc.std()  # clients see different parts of input space
