"""Malicious clients: what each attack sends, the seeded attacker set, a measurable backdoor, and
robust aggregation holding up where the mean does not."""

from __future__ import annotations

import numpy as np
import pytest

import fedmtl
from fedmtl.algorithms.base import ClientWork, Message
from fedmtl.config import parse_config
from fedmtl.errors import ConfigError
from fedmtl.experiment.run import build
from fedmtl.features.attack import MaliciousClients, choose_malicious
from fedmtl.training.executors import run_local
from tests.conftest import digits_config

IID = {"kind": "iid", "num_clients": 10}


def _attacked(kind: str, **attack):
    cfg = parse_config(
        digits_config(data__partition=IID, attack={"enabled": True, "kind": kind, "clients": [0], **attack})
    )
    data, algo, _ = build(cfg)
    return data, algo


def _step(algo, data, cid: int = 0):
    server = algo.init_server()
    msg = algo.broadcast(server, cid)
    work = ClientWork(round=1, fraction=1.0, rng=np.random.default_rng(0), lr=0.1)
    _, reply = run_local(algo.client_step({}, data.clients[cid], msg, work))
    work = ClientWork(round=1, fraction=1.0, rng=np.random.default_rng(0), lr=0.1)
    _, honest = run_local(algo.inner.client_step({}, data.clients[cid], msg, work))
    return msg, reply, honest


@pytest.mark.parametrize("kind,factor", [("sign_flip", -1.0), ("scale", 4.0), ("sign_flip", -3.0)])
def test_model_poisoning_sends_a_scaled_or_flipped_update(kind, factor):
    data, algo = _attacked(kind, scale=abs(factor) if factor != -1.0 else None)
    assert isinstance(algo, MaliciousClients)
    msg, reply, honest = _step(algo, data)
    for k, sent in msg.arrays.items():
        np.testing.assert_allclose(
            reply.arrays[k] - sent, factor * (honest.arrays[k] - sent), rtol=1e-4, atol=1e-6
        )


def test_scale_defaults_to_model_replacement_and_gaussian_sends_noise():
    data, algo = _attacked("scale")
    assert algo.scale == 4.0  # clients.per_round: the mean of 4 lands on the attacker's model
    data, algo = _attacked("gaussian", noise_std=0.5)
    msg, reply, _ = _step(algo, data)
    u = np.concatenate([(reply.arrays[k] - v).ravel() for k, v in msg.arrays.items()])
    assert u.std() == pytest.approx(0.5, rel=0.05)
    _, _, honest = _step(algo, data, cid=1)  # an honest client is untouched
    _, reply1, _ = _step(algo, data, cid=1)
    assert all(np.array_equal(reply1.arrays[k], honest.arrays[k]) for k in honest.arrays)


def test_label_flip_and_backdoor_poison_only_the_attackers_training_split():
    data, algo = _attacked("label_flip")
    c = data.clients[0]
    flipped = algo.poisoned(c)
    assert np.array_equal(flipped.y_train, 9 - c.y_train) and np.array_equal(flipped.x_train, c.x_train)
    data, algo = _attacked("backdoor", target=7, poison_rate=0.5, trigger_size=2, trigger_value=5.0)
    c = data.clients[0]
    p = algo.poisoned(c)
    changed = np.flatnonzero((p.x_train != c.x_train).reshape(len(c.y_train), -1).any(axis=1))
    assert len(changed) == round(0.5 * len(c.y_train))
    assert (p.y_train[changed] == 7).all() and (p.x_train[changed][..., -2:, -2:] == 5.0).all()
    assert np.array_equal(c.y_train, data.clients[0].y_train)  # the federation's data is untouched


