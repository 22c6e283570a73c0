"""Personalised multi-task FL on real (embedded) data: heterogeneous heads, gains, new clients,
hierarchical grouping by task and discovered by clustering."""

from __future__ import annotations

import numpy as np
import pytest

import fedmtl
from fedmtl.algorithms.heads import SEP, for_task, initial_global, keywise_mean, qualify
from fedmtl.config import parse_config
from fedmtl.data import load_federated
from fedmtl.errors import ConfigError
from tests.conftest import digits_config

TASKS = ["digit", "parity", "ge5", "ink"]


def _multi(**kw):
    base = digits_config(
        data__tasks=TASKS,
        data__partition={"kind": "dirichlet", "alpha": 0.5, "num_clients": 12},
        train__rounds=12,
        clients__per_round=12,
    )
    for k, v in kw.items():
        base[k] = v
    return base


def test_derived_tasks_relabel_the_same_images():
    data = load_federated(parse_config(_multi()).data, 0)
    assert {n: (t.kind, t.num_outputs) for n, t in data.tasks.items()} == {
        "digit": ("classification", 10),
        "parity": ("classification", 2),
        "ge5": ("classification", 2),
        "ink": ("regression", 1),
    }
    digits = load_federated(
        parse_config(
            digits_config(data__partition={"kind": "dirichlet", "alpha": 0.5, "num_clients": 12})
        ).data,
        0,
    )
    for c, d in zip(data.clients, digits.clients, strict=True):
        assert c.task.name == TASKS[c.cid % 4]
        np.testing.assert_array_equal(c.x_train, d.x_train)
        if c.task.name == "parity":
            np.testing.assert_array_equal(c.y_train, d.y_train % 2)
        if c.task.name == "ge5":
            np.testing.assert_array_equal(c.y_train, (d.y_train >= 5).astype(np.int64))
    with pytest.raises(ConfigError, match="unknown task 'colour'; allowed: digit, ge5, ink, parity"):
        load_federated(parse_config(_multi(data={"dataset": "digits", "tasks": ["colour"]})).data, 0)
    with pytest.raises(ConfigError, match="derived tasks need a 10-class image dataset"):
        load_federated(
            parse_config(
                {"data": {"dataset": "diabetes", "partition": {"kind": "iid"}, "tasks": ["digit"]}}
            ).data,
            0,
        )


def test_task_qualified_heads_never_mix():
    a = {"body.1.weight": np.ones(2, np.float32), "head.weight": np.ones((10, 2), np.float32)}
    b = {"body.1.weight": 3 * np.ones(2, np.float32), "head.weight": np.ones((2, 2), np.float32)}
    mean = keywise_mean([qualify(a, "digit", True), qualify(b, "parity", True)], [1.0, 1.0])
    np.testing.assert_allclose(mean["body.1.weight"], 2.0)
    assert mean[f"digit{SEP}head.weight"].shape == (10, 2)
    assert mean[f"parity{SEP}head.weight"].shape == (2, 2)
    assert set(for_task(mean, "parity", True)) == {"body.1.weight", "head.weight"}
    g = initial_global({"digit": a, "parity": b}, a)
    assert set(g) == {"body.1.weight", f"digit{SEP}head.weight", f"parity{SEP}head.weight"}


@pytest.mark.parametrize(
    "algo", ["fedavg", "local", "fedper", "fedrep", "ditto", "fedavg_ft", "hierarchical"]
)
def test_every_algorithm_trains_a_heterogeneous_task_federation(tmp_path, algo):
    res = fedmtl.run(_multi(algorithm={"name": algo}), out=tmp_path / algo)
    f = res.final
    # Every task's clients are evaluated with their own head and loss.
    assert f["task_parity_accuracy_mean"] > 0.6
    assert f["task_ge5_accuracy_mean"] > 0.6
    assert "task_ink_rmse_mean" in f and "task_digit_accuracy_mean" in f
    sent = sum(r["bytes_up"] for r in res.rounds)
    if algo == "local":
        assert sent == 0
    elif algo in ("fedper", "fedrep"):
        # Only the body travels: heads never leave the client.
        n_body = 64 * 32 + 32
        assert {r["bytes_up"] for r in res.rounds} == {12 * n_body * 4}


def test_personalised_methods_report_gain_against_their_shared_model(tmp_path):
    res = fedmtl.run(_multi(algorithm={"name": "ditto", "lam": 0.1}), out=tmp_path / "d")
    rows = [r for r in res.clients if r["kind"] == "client"]
    assert all("gain" in r and "shared_loss" in r for r in rows)
    for r in rows:
        if r["task"] != "ink":
            assert r["gain"] == pytest.approx(r["accuracy"] - r["shared_accuracy"])
    assert res.final["gain_mean"] == pytest.approx(np.mean([r["gain"] for r in rows]))
    assert 0.0 <= res.final["gain_negative_frac"] <= 1.0
    ft = fedmtl.run(_multi(algorithm={"name": "fedavg_ft", "finetune_steps": 20}), out=tmp_path / "ft")
    # Fine-tuning on a label-skewed client's own data helps that client on average.
    assert ft.final["gain_mean"] > 0


