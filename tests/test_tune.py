"""Validation rows carved from training data, the best round chosen on them, and ``fedmtl tune``."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fedmtl
from fedmtl.cli import main
from fedmtl.config import parse_config
from fedmtl.data import load_federated
from fedmtl.errors import ConfigError
from fedmtl.experiment.records import RunDir
from fedmtl.experiment.tune import beyond, edge_of, numeric_axes, parse_grid, split_values, tune
from tests.conftest import digits_config


def _rows_of(data):
    return {c.cid: (c.x_train, c.x_test) for c in data.clients}


def test_validation_rows_come_from_training_rows_never_from_test():
    plain = load_federated(parse_config(digits_config()).data, 0)
    carved = load_federated(parse_config(digits_config(data__val_fraction=0.2)).data, 0)
    for a, b in zip(plain.clients, carved.clients, strict=True):
        np.testing.assert_array_equal(a.x_test, b.x_test)  # the test split is untouched
        assert b.n_train + len(b.y_val) == a.n_train and len(b.y_val) == round(0.2 * a.n_train)
        train = {r.tobytes() for r in a.x_train}
        assert {r.tobytes() for r in b.x_val} <= train
        assert not {r.tobytes() for r in b.x_val} & {r.tobytes() for r in b.x_train}
    again = load_federated(parse_config(digits_config(data__val_fraction=0.2)).data, 0)
    np.testing.assert_array_equal(again.clients[1].x_val, carved.clients[1].x_val)  # seeded


def test_the_best_round_is_chosen_on_validation_and_rows_carry_val_metrics(tmp_path):
    res = fedmtl.run(digits_config(data__val_fraction=0.2, train__rounds=5), out=tmp_path / "r")
    rounds = [r for r in RunDir(res.run_dir).read_metrics() if r["kind"] == "round"]
    clients = [r for r in RunDir(res.run_dir).read_metrics() if r["kind"] == "client"]
    assert all("val_accuracy" in r and "accuracy" in r for r in clients)
    by_val = max(rounds, key=lambda r: r["val_accuracy_mean"])
    assert res.summary["best"]["round"] == by_val["round"] and res.summary["best_by"] == "validation"
    plain = fedmtl.run(digits_config(train__rounds=5), out=tmp_path / "p")
    assert plain.summary["best"]["round"] == 5 and plain.summary["best_by"] == "last evaluated round"


def test_validation_is_refused_where_clients_are_views_into_shared_arrays():
    raw = digits_config(data__val_fraction=0.1)
    raw["data"]["partition"] = {"kind": "resample", "num_clients": 50}
    with pytest.raises(
        ConfigError, match=r"data.val_fraction = 0.1: not available with partition.kind 'resample'"
    ):
        load_federated(parse_config(raw).data, 0)


def test_tune_chooses_on_validation_within_the_budget(tmp_path):
    base = ["train.rounds=3", "data.partition.num_clients=4", "train.local_steps=5"]
    rec = tune(None, ["train.lr=0.001,0.3,0.05", "train.batch_size=16,32"], 4, base, out=tmp_path / "t",
               log=lambda _: None)  # fmt: skip
    assert rec["points_in_grid"] == 6 and rec["trials_run"] == 4 and rec["budget"] == 4
    vals = [t["val"] for t in rec["trials"]]
    assert rec["chosen"] == rec["trials"][int(np.argmax(vals))]["params"]
    for t in rec["trials"]:  # each score is the validation mean at that run's val-chosen best round
        summary = RunDir.open(t["runs"][0]).read_summary()
        assert t["val"] == pytest.approx(summary["best"]["val_accuracy_mean"])
        assert RunDir.open(t["runs"][0]).read_config()["data"]["val_fraction"] == 0.1
    again = tune(None, ["train.lr=0.001,0.3,0.05", "train.batch_size=16,32"], 4, base, out=tmp_path / "t2",
                 log=lambda _: None)  # fmt: skip
    assert [t["params"] for t in again["trials"]] == [t["params"] for t in rec["trials"]]  # seeded sample
    assert json.loads((tmp_path / "t" / "tune.json").read_text())["chosen"] == rec["chosen"]
    assert "The test column is shown, never used." in (tmp_path / "t" / "tune.md").read_text()


def test_a_config_built_in_code_tunes_like_the_same_yaml_and_is_left_untouched(tmp_path):
    """Benchmarks pass the dict they build: same trials as the YAML path, the caller's dict unchanged."""
    import yaml

    cfg = {"train": {"rounds": 2, "local_steps": 3}, "data": {"partition": {"num_clients": 4}}}
    before = json.dumps(cfg, sort_keys=True)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    grid, quiet = ["train.lr=0.01,0.3"], (lambda _: None)
    from_dict = tune(cfg, grid, 2, out=tmp_path / "d", log=quiet)
    from_yaml = tune(tmp_path / "c.yaml", grid, 2, out=tmp_path / "y", log=quiet)
    assert json.dumps(cfg, sort_keys=True) == before
    assert from_dict["config"] is None and from_yaml["config"].endswith("c.yaml")
    assert [t["val"] for t in from_dict["trials"]] == [t["val"] for t in from_yaml["trials"]]
    assert from_dict["chosen"] == from_yaml["chosen"]


