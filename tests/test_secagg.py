"""Secure aggregation: exact masked sums, hiding, dropout recovery and aborts, Shamir's threshold,
FedAvg equality on real data (digits), config errors, and CKKS when TenSEAL is installed."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
from scipy import stats

import fedmtl
from fedmtl.algorithms.base import Message
from fedmtl.config import parse_config
from fedmtl.errors import ConfigError, ProtocolError
from fedmtl.experiment.run import build
from fedmtl.features.secagg import SecAggWrapper
from fedmtl.secagg import RingCodec, Shamir, secure_sum
from fedmtl.secagg.channel import LocalClients, run_stages
from fedmtl.secagg.protocol import ADVERTISE, MASK, SHARE, UNMASK, SecAggServer
from tests.conftest import digits_config


def _inputs(n: int, d: int, codec: RingCodec, seed: int = 0) -> tuple[dict[int, np.ndarray], dict, dict]:
    rng = np.random.default_rng(seed)
    raw = {c: rng.normal(0, 0.2, d) for c in range(n)}
    weights = {c: int(rng.integers(5, 200)) for c in range(n)}
    enc = {c: codec.encode(raw[c], weights[c], rng)[0] for c in range(n)}
    return enc, raw, weights


# ------------------------------------------------------------------------------ exact sums
@pytest.mark.parametrize(
    "drops",
    [
        {},
        {MASK: {1, 4, 7}},  # dropped after sharing keys: pairwise masks recovered from shares
        {SHARE: {0}, MASK: {2}, UNMASK: {3, 5}},  # a drop at every stage
    ],
    ids=["none", "before-masked-input", "every-stage"],
)
def test_masked_sum_equals_the_plain_sum_exactly(drops):
    codec = RingCodec.for_weights(bits=16, clip=1.0, max_total_weight=10 * 200)
    enc, raw, weights = _inputs(10, 3000, codec)
    total, server, _ = secure_sum(enc, codec, threshold=6, drop_before=drops)
    survivors = server.u3
    lost = set().union(*drops.values()) if drops else set()
    assert survivors == [c for c in range(10) if c not in lost - drops.get(UNMASK, set())]
    expected = codec.reduce(sum(enc[c] for c in survivors))
    assert np.array_equal(total, expected)  # exact, in the ring
    mean, w = codec.decode_sum(total)
    assert w == sum(weights[c] for c in survivors)
    plain = sum(weights[c] * np.clip(raw[c], -1, 1) for c in survivors) / w
    assert np.abs(mean - plain).max() <= codec.clip / codec.levels  # rounding only
    assert server.summary()["recovered"] == sorted(drops.get(MASK, set()))


def test_a_masked_update_is_uniform_on_the_ring_and_uncorrelated_with_the_raw_update():
    codec = RingCodec.for_weights(bits=16, clip=1.0, max_total_weight=1000)  # 4-byte ring
    d = 20_000
    structured = np.linspace(-1, 1, d)  # a raw update with maximal structure
    inputs = {0: codec.encode(structured, 7, None)[0]}
    rng = np.random.default_rng(1)
    inputs.update({c: codec.encode(rng.normal(0, 0.1, d), 3, rng)[0] for c in (1, 2)})
    clients = LocalClients(codec)
    server = SecAggServer(codec, d + 1, threshold=2, round=1)
    seen: dict[int, np.ndarray] = {}
    inner = clients.exchange.handler

    def spy(cid: int, action: str, msg: Message, rnd: int) -> Message:
        reply = inner(cid, action, msg, rnd)
        if "y" in reply.arrays:
            seen[cid] = codec.from_wire(reply.arrays["y"], d + 1)
        return reply

    clients.exchange.handler = spy
    run_stages(server, clients.advertise(inputs, 1), clients.exchange)
    y = seen[0][1:].astype(np.float64) / 2.0 ** (8 * codec.ring_bytes)
    assert stats.kstest(y, "uniform").pvalue > 1e-3
    counts = np.bincount((y * 16).astype(int), minlength=16)
    assert stats.chisquare(counts).pvalue > 1e-3
    assert abs(np.corrcoef(y, structured)[0, 1]) < 4 / math.sqrt(d)
    raw_ring = inputs[0][1:].astype(np.float64) / 2.0 ** (8 * codec.ring_bytes)
    assert stats.kstest(raw_ring, "uniform").pvalue < 1e-10  # the unmasked encoding is far from it


# ------------------------------------------------------------------------------ dropouts
def test_dropped_clients_are_recovered_up_to_the_threshold_and_the_round_aborts_past_it():
    codec = RingCodec.for_weights(bits=12, clip=1.0, max_total_weight=2000)
    enc, _, _ = _inputs(10, 500, codec, seed=3)
    total, server, _ = secure_sum(enc, codec, threshold=6, drop_before={MASK: {0, 1, 2, 3}})
    assert server.u3 == [4, 5, 6, 7, 8, 9] and server.summary()["recovered"] == [0, 1, 2, 3]
    assert np.array_equal(total, codec.reduce(sum(enc[c] for c in server.u3)))
    msg = (
        "secagg round 1: only 5 of 10 clients completed stage 'masked_input', "
        "below the threshold t=6; round aborted"
    )
    with pytest.raises(ProtocolError, match=f"^{msg}$"):
        secure_sum(enc, codec, threshold=6, drop_before={MASK: {0, 1, 2, 3, 4}})
    with pytest.raises(ProtocolError, match="only 5 of 6 clients completed stage 'unmasking'"):
        secure_sum(enc, codec, threshold=6, drop_before={MASK: {0, 1, 2, 3}, UNMASK: {9}})
    with pytest.raises(ProtocolError, match="only 5 of 10 clients completed stage 'advertise'"):
        secure_sum(enc, codec, threshold=6, drop_before={ADVERTISE: {0, 1, 2, 3, 4}})


def test_secagg_plus_masks_over_a_sparse_graph_and_still_sums_exactly_with_dropouts():
    from fedmtl.secagg.protocol import neighbours

    graph = neighbours(list(range(30)), 6, seed=5)
    assert all(len(v) == 6 and c not in v for c, v in graph.items())
    assert all(c in graph[v] for c, vs in graph.items() for v in vs)  # symmetric
    codec = RingCodec.for_weights(bits=16, clip=1.0, max_total_weight=30 * 200)
    enc, _, _ = _inputs(30, 2000, codec, seed=4)
    drops = {MASK: {3, 11, 20}, UNMASK: {7}}
    total, server, traffic = secure_sum(enc, codec, threshold=4, drop_before=drops, neighbors=6)
    assert np.array_equal(total, codec.reduce(sum(enc[c] for c in server.u3)))
    assert server.summary()["recovered"] == [3, 11, 20]
    # each client sent 6 ciphertexts (one per neighbour), not 29
    assert set(traffic.up[SHARE].values()) == {6 * (8 + 112)}
    # a neighbourhood that loses too many members cannot be unmasked: the round aborts in one line
    lost = set(sorted(neighbours(list(range(30)), 6, seed=1)[0])[:4])  # 4 of client 0's 6 neighbours
    with pytest.raises(
        ProtocolError, match=r"^secagg round 1: only \d shares of client \d+'s .*below the threshold t=4"
    ):
        secure_sum(enc, codec, threshold=4, drop_before={MASK: lost}, neighbors=6)


# ------------------------------------------------------------------------------ Shamir
def test_shamir_reconstructs_from_any_t_shares_and_t_minus_1_reveal_nothing():
    sh = Shamir(13)
    n, t = 5, 3
    xs = np.arange(1, n + 1)
    secret = np.array([7, 0, 12])
    shares = sh.split(secret, xs, t, rng=np.random.default_rng(0))
    for subset in itertools.combinations(range(n), t):
        idx = list(subset)
        assert np.array_equal(sh.combine(xs[idx], shares[idx]), secret)
    # Information-theoretic: over all polynomials of degree t-1, any t-1 shares take every value
    # pair exactly once for *each* secret, so they are independent of the secret.
    p = sh.p
    for pts in itertools.combinations(xs.tolist(), t - 1):
        for s in range(p):
            seen = np.zeros((p,) * (t - 1), dtype=int)
            for coeffs in itertools.product(range(p), repeat=t - 1):
                y = sh.evaluate(np.array([s]), np.array(coeffs).reshape(t - 1, 1), pts)[:, 0]
                seen[tuple(y)] += 1
            assert (seen == 1).all()


def test_shamir_on_the_protocol_field_round_trips_32_byte_keys():
    from fedmtl.secagg.shamir import bytes_to_elements, elements_to_bytes

    sh = Shamir()
    key = bytes(range(32))
    el = bytes_to_elements(key)
    shares = sh.split(el, np.arange(1, 101), 60)
    back = sh.combine(np.arange(41, 101), shares[40:])
    assert elements_to_bytes(back, 32) == key


# ------------------------------------------------------------------------------ in a run
def _params_after(cfg: dict[str, Any], rounds: int) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    _, algo, sim = build(parse_config(cfg))
    server, states, infos = algo.init_server(), {}, []
    for r in range(1, rounds + 1):
        res = sim.run_round(r, server, states)
        server = res.server
        infos.append({**res.info, **algo.round_info(server)})  # what the round row holds
    return server["params"], infos


@pytest.mark.parametrize("neighbors", [0, 4], ids=["all-pairs", "secagg+-4-neighbours"])
def test_fedavg_with_secure_aggregation_equals_plain_fedavg_on_digits(neighbors):
    plain, _ = _params_after(digits_config(clients__per_round=6), 3)
    cfg = digits_config(clients__per_round=6, secagg={"enabled": True, "bits": 20, "neighbors": neighbors})
    secure, infos = _params_after(cfg, 3)
    assert all(i["secagg_status"] == "ok" and i["secagg_survivors"] == 6 for i in infos)
    assert infos[0]["secagg_threshold"] == 4  # ceil(2/3 of the 6 clients, or of a 4 + 1 neighbourhood)
    per_client = infos[0]["secagg_stages"]["share_keys"]["bytes_up_per_client"]
    assert per_client == (neighbors or 5) * (8 + 112)  # one ciphertext (and its address) per partner
    assert infos[0]["secagg_clipped_fraction"] == 0.0
    for k in plain:
        # three rounds of quantisation at 2^-19 resolution, propagated through training
        np.testing.assert_allclose(secure[k], plain[k], atol=2e-4)
    assert any(not np.array_equal(secure[k], plain[k]) for k in plain)  # it really was quantised


def test_the_server_side_only_ever_receives_keys_ciphertexts_masked_vectors_and_shares(monkeypatch):
    received: list[np.ndarray] = []
    for name in ("collect_keys", "route_shares", "collect_masked", "unmask"):
        orig = getattr(SecAggServer, name)

        def spy(self, replies, *a, _orig=orig, **kw):
            received.extend(arr for m in replies.values() for arr in m.arrays.values())
            return _orig(self, replies, *a, **kw)

        monkeypatch.setattr(SecAggServer, name, spy)
    _params_after(digits_config(secagg={"enabled": True}), 1)
    assert received and {a.dtype for a in received} <= {np.dtype(np.uint8), np.dtype(np.int64)}


def test_an_aborted_round_keeps_the_model_and_is_recorded_and_training_goes_on(tmp_path):
    cfg = digits_config(train__rounds=4, secagg={"enabled": True, "threshold": 4}, runtime__drop_prob=0.3)
    res = fedmtl.run(cfg, out=tmp_path / "r")
    rows = res.rounds
    aborted = [r for r in rows if r["secagg_status"] == "aborted"]
    ok = [r for r in rows if r["secagg_status"] == "ok"]
    assert aborted and ok and res.summary["rounds_completed"] == 4
    for r in aborted:
        assert r["secagg_error"].startswith(f"secagg round {r['round']}: only ")
        assert "below the threshold t=4; round aborted" in r["secagg_error"]
        prev = rows[r["round"] - 2] if r["round"] > 1 else None
        if prev is not None:  # same global model as after the previous round
            assert r["global_accuracy"] == prev["global_accuracy"]


def test_stage_dropouts_in_a_run_are_recovered_and_bytes_are_counted():
    _, infos = _params_after(
        digits_config(clients__per_round=8, secagg={"enabled": True, "stage_drop_prob": 0.15}), 3
    )
    assert any(i["secagg_recovered"] for i in infos)
    i = infos[0]
    assert i["secagg_bytes_up"] > 0 and set(i["secagg_stages"]) >= {ADVERTISE, SHARE, MASK}
    mi = i["secagg_stages"][MASK]
    # the masked vector: one ring element (4 bytes here) per parameter plus the weight coordinate
    _, algo, _ = build(parse_config(digits_config()))
    d = sum(a.size for a in algo.init_server()["params"].values())
    assert mi["bytes_up_per_client"] == 4 * (d + 1)


def _dp(z: float) -> dict[str, Any]:
    return digits_config(
        clients__per_round=8,
        secagg={"enabled": True, "weighting": "uniform", "bits": 20, "clip": 4.0},
        privacy={"enabled": True, "level": "client", "noise_at": "client", "noise_multiplier": z},
    )


def test_with_client_level_dp_clients_noise_before_masking_and_the_sum_has_the_calibrated_noise():
    """DP-FedAvg with ``noise_at: client`` inside secure aggregation: each of the m = 8 clients adds
    N(0, (z C)^2 / t) before masking, t = 6 the protocol's threshold (a round with fewer survivors
    aborts), so the unmasked sum carries at least the central noise (z C)^2 whoever drops: with all 8
    surviving, the mean's noise has std z C sqrt(8 / t) / 8."""
    clean, _ = _params_after(_dp(0.0), 1)
    noisy, infos = _params_after(_dp(1.0), 1)
    diff = np.concatenate([(noisy[k] - clean[k]).ravel() for k in clean])
    assert infos[0]["secagg_threshold"] == 6 and infos[0]["secagg_survivors"] == 8
    assert diff.std() == pytest.approx(1.0 * 1.0 * np.sqrt(8 / 6) / 8, rel=0.05)
    assert infos[0]["secagg_status"] == "ok" and infos[0]["epsilon"] > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"algorithm": {"name": "local"}},
            "config: secagg.enabled = True: algorithm 'local' has no global model to aggregate",
        ),
        (
            {"algorithm": {"name": "hierarchical"}},
            "config: secagg.enabled = True: algorithm 'hierarchical' needs more than the weighted mean",
        ),
        (
            {"aggregation": [{"name": "median"}]},
            "config: secagg.enabled = True: aggregation step 'median' needs individual client updates",
        ),
        (
            {"secagg": {"enabled": True, "threshold": 5}},
            "config: secagg.threshold = 5: more than the 4 clients sampled per round; allowed: 2..4",
        ),
        (
            {"data": {"dataset": "digits", "tasks": ["digit", "parity"]}},
            "config: secagg.enabled = True: multi-task federations",
        ),
        (
            {"privacy": {"enabled": True, "level": "client", "noise_at": "server"}},
            "config: secagg.enabled = True: privacy.noise_at = 'server' clips and noises individual updates",
        ),
        (
            {"privacy": {"enabled": True, "level": "client", "noise_at": "client"}},
            "config: secagg.enabled = True: secagg.weighting = 'samples', but DP-FedAvg averages clients",
        ),
    ],
)
def test_unsupported_combinations_are_one_line_config_errors(overrides, message):
    cfg = digits_config(secagg={"enabled": True})
    cfg.update(overrides)
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        build(parse_config(cfg))


