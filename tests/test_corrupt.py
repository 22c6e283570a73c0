"""The corruption harness: exact, seeded ground truth on real data (scikit-learn digits)."""

from __future__ import annotations

import numpy as np
import pytest

from fedmtl.config import parse_config
from fedmtl.data import load_federated
from fedmtl.data.config import BackdoorConfig
from fedmtl.data.corrupt import (
    BACKDOOR,
    CLEAN,
    DUPLICATE,
    LABEL_FLIP,
    OPEN_SET,
    apply_trigger,
    attack_success_rate,
    backdoor,
    flip_labels,
    open_set_images,
)
from fedmtl.errors import ConfigError

CORRUPT = {
    "enabled": True,
    "label_flip": 0.3,
    "open_set": 0.2,
    "duplicate": 0.25,
    "backdoor": {"fraction": 0.25, "rate": 0.5, "target": 7, "size": 2},
}


def _data(corrupt: dict | None, seed: int = 0, **data):
    raw = {
        "dataset": "digits",
        "partition": {"kind": "dirichlet", "alpha": 0.5, "num_clients": 8},
        **data,
    }
    if corrupt is not None:
        raw["corrupt"] = corrupt
    return load_federated(parse_config({"data": raw}).data, seed)


def test_ground_truth_records_exactly_what_changed():
    clean, bad = _data(None), _data(CORRUPT)
    malicious = bad.info["corrupt"]["malicious_clients"]
    assert len(malicious) == 2  # 25% of 8 clients
    totals = {"clean": 0, "label_flip": 0, "open_set": 0, "duplicate": 0, "backdoor": 0}
    for c0, c in zip(clean.clients, bad.clients, strict=True):
        t = c.corruption
        n = c0.n_train
        assert t is not None and len(t.kind) == c.n_train == n + round(0.25 * n)
        x, y = c.x_train[:n], c.y_train[:n]
        assert np.array_equal(t.label[:n], c0.y_train)  # labels before any change
        same_x = (x == c0.x_train).reshape(n, -1).all(1)
        same_y = y == c0.y_train
        kind = t.kind[:n]
        # every sample is either untouched and CLEAN, or changed and recorded
        assert np.array_equal(kind == CLEAN, same_x & same_y)
        assert np.array_equal(kind == LABEL_FLIP, same_x & ~same_y)
        assert (kind == LABEL_FLIP).sum() == round(0.3 * n)
        assert (kind == OPEN_SET).sum() == round(0.2 * n)
        assert np.all(~same_x[kind == OPEN_SET]) and np.all(same_y[kind == OPEN_SET])
        if c.cid in malicious:
            bd = kind == BACKDOOR
            assert bd.any() and np.all(y[bd] == 7) and np.all(c0.y_train[bd] != 7)
            assert np.all(x[bd][:, :, -2:, -2:] == 1.0)
            assert np.array_equal(x[bd][:, :, :-2, :], c0.x_train[bd][:, :, :-2, :])  # only the trigger
        else:
            assert not (kind == BACKDOOR).any()
        # duplicates: appended exact copies of the (corrupted) samples they name
        assert np.all(t.kind[n:] == DUPLICATE) and np.all(t.source[:n] == -1)
        src = t.source[n:]
        assert np.array_equal(c.x_train[n:], x[src]) and np.array_equal(c.y_train[n:], y[src])
        # test splits are never touched
        assert np.array_equal(c.x_test, c0.x_test) and np.array_equal(c.y_test, c0.y_test)
        for k, v in t.counts().items():
            totals[k] += v
    assert bad.info["corrupt"]["counts"] == totals
    assert np.array_equal(bad.x_global_test, clean.x_global_test)


def test_seeded_same_seed_same_corruption_other_seed_other():
    a, b, c = _data(CORRUPT, 0), _data(CORRUPT, 0), _data(CORRUPT, 1)
    for ca, cb in zip(a.clients, b.clients, strict=True):
        assert np.array_equal(ca.x_train, cb.x_train) and np.array_equal(
            ca.corruption.kind, cb.corruption.kind
        )
    assert any(
        len(ca.y_train) != len(cc.y_train) or not np.array_equal(ca.corruption.kind, cc.corruption.kind)
        for ca, cc in zip(a.clients, c.clients, strict=True)
    )


def test_only_a_fraction_of_clients_is_noisy_and_disabled_changes_nothing():
    part = _data({"enabled": True, "clients": 0.5, "label_flip": 0.4})
    noisy = [c.cid for c in part.clients if c.corruption is not None]
    assert len(noisy) == 4 == part.info["corrupt"]["noisy_clients"]
    off = _data({"enabled": False, "label_flip": 0.4})
    assert all(c.corruption is None for c in off.clients) and "corrupt" not in off.info


def test_label_flipping_is_symmetric_and_never_keeps_the_label():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 500)
    idx = np.arange(len(y))
    flipped = flip_labels(y, idx, 10, rng)
    assert np.all(flipped != y) and y.sum() == np.repeat(np.arange(10), 500).sum()  # input untouched
    # each wrong class equally likely: 500 * 10 samples over 9 other classes
    counts = np.bincount((flipped - y) % 10, minlength=10)[1:]
    assert counts.min() > 0.8 * 5000 / 9 and counts.max() < 1.2 * 5000 / 9