def test_new_clients_are_never_trained_and_gain_from_head_finetuning(tmp_path):
    cfg = digits_config(
        data__holdout_clients=3,
        data__partition={"kind": "dirichlet", "alpha": 0.3, "num_clients": 12},
        train__rounds=10,
        clients__per_round=9,
        eval__new_client_steps=30,
    )
    res = fedmtl.run(cfg, out=tmp_path / "n")
    data = load_federated(parse_config(cfg).data, 0)
    rows = fedmtl.experiment.records.RunDir(res.run_dir).read_metrics()
    trained = {r["client"] for r in rows if r["kind"] == "train"}
    assert trained.isdisjoint(data.holdout) and len(data.holdout) == 3
    new = [r for r in rows if r["kind"] == "new_client" and r["round"] == 10]
    assert sorted(r["client"] for r in new) == data.holdout
    assert res.final["new_after_accuracy_mean"] > res.final["new_before_accuracy_mean"]


def test_hierarchical_discovers_concept_shift_groups(tmp_path):
    # Two client populations with the same images and the same head shape: one learns the parity, the
    # other "digit >= 5". With cluster grouping the server is not told which client is which; it must
    # find the two populations from the cosine similarity of their updates. Whole-model updates of
    # two local epochs separate them for every seed tried (0-13); one epoch's head updates only
    # for about half of them.
    cfg = digits_config(
        data__tasks=["parity", "ge5"],
        data__partition={"kind": "iid", "num_clients": 10},
        model={"name": "mlp", "hidden": [32]},
        train__rounds=5,
        train__local_epochs=2,
        clients__per_round=10,
        algorithm={
            "name": "hierarchical",
            "grouping": "cluster",
            "cluster_on": "all",
            "split_rule": "absolute",
            "eps1": 1e9,
            "eps2": 0.0,
            "warmup_rounds": 3,
            "max_groups": 2,
        },
    )
    res = fedmtl.run(cfg, out=tmp_path / "c")
    assert all("group_of" in r and "groups" in r for r in res.rounds)
    before = res.rounds[1]["group_of"]
    assert len(set(before)) == 1  # one group until the split
    after = res.final["group_of"]
    parity, ge5 = set(after[0::2]), set(after[1::2])
    assert len(parity) == 1 and len(ge5) == 1 and parity != ge5


@pytest.mark.parametrize("dataset", ["landmine", "school"])
def test_natural_multitask_federations_train_personalised_heads(tmp_path, shared_data, dataset):
    # Land Mine: 29 binary tasks (mine fields, 6% positives); School: 139 regression tasks (schools).
    cfg = {
        "data": {"dataset": dataset, "partition": {"kind": "natural"}},
        "model": {"name": "mlp", "hidden": [16]},
        "algorithm": {"name": "fedper"},
        "train": {"rounds": 5, "optimizer": "adam", "lr": 0.01},
        "output": {"progress": False},
    }
    res = fedmtl.run(cfg, out=tmp_path / dataset)
    first, last = res.rounds[0], res.final
    assert res.summary["data"]["clients"] == {"landmine": 29, "school": 139}[dataset]
    assert last["loss_mean"] < 0.8 * first["loss_mean"]
    if dataset == "landmine":
        # Predicting "no mine" everywhere gives macro-F1 ~0.48: the heads must find some positives.
        assert last["f1_mean"] > first["f1_mean"] and last["f1_mean"] > 0.49
    else:
        assert last["rmse_mean"] < first["rmse_mean"] and last["r2_mean"] > 0.05