def test_bad_secagg_keys_name_what_is_allowed():
    with pytest.raises(ConfigError, match=r"config: secagg.neighbors = 3: must be even"):
        parse_config(digits_config(secagg={"enabled": True, "neighbors": 3}))
    with pytest.raises(ConfigError, match=r"config: secagg.mode = 'paillier': input should be"):
        parse_config(digits_config(secagg={"enabled": True, "mode": "paillier"}))
    with pytest.raises(ConfigError, match=r"config: unknown key 'secagg.treshold'"):
        parse_config(digits_config(secagg={"treshold": 3}))


def test_the_wrapper_runs_batched_and_matches_sequential():
    seq, _ = _params_after(digits_config(secagg={"enabled": True, "rounding": "nearest"}), 2)
    bat, _ = _params_after(
        digits_config(secagg={"enabled": True, "rounding": "nearest"}, runtime__execution="batched"), 2
    )
    _, algo, sim = build(parse_config(digits_config(secagg={"enabled": True}, runtime__execution="batched")))
    assert isinstance(algo, SecAggWrapper) and sim.execution == "batched"
    for k in seq:
        np.testing.assert_allclose(bat[k], seq[k], atol=1e-4)


# ------------------------------------------------------------------------------ CKKS
def test_ckks_mean_is_close_to_the_plain_mean():
    pytest.importorskip("tenseal", reason="TenSEAL is not installed (pip install 'fedmtl[he]')")
    plain, _ = _params_after(digits_config(), 2)
    he, infos = _params_after(digits_config(secagg={"enabled": True, "mode": "ckks"}), 2)
    assert infos[0]["secagg_status"] == "ok" and infos[0]["secagg_mode"] == "ckks"
    for k in plain:
        np.testing.assert_allclose(he[k], plain[k], atol=1e-4)


