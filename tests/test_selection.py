"""Sample selection: detectors, score vectors, the floor, detection quality on real (noisy) data,
and equality of the in-process and Flower runs with selection on."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

import fedmtl
from fedmtl.algorithms import ClientWork, Message
from fedmtl.config import parse_config
from fedmtl.errors import ConfigError
from fedmtl.experiment.run import build
from fedmtl.features.selection import DET, SCORES, TAU, SampleSelection
from fedmtl.runtime.client_states import read_states
from fedmtl.selection import decision, fit_iforest, fit_ocsvm
from fedmtl.selection.detectors import _standardise
from fedmtl.selection.scores import forward_parts, near_duplicates
from fedmtl.training import local_train
from fedmtl.training.batched import batched_local_train
from fedmtl.training.executors import run_local
from fedmtl.training.local import LocalSpec
from fedmtl.training.optim import OptimizerSpec
from fedmtl.training.tensors import to_torch
from tests.conftest import copy_checkpoint, digits_config


def _cfg(selection: dict[str, Any] | None = None, corrupt: dict[str, Any] | None = None, **over: Any) -> dict:
    """6 digits clients with 40% open-set noise, an autoencoder, selection from round 6."""
    base: dict[str, Any] = {
        "data__partition__num_clients": 6,
        "model": {"name": "autoencoder", "hidden": [64], "code": 16, "w_ce": 1.0},
        "train__rounds": 12,
        "train__local_epochs": 2,
        "clients__per_round": 4,
    }
    raw = digits_config(**{**base, **over})
    raw["data"]["corrupt"] = {"enabled": True, "open_set": 0.4} if corrupt is None else corrupt
    raw["selection"] = {"enabled": True, "start_round": 6, "refit_every": 3, **(selection or {})}
    return raw


def _detection(rounds: list[dict[str, Any]]) -> tuple[float, float, float]:
    """Pooled precision, recall and kept fraction over the rounds where selection acted."""
    acted = [
        r
        for r in rounds
        if r.get("selection_kept", r.get("selection_samples", 0)) < r.get("selection_samples", 0)
    ]
    tp = sum(r["selection_true_drops"] for r in acted)
    dropped = sum(r["selection_samples"] - r["selection_kept"] for r in acted)
    bad = sum(r["selection_bad"] for r in acted)
    kept = sum(r["selection_kept"] for r in acted) / max(1, sum(r["selection_samples"] for r in acted))
    return tp / max(dropped, 1), tp / max(bad, 1), kept


# ------------------------------------------------------------------------------------ detectors
@pytest.mark.parametrize("kind", ["ocsvm", "iforest"])
def test_shipped_detector_equals_sklearn_decision_function(kind):
    from sklearn.datasets import load_digits
    from sklearn.ensemble import IsolationForest
    from sklearn.svm import OneClassSVM

    x = load_digits().data[:400, 20:26]  # real features, varied scales
    z = _standardise(x)[0]
    if kind == "ocsvm":
        det, ref = fit_ocsvm(x, 0.3), OneClassSVM(nu=0.3).fit(z)
    else:
        det = fit_iforest(x, 0.3, None, seed=5)
        ref = IsolationForest(n_estimators=20, contamination=0.3, max_features=1.0, random_state=5).fit(z)
    assert len(det) and all(isinstance(v, np.ndarray) for v in det.values())  # travels in a Message
    np.testing.assert_allclose(decision(det, x), ref.decision_function(z), atol=1e-9)
    assert np.array_equal(decision(det, x) < 0, ref.predict(z) == -1)


def test_near_duplicates_flags_later_copies_only():
    from sklearn.datasets import load_digits

    x = load_digits().data[:200].astype(np.float32)
    codes = np.concatenate([x, x[[3, 50, 50]]])
    dup = near_duplicates(codes, 0.01)
    assert np.flatnonzero(dup).tolist() == [200, 201, 202]


# ------------------------------------------------------------------------------------ model
def test_autoencoder_trains_on_weighted_ce_plus_reconstruction_and_predicts_plain_logits():
    raw = _cfg(model={"name": "autoencoder", "hidden": [32], "code": 8, "w_ce": 0.05, "w_re": 1.0})
    data, algo, _ = build(parse_config(raw))
    model, c = algo.ctx.model, data.clients[0]
    x, y = torch.as_tensor(c.x_train[:20]), torch.as_tensor(c.y_train[:20])
    out = model(x)
    code, logits, err = model(x, parts=True)
    assert out.shape == (20, 11) and code.shape == (20, 8)
    per_sample = torch.nn.functional.cross_entropy(out, y, reduction="none")
    expected = torch.nn.functional.cross_entropy(logits, y, reduction="none") + (1.0 / 0.05) * err
    torch.testing.assert_close(per_sample, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert model(x).shape == (20, 10)  # evaluation sees an ordinary classifier
    # batched local training gives what sequential training gives (float tolerance)
    spec = LocalSpec(optimizer=OptimizerSpec(lr=0.1), batch_size=8, steps=4)
    start = to_torch(algo.ctx.init_arrays)
    seq, _, _ = local_train(model, start, c.x_train, c.y_train, c.task, spec, 4, np.random.default_rng(0))
    bat = batched_local_train(
        model, [start], [c.x_train], [c.y_train], c.task, spec, [4], [np.random.default_rng(0)]
    )
    for k, v in seq.items():
        torch.testing.assert_close(bat.params(0)[k], v, rtol=1e-4, atol=1e-5)
    assert not torch.equal(seq["decoder.0.weight"], start["decoder.0.weight"])  # the decoder learns


# ------------------------------------------------------------------------------------ protocol
def _client_step(raw: dict, round: int, msg_extra: Message | None = None, cid: int = 0):
    data, algo, _ = build(parse_config(raw))
    assert isinstance(algo, SampleSelection)
    server = algo.init_server()
    msg = algo.broadcast(server, cid)
    if msg_extra is not None:
        msg = Message({**msg.arrays, **msg_extra.arrays}, {**msg.scalars, **msg_extra.scalars})
    work = ClientWork(round=round, fraction=1.0, rng=np.random.default_rng(0), lr=0.1)
    state, reply = run_local(algo.client_step(algo.init_client(cid), data.clients[cid], msg, work))
    return data, algo, state, reply


def test_score_vectors_leaving_a_client_have_the_stated_size():
    raw = _cfg({"features": ["ce", "recon", "centre"]})
    data, algo, _, reply = _client_step(raw, round=6)  # a refit round: scores go to the server
    n = data.clients[0].n_train
    model_keys = set(algo.ctx.init_arrays)
    assert set(reply.arrays) == model_keys | {SCORES}
    assert reply.arrays[SCORES].shape == (n, 3) and reply.arrays[SCORES].dtype == np.float32
    assert reply.nbytes - sum(v.nbytes for v in algo.ctx.init_arrays.values()) == n * 3 * 4
    _, _, _, reply = _client_step(raw, round=7)  # not a refit round: nothing but the model
    assert set(reply.arrays) == model_keys
    _, _, _, reply = _client_step(raw, round=5)  # before start_round: untouched reply
    assert set(reply.arrays) == model_keys and not any(k.startswith("sel.") for k in reply.scalars)
    _, _, state, reply = _client_step(_cfg({"mode": "local"}), round=6)  # local: nothing extra leaves
    assert set(reply.arrays) == model_keys and set(state["_selection"]["det"])  # detector kept locally


def test_floor_keeps_the_most_inlying_samples_and_is_reported(tmp_path):
    raw = _cfg({"min_keep": 0.3, "features": ["ce"]})
    data, algo, _ = build(parse_config(raw))
    c = data.clients[0]
    # a detector that flags every sample: an OCSVM fitted far away from this client's scores
    det = fit_ocsvm(np.random.default_rng(0).normal(100.0, 1.0, size=(50, 1)), 0.1)
    extra = Message(arrays={DET + k: v for k, v in det.items()})
    _, _, _, reply = _client_step(raw, round=8, msg_extra=extra)
    need = math.ceil(0.3 * c.n_train)
    assert reply.scalars["sel.floor"] == 1 and reply.scalars["sel.kept"] == need
    assert reply.scalars["num_examples"] == need  # FedAvg weights by what was trained on
    # the floor restores the samples the detector finds least anomalous
    parts = forward_parts(algo.ctx.model, algo.ctx.init_arrays, c.x_train, c.y_train)
    closest = np.argsort(-decision(det, parts.ce[:, None]), kind="stable")[:need]
    assert reply.scalars["sel.tp"] == int(c.corruption.bad.sum() - c.corruption.bad[closest].sum())
    # in a run, every client is floored and listed in the round row
    res = fedmtl.run(
        _cfg({"method": "ocsvm", "nu": 0.95, "min_keep": 0.5}, train__rounds=8), out=tmp_path / "r"
    )
    acted = [r for r in res.rounds if r["round"] > 6]
    assert all(r["selection_floor_clients"] for r in acted)
    assert all(r["selection_kept"] >= 0.5 * r["selection_samples"] for r in acted)


def test_threshold_controller_keeps_low_losses_and_reports_its_statistics():
    raw = _cfg({"method": "threshold", "keep_prob": 0.0, "features": ["ce"]})
    data, algo, _, reply = _client_step(raw, round=6)  # no threshold yet: all kept, stats reported
    n = data.clients[0].n_train
    assert reply.scalars["sel.kept"] == n == reply.scalars["sel.u_count"]
    tau = (reply.scalars["sel.u_min"] + reply.scalars["sel.u_max"]) / 2
    _, _, _, reply = _client_step(raw, round=7, msg_extra=Message(scalars={TAU: tau}))
    assert 0 < reply.scalars["sel.kept"] < n and reply.scalars["sel.u_max"] < tau
    server = {"_selection": {"r": 0.0, "tau": None, "hist": [], "det": {}}}
    sel = dict(server["_selection"])
    for loss in [5, 5, 5, 4, 4, 4]:  # window 3: the mean loss fell, so r goes up one step
        algo.cfg = algo.cfg.model_copy(update={"window": 3})
        algo._update_threshold(
            sel,
            {0: Message(scalars={"sel.u_min": 1.0, "sel.u_max": 3.0, "sel.u_sum": loss, "sel.u_count": 1})},
        )
    assert sel["r"] == pytest.approx(0.1) and sel["tau"] == pytest.approx(1.0 + 0.1 * 2.0)


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize(
    ("selection", "corrupt", "min_precision"),
    [
        ({"method": "iforest", "one_sided": True}, {"enabled": True, "open_set": 0.4}, 0.7),
        (
            {"method": "ocsvm", "mode": "local", "features": ["ce"], "one_sided": True},
            {"enabled": True, "label_flip": 0.4},
            0.75,
        ),
        ({"method": "none", "dedup": True}, {"enabled": True, "duplicate": 0.3}, 0.95),
    ],
    ids=["iforest-global-openset", "ocsvm-local-labelflip", "dedup"],
)
def test_detection_beats_chance_by_a_wide_margin_on_noisy_digits(tmp_path, selection, corrupt, min_precision):
    res = fedmtl.run(_cfg(selection, corrupt), out=tmp_path / "run")
    precision, recall, kept = _detection(res.rounds)
    chance = 0.4 if "duplicate" not in corrupt else 0.3 / 1.3
    assert precision >= min_precision > chance + 0.25, (precision, recall, kept)
    assert recall >= 0.4 and 0.1 < kept < 1.0
    assert np.isfinite(res.final["global_accuracy"])


def test_selection_usable_with_personalised_algorithms_and_plain_models(tmp_path):
    raw = _cfg({"method": "iforest", "features": ["ce", "centre"]}, model={"name": "mlp", "hidden": [32]})
    raw["algorithm"] = {"name": "fedper"}
    res = fedmtl.run(raw, out=tmp_path / "run")
    assert res.rounds[-1]["selection_kept_fraction"] < 1.0 and np.isfinite(res.final["accuracy_mean"])


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("over", "message"),
    [
        (
            {"selection": {"method": "svm"}},
            "config: selection.method = 'svm': input should be 'ocsvm', 'iforest',",
        ),
        ({"selection": {"nu": 0}}, "config: selection.nu = 0: input should be greater than 0"),
        (
            {"selection": {"contamination": 0.7}},
            "config: selection.contamination = 0.7: input should be less than",
        ),
        ({"selection": {"features": []}}, "config: selection.features = []: needs at least one of"),
        (
            {"selection": {"features": ["ce", "loss"]}},
            "config: selection.features.1 = 'loss': input should be",
        ),
        (
            {"selection": {"start": 3}},
            "config: unknown key 'selection.start'; allowed keys: contamination, dedup",
        ),
    ],
)
def test_bad_selection_config_is_one_line(over, message):
    with pytest.raises(ConfigError) as exc:
        parse_config(over)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_recon_feature_needs_the_autoencoder():
    raw = _cfg({"features": ["ce", "recon"]}, model={"name": "mlp", "hidden": [16]})
    with pytest.raises(
        ConfigError, match=r"'recon' needs model.name = 'autoencoder' \(model 'mlp' has no decoder\)"
    ):
        build(parse_config(raw))
    raw = _cfg({"mode": "global"})
    raw["secagg"] = {"enabled": True}
    with pytest.raises(
        ConfigError, match="score vectors cannot pass secure aggregation; use selection.mode = 'local'"
    ):
        build(parse_config(raw))


# ------------------------------------------------------------------------------------ flower
def test_flower_run_equals_in_process_run_with_selection(tmp_path):
    pytest.importorskip("flwr", reason="Flower is not installed")
    from flwr.supercore.task_identity import TaskIdentity

    from fedmtl.flower.server import FlowerServer
    from tests.test_flower import LoopbackGrid, _fast, _nodes, assert_same_metrics

    raw = _cfg({"method": "iforest"}, train__rounds=8, train__local_steps=5, data__partition__num_clients=4)
    expected = fedmtl.run(raw, out=tmp_path / "inproc")
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    try:
        got = FlowerServer(LoopbackGrid(_nodes(4)), parse_config(raw), _fast()).run(out=tmp_path / "flower")
    finally:
        TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None  # type: ignore[assignment]
    assert_same_metrics(expected.run_dir, got.run_dir)
    assert got.rounds[-1]["selection_kept_fraction"] < 1.0
    assert got.rounds[-1]["selection_kept"] == expected.rounds[-1]["selection_kept"]


def test_resume_continues_selection_state_exactly(tmp_path):
    """Each client's own detector (local mode) lives in its state, which the checkpoint holds:
    a resumed run ends with the selections and metrics of an uninterrupted one."""
    from fedmtl.experiment.records import RunDir

    sel = {"mode": "local", "method": "iforest", "refit_every": 2}
    full = fedmtl.run(_cfg(sel, train__rounds=9), out=tmp_path / "full")
    short = fedmtl.run(_cfg(sel, train__rounds=7), out=tmp_path / "short")
    part = tmp_path / "part"
    part.mkdir()
    (part / "config.yaml").write_bytes((full.run_dir / "config.yaml").read_bytes())
    rd = RunDir(part)
    rd.append([r for r in RunDir(full.run_dir).read_metrics() if r["round"] <= 7])
    assert any("_selection" in s for s in read_states(short.run_dir).values())
    copy_checkpoint(short.run_dir, part)
    res = fedmtl.resume(part)
    keys = ("selection_kept", "selection_true_drops", "selection_floor_clients", "global_accuracy")
    assert [[r.get(k) for k in keys] for r in res.rounds] == [[r.get(k) for k in keys] for r in full.rounds]
    assert res.rounds[-1]["selection_kept"] < res.rounds[-1]["selection_samples"]


def test_batched_execution_selects_what_sequential_selects(tmp_path):
    raw = _cfg({"method": "ocsvm", "dedup": True}, train__rounds=8)
    seq = fedmtl.run(raw, out=tmp_path / "seq")
    raw["runtime"] = {"execution": "batched"}
    bat = fedmtl.run(raw, out=tmp_path / "bat")
    assert bat.rounds[-1]["execution"] == "batched"
    for a, b in zip(seq.rounds, bat.rounds, strict=True):
        assert a.get("selection_kept") == b.get("selection_kept")
        assert a.get("selection_true_drops") == b.get("selection_true_drops")
        assert b["global_accuracy"] == pytest.approx(a["global_accuracy"], abs=1e-3)


def test_the_duplicate_filter_finds_exact_copies_at_its_default_and_near_ones_only_when_widened(tmp_path):
    """Near duplicates (copies with Gaussian noise of 2% of the input std, as augmentation gives):
    the default dedup_eps 0.01 (of the median nearest-neighbour distance in code space) misses them
    all (measured recall 0); 0.3 finds them (measured precision 1.0, recall 1.0; on exact copies it
    keeps precision 0.997). Which eps a study uses is its choice to state; the default stays exact."""
    near = {"enabled": True, "duplicate": 0.3, "duplicate_noise": 0.02}
    default = fedmtl.run(_cfg({"method": "none", "dedup": True}, near), out=tmp_path / "default")
    precision, recall, kept = _detection(default.rounds)
    assert recall < 0.1
    wide = fedmtl.run(_cfg({"method": "none", "dedup": True, "dedup_eps": 0.3}, near), out=tmp_path / "wide")
    precision, recall, kept = _detection(wide.rounds)
    assert precision >= 0.95 and recall >= 0.9, (precision, recall, kept)