def test_attackers_are_a_seeded_fraction_of_the_training_clients():
    cfg = parse_config(digits_config(data__partition=IID, attack={"enabled": True, "fraction": 0.3}))
    a = choose_malicious(cfg.attack, list(range(10)), seed=0)
    assert len(a) == 3 and a == choose_malicious(cfg.attack, list(range(10)), seed=0)
    assert a != choose_malicious(cfg.attack, list(range(10)), seed=1)
    with pytest.raises(ConfigError, match=r"config: attack.clients = \[42\]: clients \[42\] do not exist"):
        build(parse_config(digits_config(attack={"enabled": True, "clients": [42]})))
    with pytest.raises(ConfigError, match="config: attack.target = 12: the task has 10 classes"):
        build(parse_config(digits_config(attack={"enabled": True, "kind": "backdoor", "target": 12})))


def _run(tmp_path, name, **over):
    base = {"data__partition": IID, "train__rounds": 8, "clients__per_round": 8}
    return fedmtl.run(digits_config(**{**base, **over}), out=tmp_path / name)


def test_backdoor_success_is_measured_on_triggered_test_inputs(tmp_path):
    attack = {"enabled": True, "kind": "backdoor", "target": 0, "trigger_size": 4, "trigger_value": 4.0}
    clean = _run(tmp_path, "clean", attack={**attack, "fraction": 0.0})
    hit = _run(tmp_path, "hit", attack={**attack, "fraction": 0.3})
    assert clean.final["malicious"] == 0 and hit.final["malicious"] == 3
    assert clean.final["backdoor_asr"] < 0.2 < 0.8 < hit.final["backdoor_asr"]


def test_median_and_krum_hold_up_against_sign_flipping_where_the_mean_does_not(tmp_path):
    attack = {"enabled": True, "kind": "sign_flip", "fraction": 0.3, "scale": 3.0}
    clean = _run(tmp_path, "clean")
    mean = _run(tmp_path, "mean", attack=attack)
    median = _run(tmp_path, "median", attack=attack, aggregation=["median"])
    krum = _run(tmp_path, "krum", attack=attack, aggregation=[{"name": "multi_krum", "f": 3}])
    acc = {
        k: r.final["global_accuracy"]
        for k, r in [("clean", clean), ("mean", mean), ("median", median), ("krum", krum)]
    }
    assert acc["mean"] < 0.3, acc
    assert acc["median"] > acc["mean"] + 0.2 and acc["krum"] > acc["clean"] - 0.1, acc


@pytest.mark.parametrize("kind", ["backdoor", "scale"])
def test_batched_execution_gives_the_attacked_run_sequential_execution_gives(tmp_path, kind):
    attack = {"enabled": True, "kind": kind, "fraction": 0.3}
    seq = _run(tmp_path, "seq", attack=attack, train__rounds=3, runtime__execution="sequential")
    bat = _run(tmp_path, "bat", attack=attack, train__rounds=3, runtime__execution="batched")
    assert bat.rounds[-1]["execution"] == "batched"
    assert bat.final["global_loss"] == pytest.approx(seq.final["global_loss"], rel=1e-4)


def test_an_attacked_flower_run_equals_the_simulator(tmp_path, flower):
    raw = flower._cfg(
        data__partition__num_clients=4,
        clients__per_round=3,
        train__rounds=2,
        attack={"enabled": True, "kind": "sign_flip", "clients": [1]},
        aggregation=[{"name": "clip", "max_norm": 2.0}, "median"],
    )
    expected = fedmtl.run(raw, out=tmp_path / "inproc")
    got = flower._flower_run(tmp_path, raw, flower.LoopbackGrid(flower._nodes(4)))
    flower.assert_same_metrics(expected.run_dir, got.run_dir)


def test_a_message_with_only_scalars_passes_through_untouched():
    data, algo = _attacked("sign_flip")
    reply = Message(arrays={"extra": np.ones(2, np.float32)}, scalars={"num_examples": 3})
    out = algo.tamper(reply, Message(), 1, 0)
    assert np.array_equal(out.arrays["extra"], reply.arrays["extra"])