# ------------------------------------------------------------------------------ Flower
def test_secure_aggregation_runs_over_flower_messages_and_matches_the_simulator(tmp_path):
    """Stages 1-3 as ``train.secagg_*`` messages through Flower's wire encoding (LoopbackGrid);
    each node keeps its protocol session in its own ``context.state``."""
    pytest.importorskip("flwr", reason="Flower is not installed (pip install 'fedmtl[flower]')")
    from flwr.supercore.task_identity import TaskIdentity

    from fedmtl.flower import codec, protocol
    from fedmtl.flower.server import FlowerServer
    from tests.test_flower import LoopbackGrid, _fast, _nodes

    raw = digits_config(
        data__partition__num_clients=4, clients__per_round=None, train__rounds=2, train__local_steps=5,
        secagg={"enabled": True},
    )  # fmt: skip
    expected = fedmtl.run(raw, out=tmp_path / "inproc")
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    try:
        grid = LoopbackGrid(_nodes(4))
        srv = FlowerServer(grid, parse_config(raw), _fast())
        got = srv.run(out=tmp_path / "flower")
    finally:
        TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None  # type: ignore[assignment]
    kinds = {t for _, t, _ in grid.log}
    assert {"train.secagg_share", "train.secagg_mask", "train.secagg_unmask"} <= kinds
    for e, g in zip(expected.rounds, got.rounds, strict=True):
        assert g["secagg_status"] == e["secagg_status"] == "ok"
        assert g["global_accuracy"] == pytest.approx(e["global_accuracy"], abs=1e-9)
        assert g["accuracy_mean"] == pytest.approx(e["accuracy_mean"], abs=1e-9)
        # the stages are exchanges of the same round on both runtimes: the same bytes, counted once
        assert g["secagg_stages"] == e["secagg_stages"]
        assert (g["bytes_up"], g["bytes_down"]) == (e["bytes_up"], e["bytes_down"])
    for cid in range(4):  # no node keeps a protocol session after its round
        assert "secagg" not in codec.get_tree(grid.contexts[100 + cid].state, protocol.STATE)


def test_a_run_killed_mid_way_resumes_to_the_same_metrics(tmp_path, monkeypatch):
    from fedmtl.experiment.run import resume
    from fedmtl.runtime.simulation import Simulator

    cfg = digits_config(train__rounds=3, secagg={"enabled": True, "stage_drop_prob": 0.1})
    full = fedmtl.run(cfg, out=tmp_path / "full")
    real = Simulator.run_round

    def crash(self, round, server, states):
        if round == 3:
            raise KeyboardInterrupt
        return real(self, round, server, states)

    monkeypatch.setattr(Simulator, "run_round", crash)
    with pytest.raises(KeyboardInterrupt):
        fedmtl.run(cfg, out=tmp_path / "killed")
    monkeypatch.setattr(Simulator, "run_round", real)
    again = resume(tmp_path / "killed")
    for key in ("accuracy_mean", "global_accuracy", "secagg_survivors", "secagg_recovered"):
        assert again.final[key] == full.final[key]