def test_grids_parse_lists_and_bad_grids_are_one_line(tmp_path, capsys):
    assert split_values("a,[1, 2],{x: 1, y: 2}") == ["a", "[1, 2]", "{x: 1, y: 2}"]
    assert parse_grid(["model.hidden=[32],[64, 64]"]) == {"model.hidden": ["[32]", "[64, 64]"]}
    assert main(["tune", "--grid", "train.lrr=0.1,0.2", "--budget", "2", "--out", str(tmp_path / "x")]) == 2
    assert "unknown key 'train.lrr'" in capsys.readouterr().err
    assert main(["tune", "--grid", "train.lr", "--budget", "2"]) == 2
    assert "--grid: expected key=v1,v2,..., got 'train.lr'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing written before every point is valid


def test_tune_picks_the_validation_best_where_it_is_not_the_test_best(tmp_path):
    """On this grid the two disagree (val best lr 0.5: 0.961 against 0.948 for 0.3 and 0.6; test
    best lr 0.4: 0.907 against 0.902 for 0.5): a tuner that looked at the test column fails here."""
    base = ["train.rounds=10", "data.partition.num_clients=4", "train.local_steps=5", "data.val_fraction=0.1"]
    base.append("data.normalize=scale")  # calibrated on digits scaled to [0, 1]
    rec = tune(None, ["train.lr=0.2,0.3,0.4,0.5,0.6"], 5, base, out=tmp_path / "t", log=lambda _: None)
    by_val = max(rec["trials"], key=lambda t: t["val"])
    by_test = max(rec["trials"], key=lambda t: t["test"])
    assert by_val["params"] != by_test["params"]  # the premise: the grid separates the two rules
    assert rec["chosen"] == by_val["params"] == {"train.lr": "0.5"}


def test_the_value_beyond_an_edge_is_geometric_and_keeps_integers_integers():
    assert beyond(["0.02", "0.05", "0.1"], "high") == "0.2"
    assert beyond(["0.02", "0.05", "0.1"], "low") == "0.008"
    assert beyond(["10", "30"], "high") == "90" and beyond(["10", "30"], "low") == "3"
    assert beyond(["0", "1"], "low") == "-1"  # not positive: one arithmetic step
    assert (
        edge_of(["0.02", "0.05", "0.1"], "0.1") == "high" and edge_of(["0.02", "0.05", "0.1"], "0.05") is None
    )
    assert numeric_axes({"train.lr": ["0.1", "0.2"], "algorithm.body_weighting": ["samples", "groups"]}) == [
        "train.lr"
    ]


def test_tune_flags_an_edge_choice_and_bracket_extends_it_until_interior(tmp_path):
    base = ["train.rounds=3", "data.partition.num_clients=4", "train.local_steps=5", "data.normalize=scale"]
    said: list[str] = []
    plain = tune(None, ["train.lr=0.01,0.02"], 6, base, out=tmp_path / "p", log=said.append)
    assert plain["chosen"] == {"train.lr": "0.02"} and plain["edge"] == {"train.lr": "high"}
    assert plain["trials_run"] == 2 and not plain["extended"]
    assert any("train.lr = 0.02 is the highest value tried" in line and "--bracket" in line for line in said)
    assert (
        "Edge choice: `train.lr` at the highest value tried (not bracketed)"
        in (tmp_path / "p" / "tune.md").read_text()
    )
    # the budget ends first: 0.04 still wins, so the choice stays at the (extended) edge
    short = tune(None, ["train.lr=0.01,0.02"], 3, base, out=tmp_path / "s", log=lambda _: None, bracket=True)
    assert [t["params"]["train.lr"] for t in short["trials"]] == ["0.01", "0.02", "0.04"]
    assert short["chosen"] == {"train.lr": "0.04"} and short["edge"] == {"train.lr": "high"}
    assert short["extended"] == {"train.lr": ["0.04"]} and short["trials"][2]["extension"]
    # interior: 0.4 tops the grid, 0.8 (geometric, x2) is tried and loses, so 0.4 is bracketed
    rec = tune(None, ["train.lr=0.2,0.4"], 5, base, out=tmp_path / "b", log=lambda _: None, bracket=True)
    assert [t["params"]["train.lr"] for t in rec["trials"]] == ["0.2", "0.4", "0.8"]
    assert rec["chosen"] == {"train.lr": "0.4"} and rec["edge"] == {}
    assert (
        "Interior choice on every numeric axis (`train.lr` extended to 0.8)."
        in (tmp_path / "b" / "tune.md").read_text()
    )