@pytest.mark.parametrize("weighting", ["samples", "groups"])
def test_hierarchical_body_is_the_sample_mean_or_the_mean_of_group_means(weighting):
    """Through ``server_step``: replacing either weighting by the plain mean of the bodies fails."""
    from fedmtl.algorithms.base import Message
    from fedmtl.experiment.run import build_algorithm
    from fedmtl.runtime.round import server_step

    raw = digits_config(
        data__partition__num_clients=4, data__tasks=["digit", "parity"], algorithm={"name": "hierarchical"}
    )
    raw["algorithm"]["body_weighting"] = weighting
    data, algo, _ = build_algorithm(parse_config(raw))
    server = algo.init_server()
    groups = server["group_of"]
    sizes = {0: 10.0, 1: 30.0, 2: 50.0, 3: 10.0}
    replies = {}
    for c in range(4):
        arrays = {k: np.full_like(v, float(c + 1)) for k, v in algo.broadcast(server, c).arrays.items()}
        replies[c] = Message(arrays=arrays, scalars={"num_examples": sizes[c]})
    new, _ = server_step(algo, server, replies, 1)
    body_key = next(k for k in new["params"] if SEP not in k and not k.startswith("head."))
    value = float(new["params"][body_key].ravel()[0])
    by_group: dict[str, list[int]] = {}
    for c in range(4):
        by_group.setdefault(groups[c], []).append(c)
    if weighting == "samples":
        want = sum((c + 1) * sizes[c] for c in range(4)) / sum(sizes.values())
    else:
        means = [sum((c + 1) * sizes[c] for c in m) / sum(sizes[c] for c in m) for m in by_group.values()]
        want = sum(means) / len(means)
    assert len(by_group) == 2 and value == pytest.approx(want, rel=1e-6)
    assert value != pytest.approx(2.5, rel=1e-3)  # the plain mean of 1, 2, 3, 4


def _concept_run(tmp_path, name, tasks, lr, epochs):
    cfg = digits_config(
        data__tasks=tasks,
        data__partition={"kind": "iid", "num_clients": 10},
        model={"name": "mlp", "hidden": [32]},
        train__rounds=6,
        train__local_epochs=epochs,
        train__lr=lr,
        clients__per_round=10,
        algorithm={"name": "hierarchical", "grouping": "cluster", "cluster_on": "all", "warmup_rounds": 3},
        data__normalize="scale",  # the measured update scales below are on [0, 1] pixels
    )
    return fedmtl.run(cfg, out=tmp_path / name).final["group_of"]


@pytest.mark.parametrize(
    "lr, epochs", [(0.05, 1), (0.05, 2), (0.2, 2)], ids=["lr0.05x1", "lr0.05x2", "lr0.2x2"]
)
def test_the_relative_split_rule_finds_concept_groups_whatever_the_update_scale(tmp_path, lr, epochs):
    """Default rule, no thresholds set: over an 8x range of lr x local work, two concepts on the same
    images (parity vs digit >= 5) split into exactly their two groups, and one concept never splits.
    (Measured: a mixed group's ||mean update|| / mean norm falls to 0.36-0.76 while its largest update
    stays >= 1.07x the first round's scale; a one-concept group stays at 0.86-0.95, or, where it
    falls at lr 0.2, its updates shrink below the first round's scale.)"""
    mixed = _concept_run(tmp_path, "mixed", ["parity", "ge5"], lr, epochs)
    assert len(set(mixed[0::2])) == 1 and len(set(mixed[1::2])) == 1 and set(mixed[0::2]) != set(mixed[1::2])
    same = _concept_run(tmp_path, "same", ["parity", "parity"], lr, epochs)
    assert len(set(same)) == 1


def test_both_halves_of_a_split_are_measured_afresh_before_they_may_split_again():
    """Relative rule, through ``server_step``: a group whose head updates cancel splits in two; the
    halves neither inherit the mixed parent's update scale nor split in the round they are first
    seen, even when their own updates cancel and pull harder than the parent's first round did
    (inheriting the scale split a pure group again in that round)."""
    from fedmtl.algorithms.base import Message
    from fedmtl.experiment.run import build_algorithm
    from fedmtl.runtime.round import server_step

    raw = digits_config(
        data__partition__num_clients=4,
        algorithm={"name": "hierarchical", "grouping": "cluster", "warmup_rounds": 0},
    )
    _, algo, _ = build_algorithm(parse_config(raw))
    server = algo.init_server()

    def step(server, signs, round):
        replies = {}
        for c, s in signs.items():
            sent = algo.broadcast(server, c).arrays
            got = {k: (v + s if k.startswith("head.") else v.copy()) for k, v in sent.items()}
            replies[c] = Message(arrays=got, scalars={"num_examples": 10.0})
        return server_step(algo, server, replies, round)[0]

    cancel = {0: 1.0, 1: 1.0, 2: -1.0, 3: -1.0}
    server = step(server, cancel, 1)  # first seen: its scale is taken, no split
    assert len(set(server["group_of"].values())) == 1
    server = step(server, cancel, 2)  # cancelling updates at the first round's scale: split
    halves = server["group_of"]
    assert halves[0] == halves[1] and halves[2] == halves[3] and halves[0] != halves[2]
    assert not set(halves.values()) & set(server["ref_norm"])  # measured afresh
    server = step(server, {0: 2.0, 1: -1.0, 2: 2.0, 3: -1.0}, 3)  # halves first seen: no split
    assert server["group_of"] == halves
    assert set(halves.values()) <= set(server["ref_norm"])
