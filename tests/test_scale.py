"""Federations whose cost follows the clients a round touches: resampled populations, the
memory-mapped client store, and client states kept on disk behind a bounded cache with
checkpoints that write only what changed."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml

import fedmtl
from fedmtl.data import DataConfig, load_federated
from fedmtl.data.clients import ClientList
from fedmtl.data.store import open_store, write_store
from fedmtl.errors import ConfigError, DataError
from fedmtl.experiment.records import RunDir
from fedmtl.runtime.client_states import ClientStates, read_states
from tests.conftest import digits_config

POP = {"dataset": "digits", "partition": {"kind": "resample", "num_clients": 3000, "samples": [20, 50]}}


def _stable(rows):
    return [{k: v for k, v in r.items() if k not in ("wall_time", "compute_wall")} for r in rows]


# ------------------------------------------------------------------------------------ resample
def test_a_resampled_population_is_index_ranges_into_one_pool():
    data = load_federated(DataConfig.model_validate(POP), seed=0)
    assert isinstance(data.clients, ClientList) and data.num_clients == 3000
    total = data.train_sizes() + data.test_sizes()
    assert total.min() >= 20 and total.max() <= 50 and 30 < total.mean() < 40
    assert data.test_sizes().min() >= 1
    pool, train, test = data.clients.train.x, data.clients.train, data.clients.test

    def rows(split, cid):
        return split.index[split.offsets[cid] : split.offsets[cid + 1]]

    for cid in (0, 1, 1234, 2999):
        drawn = np.concatenate([rows(train, cid), rows(test, cid)])
        assert len(np.unique(drawn)) == len(drawn)  # no sample twice in a client: none of its test in train
        assert np.array_equal(data.clients[cid].x_train, pool[rows(train, cid)])
    assert data.clients[7] is data.clients[7]  # the same object within a round
    again = load_federated(DataConfig.model_validate(POP), seed=0)
    assert np.array_equal(again.clients[123].x_test, data.clients[123].x_test)  # seeded
    other = load_federated(DataConfig.model_validate(POP), seed=1)
    assert not np.array_equal(other.clients.train.index, data.clients.train.index)


def test_resampled_clients_have_dirichlet_label_skew():
    skewed = load_federated(
        DataConfig.model_validate({**POP, "partition": {**POP["partition"], "alpha": 0.1}}), 0
    )
    mixed = load_federated(
        DataConfig.model_validate({**POP, "partition": {**POP["partition"], "alpha": 100}}), 0
    )

    def distinct(data):
        return np.mean([len(np.unique(data.clients[c].y_train)) for c in range(200)])

    assert distinct(skewed) < 4 < 8 < distinct(mixed)


def test_resample_refuses_what_rewrites_every_client():
    with pytest.raises(ConfigError) as exc:
        load_federated(DataConfig.model_validate({**POP, "corrupt": {"enabled": True, "label_flip": 0.2}}), 0)
    assert str(exc.value) == (
        "config: data.partition.kind = 'resample': its clients are views into one pool, and corrupt.enabled "
        "rewrites every client's data; use another partition kind"
    )


# ------------------------------------------------------------------------------------ store
def test_a_packed_store_runs_exactly_like_the_federation_it_was_packed_from(tmp_path):
    raw = digits_config(data={"dataset": "digits", "partition": {"kind": "dirichlet", "num_clients": 8}})
    direct = fedmtl.run(raw, out=tmp_path / "direct")
    data = load_federated(DataConfig.model_validate(raw["data"]), seed=0)
    write_store(data, tmp_path / "store")
    stored = open_store(tmp_path / "store")
    assert isinstance(stored.clients.train.x, np.memmap)
    for a, b in zip(data.clients, stored.clients, strict=True):
        assert (
            a.name == b.name and np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_test, b.y_test)
        )
    packed = fedmtl.run(
        {**raw, "data": {"dataset": "store", "file": str(tmp_path / "store")}}, out=tmp_path / "p"
    )
    assert _stable(RunDir(packed.run_dir).read_metrics()) == _stable(RunDir(direct.run_dir).read_metrics())
    ran = yaml.safe_load((packed.run_dir / "config.yaml").read_text())
    assert ran["data"]["normalize"] == "none"  # scaled when packed; meta.json says how
    assert packed.summary["data"]["clients"] == 8


def test_fedmtl_pack_writes_a_store_the_cli_runs(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": POP}))
    out = subprocess.run(
        [sys.executable, "-m", "fedmtl.cli", "pack", str(cfg), str(tmp_path / "s")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("packed 3000 clients (")
    meta = yaml.safe_load((tmp_path / "s" / "meta.json").read_text())
    assert meta["provenance"]["data"]["partition"]["kind"] == "resample"
    again = subprocess.run(
        [sys.executable, "-m", "fedmtl.cli", "pack", str(cfg), str(tmp_path / "s")],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 2
    store = tmp_path / "s"
    assert (
        again.stderr
        == f"fedmtl: error: client store {store}: already exists and is not empty; choose another path\n"
    )


def test_store_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as exc:
        load_federated(DataConfig(dataset="store", file=str(tmp_path / "empty")), 0)
    assert str(exc.value) == f"client store {tmp_path / 'empty'}: no meta.json (write one with 'fedmtl pack')"
    data = load_federated(DataConfig.model_validate(POP), 0)
    write_store(data, tmp_path / "s")
    with pytest.raises(ConfigError) as exc:
        load_federated(DataConfig(dataset="store", file=str(tmp_path / "s"), normalize="standardize"), 0)
    assert "a client store is normalised when packed" in str(exc.value)
    (tmp_path / "s" / "train_x.npy").write_bytes(b"junk")
    with pytest.raises(DataError, match="train_x.npy: not a readable .npy array"):
        load_federated(DataConfig(dataset="store", file=str(tmp_path / "s")), 0)


# ------------------------------------------------------------------------------------ states
def _state(i: int, size: int = 1000) -> dict:
    return {"w": np.full(size, float(i), dtype=np.float32), "k": i}


def test_client_states_keep_a_bounded_cache_and_spill_what_changed(tmp_path):
    states = ClientStates(tmp_path / "c", cache_bytes=20_000)
    for i in range(50):
        states[i] = _state(i)
    assert states.cached <= 5 and len(states) == 50
    assert len(list((tmp_path / "c" / "spill").iterdir())) >= 45  # changed, evicted, not yet committed
    assert all(states[i]["k"] == i and states[i]["w"][0] == i for i in range(50))
    segments = states.commit()
    assert segments == ["seg-000000"] and not (tmp_path / "c" / "spill").exists()
    first = states.last_commit_bytes
    states[3] = _state(33)
    assert states.commit() == ["seg-000000", "seg-000001"]
    assert states.last_commit_bytes < first / 20  # one client changed: one client written
    assert states.commit() == ["seg-000000", "seg-000001"] and states.last_commit_bytes == 0
    reopened = ClientStates(tmp_path / "c", 20_000, ["seg-000000", "seg-000001"])
    assert reopened[3]["k"] == 33 and reopened[4]["k"] == 4 and len(reopened) == 50


def test_an_uncommitted_segment_is_dropped_on_open(tmp_path):
    states = ClientStates(tmp_path / "c", 10**9)
    states[0] = _state(0)
    committed = states.commit()
    states[0] = _state(1)
    states.commit()  # the run dies before a checkpoint names this segment
    reopened = ClientStates(tmp_path / "c", 10**9, committed)
    assert reopened[0]["k"] == 0
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["seg-000000.bin", "seg-000000.idx.npy"]


def test_compaction_rewrites_live_states_once_superseded_ones_dominate(tmp_path, monkeypatch):
    import fedmtl.runtime.client_states as cs

    monkeypatch.setattr(cs, "MIN_COMPACT_BYTES", 0)
    states = ClientStates(tmp_path / "c", 10**9)
    for i in range(10):
        states[i] = _state(i)
    states.commit()
    for _ in range(5):  # the fifth commit finds 4 superseded copies of every state: 4 > 3 x live
        for i in range(10):
            states[i] = _state(i)
        names = states.commit()
        states.committed(names)
    assert len(names) == 1  # compacted into one segment holding every live state
    assert {int(p.name[4:10]) for p in (tmp_path / "c").glob("seg-*.bin")} == {int(names[0][4:])}
    assert [states[i]["k"] for i in range(10)] == list(range(10))


@pytest.mark.parametrize("algorithm", ["ditto", "fedrep"])
def test_a_tiny_state_cache_spills_and_resumes_to_the_same_numbers(tmp_path, algorithm):
    def cfg(rounds, cache):
        return digits_config(
            algorithm={"name": algorithm},
            train__rounds=rounds,
            runtime={"state_cache_mib": cache},
            output={"progress": False, "checkpoint_every": 2},
        )

    roomy = fedmtl.run(cfg(4, 1024), out=tmp_path / "roomy")
    tiny = fedmtl.run(cfg(4, 0.02), out=tmp_path / "tiny")  # ~1 personal model fits
    assert _stable(RunDir(tiny.run_dir).read_metrics()) == _stable(RunDir(roomy.run_dir).read_metrics())
    ckpt = RunDir(tiny.run_dir).load_checkpoint()
    assert ckpt["clients"]["format"] == "segments"  # states live beside the checkpoint, not in it
    assert len((tiny.run_dir / "checkpoint.tree").read_bytes()) < 20_000
    states = read_states(tiny.run_dir)
    assert set(states) == set(read_states(roomy.run_dir)) and len(states) >= 4
    half = fedmtl.run(cfg(2, 0.02), out=tmp_path / "half")
    half_cfg = yaml.safe_load((half.run_dir / "config.yaml").read_text())
    half_cfg["train"]["rounds"] = 4
    (half.run_dir / "config.yaml").write_text(yaml.safe_dump(half_cfg))
    (half.run_dir / "summary.json").unlink()
    resumed = fedmtl.resume(half.run_dir)
    assert _stable(RunDir(resumed.run_dir).read_metrics()) == _stable(RunDir(roomy.run_dir).read_metrics())


def test_a_checkpoint_writes_only_the_clients_a_round_touched(tmp_path):
    raw = digits_config(
        data=POP,
        algorithm={"name": "ditto"},
        model={"name": "mlp", "hidden": [16]},
        clients={"per_round": 20},
        train={"rounds": 3, "local_steps": 2, "batch_size": 16, "lr": 0.1},
        eval={"every": 3},
    )
    res = fedmtl.run(raw, out=tmp_path / "r")
    sizes = sorted(p.stat().st_size for p in (res.run_dir / "clients").glob("seg-*.bin"))
    assert len(sizes) == 3  # one segment per checkpoint, each ~20 clients' personal models
    per_client = sizes[-1] / 20
    assert max(sizes) < 25 * per_client and per_client < 10_000


# ------------------------------------------------------------------------------------ evaluation
def test_eval_clients_evaluates_a_seeded_sample_and_reports_its_interval(tmp_path):
    res = fedmtl.run(digits_config(eval={"clients": 3}, train__rounds=3), out=tmp_path / "r")
    rows = RunDir(res.run_dir).read_metrics()
    per_round = {
        r: [x["client"] for x in rows if x["kind"] == "client" and x["round"] == r] for r in (1, 2, 3)
    }
    assert all(len(c) == 3 for c in per_round.values()) and per_round[1] != per_round[2]
    final = res.final
    assert final["eval_clients"] == 3 and final["eval_population"] == 8
    assert final["accuracy_ci95"] > 0 and "eval_missing_clients" not in final
    again = fedmtl.run(digits_config(eval={"clients": 0.5}, train__rounds=3), out=tmp_path / "s")
    assert again.final["eval_clients"] == 4


def test_the_sampled_interval_covers_the_all_client_mean(tmp_path):
    raw = digits_config(
        data=POP,
        model={"name": "mlp", "hidden": [16]},
        clients={"per_round": 50},
        train={"rounds": 12, "local_steps": 3, "batch_size": 16, "lr": 0.1},
        eval={"global_test": False},
    )
    full = fedmtl.run(raw, out=tmp_path / "all")
    sampled = fedmtl.run({**raw, "eval": {"clients": 200, "global_test": False}}, out=tmp_path / "some")
    covered = [
        abs(s["accuracy_mean"] - f["accuracy_mean"]) <= s["accuracy_ci95"]
        for f, s in zip(full.rounds, sampled.rounds, strict=True)
    ]
    assert sum(covered) >= 10, covered  # a 95% interval: 11.4 of 12 expected
    assert [r["train_loss"] for r in full.rounds] == [r["train_loss"] for r in sampled.rounds]


def test_eval_clients_on_flower_equals_the_simulator(tmp_path, flower):
    raw = flower._cfg(
        data__partition__num_clients=4, clients__per_round=2, train__rounds=2, eval={"clients": 2}
    )
    expected = fedmtl.run(raw, out=tmp_path / "inproc")
    got = flower._flower_run(tmp_path, raw, flower.LoopbackGrid(flower._nodes(4)))
    flower.assert_same_metrics(expected.run_dir, got.run_dir)
    assert got.final["eval_clients"] == 2


# ------------------------------------------------------------------------------------ device
@pytest.mark.parametrize("execution", ["sequential", "batched"])
def test_runtime_device_cpu_is_the_default_computation(tmp_path, execution):
    base = digits_config(algorithm={"name": "ditto"}, runtime={"execution": execution})
    default = fedmtl.run(base, out=tmp_path / "a")
    explicit = fedmtl.run({**base, "runtime": {"execution": execution, "device": "cpu"}}, out=tmp_path / "b")
    assert _stable(RunDir(explicit.run_dir).read_metrics()) == _stable(RunDir(default.run_dir).read_metrics())


def test_a_cuda_request_without_cuda_is_a_config_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError) as exc:
        fedmtl.run(digits_config(runtime={"device": "cuda"}), out=tmp_path / "r")
    assert str(exc.value) == (
        "config: runtime.device = 'cuda': this machine has no CUDA device that torch can use "
        "(torch.cuda.is_available() is False); use 'cpu' or 'auto'"
    )
    assert not (tmp_path / "r").exists()
    auto = fedmtl.run(digits_config(runtime={"device": "auto"}, train__rounds=1), out=tmp_path / "auto")
    assert auto.summary["rounds_completed"] == 1  # auto falls back to the CPU
    with pytest.raises(ConfigError, match="runtime.device = 'gpu'"):
        fedmtl.run(digits_config(runtime={"device": "gpu"}), out=tmp_path / "g")
