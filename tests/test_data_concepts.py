"""``data.concepts``: concept shift between seeded client groups (label permutation, rotation)."""

from __future__ import annotations

import numpy as np
import pytest

import fedmtl
from fedmtl.config import parse_config
from fedmtl.data import load_federated
from fedmtl.data.concepts import concept_groups, label_permutations, rotate_images
from fedmtl.errors import ConfigError


def _data(concepts: dict | None, seed: int = 0, **data):
    raw = {"dataset": "digits", "partition": {"kind": "dirichlet", "alpha": 0.5, "num_clients": 8}, **data}
    if concepts is not None:
        raw["concepts"] = concepts
    return load_federated(parse_config({"data": raw}).data, seed)


def test_groups_are_dealt_round_robin_from_a_seeded_shuffle():
    a, b, other = concept_groups(10, 4, 0), concept_groups(10, 4, 0), concept_groups(10, 4, 1)
    assert a == b and a != other
    assert sorted(np.bincount(a)) == [2, 2, 3, 3]


def test_label_permutations_are_distinct_bijections_with_group_0_the_identity():
    perms = label_permutations(10, 4, 0)
    np.testing.assert_array_equal(perms[0], np.arange(10))
    for p in perms:
        np.testing.assert_array_equal(np.sort(p), np.arange(10))
    assert len({tuple(p) for p in perms}) == 4
    np.testing.assert_array_equal(perms, label_permutations(10, 4, 0))
    assert not np.array_equal(perms, label_permutations(10, 4, 1))
    np.testing.assert_array_equal(label_permutations(2, 2, 0), [[0, 1], [1, 0]])  # the only other one
    with pytest.raises(ConfigError, match=r"data.concepts.groups = 3: 2 classes have only 2 label perm"):
        label_permutations(2, 3, 0)


def test_label_permutation_relabels_train_val_and_test_of_each_group_and_records_the_groups():
    clean = _data(None, val_fraction=0.2)
    shifted = _data({"kind": "label_permutation", "groups": 4}, val_fraction=0.2)
    info = shifted.info["concepts"]
    perms = np.asarray(info["permutations"]["10"])
    assert info["group_of"] == concept_groups(8, 4, 0) and info["kind"] == "label_permutation"
    assert shifted.summary()["concepts"]["group_of"] == info["group_of"]
    assert shifted.y_global_test is None  # no one global test set across concepts
    for c0, c in zip(clean.clients, shifted.clients, strict=True):
        p = perms[info["group_of"][c.cid]]
        np.testing.assert_array_equal(c.x_train, c0.x_train)
        for split in ("y_train", "y_val", "y_test"):
            np.testing.assert_array_equal(getattr(c, split), p[getattr(c0, split)])
        if info["group_of"][c.cid] == 0:
            np.testing.assert_array_equal(c.y_train, c0.y_train)


def test_rotation_rotates_each_groups_images_exactly_and_keeps_labels():
    clean = _data(None)
    shifted = _data({"kind": "rotation", "groups": 4})
    group_of = shifted.info["concepts"]["group_of"]
    assert shifted.info["concepts"]["degrees"] == [0.0, 90.0, 180.0, 270.0]
    for c0, c in zip(clean.clients, shifted.clients, strict=True):
        k = group_of[c.cid]
        for a0, a in ((c0.x_train, c.x_train), (c0.x_test, c.x_test)):
            np.testing.assert_array_equal(a, np.rot90(a0, k=k, axes=(2, 3)))
        np.testing.assert_array_equal(c.y_train, c0.y_train)
    # training rows stay consecutive blocks of one array (batched training's fast path)
    xs = [c.x_train for c in shifted.clients]
    assert all(x.base is xs[0].base and x.base is not None for x in xs)
    # other angles interpolate
    x = clean.clients[0].x_train[:3]
    np.testing.assert_allclose(rotate_images(x, 90.0), np.rot90(x, 1, axes=(2, 3)))
    near = rotate_images(x, 89.999)  # the interpolating path turns the same way (border aside)
    np.testing.assert_allclose(near[..., 1:-1, 1:-1], np.rot90(x, 1, axes=(2, 3))[..., 1:-1, 1:-1], atol=1e-3)
    assert rotate_images(x, 120.0).shape == x.shape


@pytest.mark.parametrize(
    "data, message",
    [
        ({"concepts": {"kind": "flip"}}, "config: data.concepts.kind = 'flip': input should be 'label_perm"),
        (
            {"concepts": {"kind": "rotation", "groups": 1}},
            "config: data.concepts.groups = 1: input should be",
        ),
        (
            {"concepts": {"groups": 2}},
            "config: data.concepts = {'groups': 2}: needs kind: label_permutation or",
        ),
        (
            {"concepts": {"kind": "rotation", "angle": 3}},
            "config: unknown key 'data.concepts.angle'; allowed keys: groups, kind",
        ),
    ],
)
def test_bad_concepts_values_name_what_is_allowed(data, message):
    with pytest.raises(ConfigError) as err:
        parse_config({"data": data})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_concepts_are_refused_where_they_cannot_apply():
    with pytest.raises(ConfigError, match=r"data.concepts.groups = 9: more groups than the 8 clients"):
        _data({"kind": "label_permutation", "groups": 9})
    diabetes = {"dataset": "diabetes", "partition": {"kind": "iid", "num_clients": 4}}
    with pytest.raises(ConfigError, match=r"kind = 'rotation': needs square images of a known shape"):
        load_federated(parse_config({"data": {**diabetes, "concepts": {"kind": "rotation"}}}).data, 0)
    with pytest.raises(ConfigError, match=r"kind = 'label_permutation': needs classification tasks"):
        load_federated(
            parse_config({"data": {**diabetes, "concepts": {"kind": "label_permutation"}}}).data, 0
        )
    resample = {"kind": "resample", "num_clients": 8}
    with pytest.raises(ConfigError, match=r"partition.kind = 'resample'.*concepts rewrites every client"):
        _data({"kind": "rotation"}, partition=resample)
    for dataset, made in (("store", "pack"), ("federation", "split")):
        raw = {"dataset": dataset, "file": "/nowhere", "concepts": {"kind": "rotation"}}
        with pytest.raises(
            ConfigError, match=rf"data.concepts: dataset '{dataset}' holds .* config you {made}"
        ):
            load_federated(parse_config({"data": raw}).data, 0)


def test_a_concept_shift_run_trains_and_reports_the_true_groups(tmp_path):
    cfg = {
        "seed": 0,
        "data": {
            "dataset": "digits",
            "partition": {"kind": "iid", "num_clients": 4},
            "concepts": {"kind": "label_permutation", "groups": 2},
        },
        "model": {"name": "mlp", "hidden": [16]},
        "train": {"rounds": 2},
        "algorithm": {"name": "fedper"},
        "output": {"progress": False},
    }
    res = fedmtl.run(cfg, out=tmp_path / "r")
    assert res.summary["data"]["concepts"]["group_of"] == concept_groups(4, 2, 0)