def test_open_set_images_are_natural_photo_crops_in_the_dataset_range():
    imgs = open_set_images(50, (1, 28, 28), np.random.default_rng(0))
    assert imgs.shape == (50, 1, 28, 28) and imgs.dtype == np.float32
    assert imgs.min() >= 0 and imgs.max() <= 1
    assert imgs.reshape(50, -1).std(1).mean() > 0.02  # structured crops, not flat grey
    assert len({im.tobytes() for im in imgs}) == 50
    assert open_set_images(3, (5,), np.random.default_rng(0)).shape == (3, 5)  # vectors: noise


def test_backdoor_and_trigger_are_reusable_by_attacks():
    d = _data(None)
    c = d.clients[0]
    b = BackdoorConfig(rate=0.5, target=3, size=3)
    x, y, idx = backdoor(c.x_train, c.y_train, b, np.random.default_rng(1))
    assert len(idx) == round(0.5 * c.n_train) and np.all(c.y_train[idx] != 3) and np.all(y[idx] == 3)
    assert not np.shares_memory(x, c.x_train)
    trig = apply_trigger(d.x_global_test, 3, 1.0)
    assert np.all(trig[:, :, -3:, -3:] == 1.0) and not np.all(d.x_global_test[:, :, -3:, -3:] == 1.0)
    y_true = np.array([3, 1, 2, 5])
    assert attack_success_rate(np.array([3, 3, 3, 0]), y_true, 3) == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        ({"label_flip": 1.5}, "config: data.corrupt.label_flip = 1.5: input should be less than 1"),
        (
            {"enabled": True, "label_flip": 0.6, "open_set": 0.5},
            "label_flip + open_set = 1.1: must be below 1",
        ),
        (
            {"open_set_source": "svhn"},
            "config: data.corrupt.open_set_source = 'svhn': input should be 'photos'",
        ),
        ({"backdoor": {"rate": 0}}, "config: data.corrupt.backdoor.rate = 0: input should be greater than 0"),
        ({"flip": 0.1}, "config: unknown key 'data.corrupt.flip'; allowed keys: backdoor, clients"),
    ],
)
def test_bad_corrupt_config_is_one_line(corrupt, message):
    with pytest.raises(ConfigError) as exc:
        _data(corrupt)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_harness_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"backdoor.target = 12: the task has 10 classes"):
        _data({"enabled": True, "backdoor": {"fraction": 0.2, "target": 12}})
    with pytest.raises(ConfigError, match=r"backdoor.clients = \[3, 99\]: clients \[99\] do not exist"):
        _data({"enabled": True, "backdoor": {"clients": [3, 99]}})
    with pytest.raises(ConfigError, match=r"data.corrupt.label_flip: needs a classification task"):
        load_federated(
            parse_config(
                {"data": {"dataset": "diabetes", "corrupt": {"enabled": True, "label_flip": 0.2}}}
            ).data,
            0,
        )


def test_near_duplicates_are_noisy_copies_of_the_samples_they_name():
    exact = _data({"enabled": True, "duplicate": 0.3})
    near = _data({"enabled": True, "duplicate": 0.3, "duplicate_noise": 0.05})
    for a, b in zip(exact.clients, near.clients, strict=True):
        n = len(a.corruption.kind) - int((a.corruption.kind == DUPLICATE).sum())
        assert np.array_equal(a.corruption.source, b.corruption.source)  # the same samples copied
        assert np.array_equal(a.x_train[:n], b.x_train[:n]) and np.array_equal(a.y_train, b.y_train)
        diff = b.x_train[n:] - a.x_train[n:]
        assert np.abs(diff).max() > 0  # no longer exact copies...
        rms = float(np.sqrt((diff**2).mean()))
        assert 0.2 * 0.05 * a.x_train[:n].std() < rms < 0.05 * a.x_train[:n].std() * 1.01  # ...but close
        assert b.x_train.min() >= a.x_train.min() and b.x_train.max() <= a.x_train.max()


def test_validation_rows_are_carved_before_corruption():
    """The selection benchmark's "no oracle" claim rests on this order: validation rows are a trusted
    part of each client's clean training rows; the harness corrupts what is left, never them."""
    clean = _data(None, val_fraction=0.2)
    noisy = _data(CORRUPT, val_fraction=0.2)
    corrupted = 0
    for a, b in zip(clean.clients, noisy.clients, strict=True):
        np.testing.assert_array_equal(a.x_val, b.x_val)  # same rows, untouched by open-set images
        np.testing.assert_array_equal(a.y_val, b.y_val)  # and by label flips or the backdoor
        np.testing.assert_array_equal(a.x_test, b.x_test)
        if b.corruption is not None:
            assert len(b.corruption.kind) == len(b.y_train)  # the record covers training rows only
            corrupted += int(np.sum(b.corruption.kind != 0))
    assert corrupted > 0
