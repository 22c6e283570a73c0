"""Secure aggregation's overhead against plain aggregation, and its behaviour under dropouts.

Model: the MNIST MLP 784-200-10 (159,010 parameters). Client updates are real: one local epoch of
FedAvg on MNIST clients (100 clients, Dirichlet alpha = 0.5), cycled when a federation has more
clients than were trained. Every protocol step is real cryptography (X25519, HKDF, AES-GCM,
AES-CTR masks, Shamir over GF(2^31 - 1)), run in one process, one client after another.

- Overhead: 10, 100 and 1000 clients, no dropouts, t = ceil(2n/3). Bytes per client (all stages)
  against sending the float32 update; client compute against one local epoch of training; server
  compute against the plain sample-weighted mean of the same updates.
- Dropouts: 10% and 40% of the clients vanish after sharing keys and before sending their masked
  input (the case Shamir recovery is for), with t = n/2 and t = 2n/3.
- At 1000 clients the pairwise work is quadratic: the share-keys and unmasking stages run for every
  client, the masked-input stage is timed on a subset of clients (each does the same work) while
  the other clients' masked vectors are random placeholders; the server's stages run in full. So
  the 1000-client sums are timed but not checked (they are checked exactly at 10 and 100 clients).
- SecAgg+ (``secagg.neighbors``, default k = 40) at the largest size: every stage for every client.
- CKKS (TenSEAL) at 10 clients: one real FedAvg round on MNIST through ``secagg.mode: ckks``.
- End to end: 20 rounds of FedAvg on MNIST with and without secure aggregation.

Run with ``fedmtl bench secagg [--quick]``; writes ``benchmarks/results/secagg.md`` and the raw
numbers to ``secagg.json`` (``--from-json`` re-renders the table without running anything)."""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from _provenance import stamp  # benchmarks/ is on sys.path under fedmtl bench
from fedmtl.aggregation import weighted_mean
from fedmtl.algorithms.base import ClientWork, Message
from fedmtl.config import parse_config
from fedmtl.errors import ProtocolError
from fedmtl.experiment.run import build
from fedmtl.runtime.simulation import TRAIN, derived_rng
from fedmtl.secagg import RingCodec, secure_sum
from fedmtl.secagg.channel import LocalClients, Traffic
from fedmtl.secagg.protocol import ADVERTISE, MASK, SHARE, STAGES, UNMASK, SecAggServer, client_masked_input
from fedmtl.training.executors import run_local

RESULTS = Path(__file__).resolve().parent / "results"
MNIST = {
    "seed": 0,
    "data": {
        "dataset": "mnist",
        "partition": {"kind": "dirichlet", "alpha": 0.5, "num_clients": 100},
        "normalize": "scale",
    },
    "model": {"name": "mlp", "hidden": [200]},
    "train": {"rounds": 1, "local_epochs": 1, "batch_size": 32, "lr": 0.05},
    "clients": {"per_round": 10},
    "output": {"progress": False},
}


def real_updates(k: int) -> tuple[list[np.ndarray], list[int], list[dict[str, np.ndarray]], float]:
    """(flat deltas, weights, update arrays, mean seconds of one local epoch) for k MNIST clients."""
    fed, algo, _ = build(parse_config(MNIST))
    server = algo.init_server()
    deltas, weights, arrays, secs = [], [], [], []
    for cid in range(k):
        msg = algo.broadcast(server, cid)
        data = fed.clients[cid]
        work = ClientWork(round=1, fraction=1.0, rng=derived_rng(0, TRAIN, 1, cid), lr=0.05)
        t0 = time.perf_counter()
        _, reply = run_local(algo.client_step({}, data, msg, work))
        secs.append(time.perf_counter() - t0)
        deltas.append(
            np.concatenate([(reply.arrays[n] - msg.arrays[n]).ravel() for n in msg.arrays]).astype(float)
        )
        weights.append(int(reply.scalars["num_examples"]))
        arrays.append(reply.arrays)
    return deltas, weights, arrays, float(np.mean(secs))


def plain_seconds(arrays: list[dict[str, np.ndarray]], weights: list[int], n: int, reps: int = 3) -> float:
    ups = [arrays[i % len(arrays)] for i in range(n)]
    ws = [weights[i % len(weights)] for i in range(n)]
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        weighted_mean(ups, ws)
        best = min(best, time.perf_counter() - t0)
    return best


def encode_all(
    deltas: list[np.ndarray], weights: list[int], n: int, bits: int = 16, clip: float = 1.0
) -> tuple[RingCodec, dict[int, np.ndarray], float]:
    ws = [weights[i % len(weights)] for i in range(n)]
    codec = RingCodec.for_weights(bits, clip, sum(ws))
    rng = np.random.default_rng(0)
    enc, clipped = {}, 0
    cache: dict[int, np.ndarray] = {}
    for c in range(n):
        j = c % len(deltas)
        if j not in cache:
            cache[j], k = codec.encode(deltas[j], ws[c], rng)
            clipped += k
        enc[c] = cache[j]  # the same object for cycled clients: memory stays flat at 1000 clients
    return codec, enc, clipped / (len(cache) * deltas[0].size)


def _per_client(traffic: Traffic) -> tuple[float, float, float]:
    """Mean over clients of (bytes up, bytes down, compute seconds), all stages summed."""
    cids = set().union(*[set(traffic.up[s]) for s in STAGES])
    up = np.mean([sum(traffic.up[s].get(c, 0) for s in STAGES) for c in cids])
    down = np.mean([sum(traffic.down[s].get(c, 0) for s in STAGES) for c in cids])
    sec = sum(float(np.mean(list(traffic.seconds[s].values()))) for s in STAGES if traffic.seconds[s])
    return float(up), float(down), sec


def full_round(
    enc: dict[int, np.ndarray], codec: RingCodec, t: int, drops: dict[str, set[int]], neighbors: int = 0
) -> dict[str, Any]:
    """The whole protocol for every client; the sum is checked against the plain ring sum."""
    t0 = time.perf_counter()
    try:
        total, server, traffic = secure_sum(enc, codec, t, drop_before=drops, neighbors=neighbors)
    except ProtocolError as exc:
        return {"status": "aborted", "error": str(exc), "wall": time.perf_counter() - t0}
    exact = bool(np.array_equal(total, codec.reduce(sum(enc[c] for c in server.u3))))
    up, down, csec = _per_client(traffic)
    return {
        "status": "recovered" if server.summary()["recovered"] else "ok",
        "exact": exact,
        "survivors": len(server.u3),
        "recovered": len(server.summary()["recovered"]),
        "up": up,
        "down": down,
        "client_s": csec,
        "server_s": sum(server.summary()["server_seconds"].values()),
        "wall": time.perf_counter() - t0,
    }


def large_round(
    enc: dict[int, np.ndarray], codec: RingCodec, t: int, drop_fracs: list[float], timed: int
) -> list[dict[str, Any]]:
    """1000 clients: shares for everyone once; per dropout level, masked input timed on ``timed``
    clients (the rest send random placeholders), unmasking by every survivor, server in full."""
    n = len(enc)
    clients = LocalClients(codec)
    length = len(next(iter(enc.values())))
    server0 = SecAggServer(codec, length, t, 1)
    adv = clients.advertise(enc, 1)
    msgs = server0.collect_keys(adv, n)
    replies, _ = clients.exchange("secagg_share", msgs, 1)
    routed = server0.route_shares(replies)
    base_sessions = dict(clients.sessions)
    share_traffic = clients.traffic
    rng = np.random.default_rng(1)
    placeholder = codec.to_wire(codec.reduce(rng.integers(0, 2**63, size=length, dtype=np.uint64)))
    out = []
    for frac in drop_fracs:
        server = copy.deepcopy(server0)
        pick = np.random.default_rng(int(frac * 100)).choice(n, round(frac * n), replace=False)
        dropped = set(pick.tolist())
        traffic = Traffic()
        for s in (ADVERTISE, SHARE):
            traffic.up[s], traffic.down[s], traffic.seconds[s] = (
                share_traffic.up[s],
                share_traffic.down[s],
                share_traffic.seconds[s],
            )
        sessions: dict[int, dict[str, Any]] = {}
        masked: dict[int, Message] = {}
        alive = [c for c in routed if c not in dropped]
        timed_set = set(alive[:timed])
        for c in alive:
            if c in timed_set:
                t0 = time.perf_counter()
                sessions[c], masked[c] = client_masked_input(base_sessions[c], routed[c], codec)
                traffic.add(MASK, c, routed[c], masked[c], time.perf_counter() - t0)
            else:  # same bytes on the wire, compute not timed
                s = {k: v for k, v in base_sessions[c].items() if k != "x"}
                sessions[c] = {**s, "u2": routed[c].arrays["from"], "inbox": routed[c].arrays["ct"]}
                masked[c] = Message(arrays={"y": placeholder})
                traffic.up[MASK][c] = masked[c].nbytes
                traffic.down[MASK][c] = routed[c].nbytes
        row: dict[str, Any] = {"drop": frac, "timed": timed}
        t0 = time.perf_counter()
        try:
            unmask_msgs = server.collect_masked(masked)
            from fedmtl.secagg.protocol import client_unmask

            replies = {}
            for c, m in unmask_msgs.items():
                t1 = time.perf_counter()
                replies[c] = client_unmask(sessions[c], m)
                traffic.add(UNMASK, c, m, replies[c], time.perf_counter() - t1)
            server.unmask(replies)
        except ProtocolError as exc:
            row.update(status="aborted", error=str(exc))
            out.append(row)
            continue
        up, down, csec = _per_client(traffic)
        row.update(
            status="recovered" if dropped else "ok",
            survivors=len(server.u3),
            recovered=len(dropped),
            up=up,
            down=down,
            client_s=csec,
            server_s=sum(server.summary()["server_seconds"].values()),
            wall=time.perf_counter() - t0,
        )
        out.append(row)
    return out


def plus_rows(deltas: list[np.ndarray], weights: list[int], n: int, k: int) -> list[dict[str, Any]]:
    """SecAgg+ (k-regular graph): the whole protocol for all n clients, sums checked exact."""
    codec, enc, _ = encode_all(deltas, weights, n)
    rows = []
    for frac, tf in ((0.0, 2 / 3), (0.1, 2 / 3), (0.4, 2 / 3), (0.4, 0.5)):
        t = max(2, math.ceil(tf * (k + 1)))
        pick = np.random.default_rng(int(frac * 100)).choice(n, round(frac * n), replace=False)
        r = full_round(enc, codec, t, {MASK: set(pick.tolist())} if frac else {}, neighbors=k)
        rows.append({"n": n, "k": k, "drop": frac, "t": t, "plain_s": plain_seconds_cache.get(n), **r})
        print(f"[secagg bench] secagg+ n={n} k={k} drop={frac} t={t}: {r['status']}", flush=True)
    return rows


plain_seconds_cache: dict[int, float] = {}


def accuracy_runs(rounds: int) -> list[dict[str, Any]]:
    """End to end on MNIST: plain FedAvg against FedAvg with secure aggregation, same seed."""
    import tempfile

    import fedmtl

    base = {
        **MNIST,
        "train": {**MNIST["train"], "rounds": rounds},
        "eval": {"every": max(1, rounds // 4)},
        "output": {"progress": False, "checkpoint_every": rounds},
    }
    variants = [
        ("FedAvg", {}),
        ("FedAvg + secagg (16 bits)", {"secagg": {"enabled": True}}),
        ("FedAvg, 10% drop before training", {"runtime": {"drop_prob": 0.1}}),
        (
            "FedAvg + secagg, 10% drop before training + 5% per stage",
            {"runtime": {"drop_prob": 0.1}, "secagg": {"enabled": True, "stage_drop_prob": 0.05}},
        ),
    ]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        warm = {**base, "train": {**base["train"], "rounds": 1}}
        fedmtl.run(warm, out=Path(tmp) / "warmup")  # data loading and imports out of the timings
        for i, (label, extra) in enumerate(variants):
            t0 = time.perf_counter()
            res = fedmtl.run({**base, **extra}, out=Path(tmp) / str(i))
            wall = time.perf_counter() - t0
            rows = res.rounds
            out.append(
                {
                    "label": label,
                    "rounds": rounds,
                    "global_accuracy": res.final["global_accuracy"],
                    "accuracy_mean": res.final["accuracy_mean"],
                    "bytes": sum(
                        r["bytes_up"]
                        + r["bytes_down"]
                        + r.get("secagg_bytes_up", 0)
                        + r.get("secagg_bytes_down", 0)
                        for r in rows
                    ),
                    "aborted": sum(r.get("secagg_status") == "aborted" for r in rows),
                    "recovered": sum(len(r.get("secagg_recovered", [])) for r in rows),
                    "wall": wall,
                }
            )
            print(f"[secagg bench] {label}: {res.final['global_accuracy']:.4f} ({wall:.0f} s)", flush=True)
    return out


def ckks_round(clients: int) -> dict[str, Any]:
    try:
        import tenseal  # noqa: F401
    except ImportError:
        return {"status": "TenSEAL not installed"}
    cfg = {**MNIST, "clients": {"per_round": clients}, "secagg": {"enabled": True, "mode": "ckks"}}
    _, algo, sim = build(parse_config(cfg))
    plain_cfg = {**MNIST, "clients": {"per_round": clients}}
    _, palgo, psim = build(parse_config(plain_cfg))
    t0 = time.perf_counter()
    res = sim.run_round(1, algo.init_server(), {})
    he_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    pres = psim.run_round(1, palgo.init_server(), {})
    plain_wall = time.perf_counter() - t0
    info = {**res.info, **algo.round_info(res.server)}  # what the round row holds
    diff = max(
        float(np.abs(res.server["params"][k] - pres.server["params"][k]).max()) for k in pres.server["params"]
    )
    up_plain = pres.info["bytes_up"] / clients
    return {
        **info,
        "plain_up": up_plain,
        "he_wall": he_wall,
        "plain_wall": plain_wall,
        "max_abs_diff": diff,
        "train_s": float(np.mean([r["compute_wall"] for r in pres.train_rows])),
    }


def _ms(values: list[float]) -> str:
    a = np.asarray(values, dtype=float)
    if len(a) == 1 or a.std() <= 1e-9 * abs(a.mean()):  # a single run, or deterministic (bytes)
        return f"{a.mean():.3g}"
    return f"{a.mean():.3g} ± {a.std():.2g}"


def main(argv: list[str]) -> Path:
    started = time.perf_counter()
    ap = argparse.ArgumentParser(prog="fedmtl bench secagg")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--repeats", type=int, default=3, help="repeats at 10 and 100 clients")
    ap.add_argument(
        "--timed", type=int, default=20, help="clients timed in the 1000-client masked-input stage"
    )
    ap.add_argument("--quick", action="store_true", help="10 and 100 clients, one repeat, 4 rounds")
    ap.add_argument("--rounds", type=int, default=20, help="rounds of the end-to-end MNIST runs")
    ap.add_argument("--neighbors", type=int, default=40, help="SecAgg+ graph degree for the sparse rows")
    ap.add_argument("--out", default=str(RESULTS / "secagg.md"))
    ap.add_argument("--from-json", help="re-render the table from a previous run's .json, running nothing")
    a = ap.parse_args(argv)
    if a.from_json:
        raw = json.loads(Path(a.from_json).read_text())
        path = Path(a.out)
        path.write_text(render(**raw))
        return path
    sizes, repeats = ([10, 100], 1) if a.quick else (a.sizes, a.repeats)
    if a.quick:
        a.rounds = 4
    started = time.perf_counter()
    deltas, weights, arrays, train_s = real_updates(10)
    d = deltas[0].size
    plain_up = 4 * d
    print(f"[secagg bench] {d} parameters; one local epoch {train_s:.3f} s", flush=True)

    overhead, large_drops = [], []
    for n in sizes:
        codec, enc, clipped = encode_all(deltas, weights, n)
        t = math.ceil(2 * n / 3)
        p_s = plain_seconds(arrays, weights, n)
        plain_seconds_cache[n] = p_s
        if n <= 200:
            runs = [full_round(enc, codec, t, {}) for _ in range(repeats)]
            note = (
                "all stages, all clients; sum checked exact"
                if all(r["exact"] for r in runs)
                else "SUM MISMATCH"
            )
        else:  # one share-keys stage serves the no-dropout row and the dropout rows
            runs, *more = large_round(enc, codec, t, [0.0, 0.1, 0.4], a.timed)
            runs = [runs]
            large_drops += [{"n": n, "t": t, "tf": 2 / 3, **r} for r in more]
            note = f"masked input timed on {a.timed} clients; other stages in full"
        overhead.append(
            {
                "n": n,
                "t": t,
                "runs": runs,
                "plain_s": p_s,
                "ring": codec.ring_bytes,
                "clipped": clipped,
                "note": note,
            }
        )
        print(
            f"[secagg bench] n={n}: {runs[0].get('status')} ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )

    drops = []
    for n in [s for s in sizes if s <= 200][-1:]:
        codec, enc, _ = encode_all(deltas, weights, n)
        for frac in (0.1, 0.4):
            pick = np.random.default_rng(int(frac * 100)).choice(n, round(frac * n), replace=False)
            lost = set(pick.tolist())
            for tf in (0.5, 2 / 3):
                t = math.ceil(tf * n)
                r = full_round(enc, codec, t, {MASK: lost})
                drops.append({"n": n, "drop": frac, "t": t, "tf": tf, **r})
                print(f"[secagg bench] drops n={n} {frac} t={t}: {r['status']}", flush=True)
    drops += large_drops

    plus = plus_rows(deltas, weights, max(sizes), a.neighbors) if max(sizes) >= 100 else []
    ckks = ckks_round(10)
    accuracy = accuracy_runs(a.rounds)
    total_min = (time.perf_counter() - started) / 60
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = {
        "overhead": overhead,
        "drops": drops,
        "ckks": ckks,
        "d": d,
        "train_s": train_s,
        "plain_up": plain_up,
        "minutes": total_min,
        "argv": argv,
        "accuracy": accuracy,
        "plus": plus,
    }
    path.write_text(render(**raw))
    path.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=float))
    print(f"[secagg bench] wrote {path} ({total_min:.1f} min)", flush=True)
    return stamp(path, "secagg", argv, started)


def _table(header: list[str]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]


INTRO = """MNIST MLP 784-200-10 ({d:,} parameters); real client updates (one local epoch of FedAvg on
MNIST clients, Dirichlet alpha 0.5); 16-bit fixed point, clip ±1, sample weights inside the masked
vector. Pairwise masking (Bonawitz et al. 2017) with X25519 + HKDF, AES-GCM share transport,
AES-128-CTR masks and Shamir over GF(2^31 - 1), everything in one process on a shared 2-core
machine, clients one after another. Ratios: **bytes** = a client's protocol bytes (all four
stages) / the float32 update it would send in plain FedAvg ({mb:.2f} MB); **client time** = a
client's protocol compute (all stages) / one local epoch of training on its MNIST data ({ms:.0f} ms
here); **server time** = the server's protocol compute / the plain sample-weighted mean of the same
updates. Mean ± std over repeats where there are several. The machine is shared with other jobs
whose load changes during a run, so time ratios move by up to about 2x between runs of this
benchmark (bytes and outcomes do not)."""

OVERHEAD_NOTE = """Bytes up are dominated by the masked vector (ring bytes per coordinate against 4 for
float32); the share-keys stage adds n-1 ciphertexts of 112 bytes and the unmasking stage n shares,
so a client's bytes grow linearly in n. A client's compute grows linearly in n too (n-1 key
agreements and masks); the server's grows with the survivors (self masks) and with dropped x
survivors (recovered pairwise masks), i.e. quadratically in n under a fixed dropout rate."""

ABORT_NOTE = """A round aborts (one line, recorded in the round row; the global model is kept) as soon as a
stage is reached by fewer than t clients. At 1000 clients only t = ceil(2n/3) was run (one
share-keys stage serves every 1000-client row, and t is fixed when keys are shared); the 100-client
rows show t = n/2 recovering from 40% dropouts. Recovery costs the server |dropped| x |survivors|
key agreements and mask expansions: {recovery}."""


def render(
    overhead: list[dict[str, Any]],
    drops: list[dict[str, Any]],
    ckks: dict[str, Any],
    d: int,
    train_s: float,
    plain_up: int,
    minutes: float,
    argv: list[str],
    accuracy: list[dict[str, Any]] | None = None,
    plus: list[dict[str, Any]] | None = None,
) -> str:
    lines = [
        "# Secure aggregation: overhead and dropouts",
        "",
        INTRO.format(d=d, mb=plain_up / 1e6, ms=train_s * 1e3),
        "",
        "## Overhead without dropouts (t = ceil(2n/3))",
        "",
        *_table(
            [
                "clients",
                "ring bytes / coord",
                "bytes up / plain",
                "extra bytes down / plain update",
                "client time / local epoch",
                "server time / plain mean",
                "what was run",
            ]
        ),
    ]
    for o in overhead:
        runs = o["runs"]
        up = [r["up"] / plain_up for r in runs if "up" in r]
        down = [r["down"] / plain_up for r in runs if "down" in r]
        cl = [r["client_s"] / train_s for r in runs if "client_s" in r]
        sv = [r["server_s"] / o["plain_s"] for r in runs if "server_s" in r]
        lines.append(
            f"| {o['n']} | {o['ring']} | {_ms(up)} | {_ms(down)} | {_ms(cl)} | {_ms(sv)} | {o['note']} |"
        )
    lines += [
        "",
        OVERHEAD_NOTE,
        "",
        "## Dropouts after sharing keys (before the masked input)",
        "",
        *_table(
            [
                "clients",
                "dropped",
                "threshold t",
                "outcome",
                "survivors",
                "recovered",
                "server time / plain mean",
                "client time / local epoch",
            ]
        ),
    ]
    plain_of = {o["n"]: o["plain_s"] for o in overhead}
    for r in drops:
        if r["status"] == "aborted":
            lines.append(f"| {r['n']} | {r['drop']:.0%} | {r['t']} | aborted: `{r['error']}` | | | | |")
            continue
        lines.append(
            f"| {r['n']} | {r['drop']:.0%} | {r['t']} | {r['status']} | {r['survivors']} "
            f"| {r['recovered']} | "
            f"{r['server_s'] / plain_of.get(r['n'], float('nan')):.3g} | {r['client_s'] / train_s:.3g} |"
        )
    big = [r for r in drops if r["n"] == max(plain_of) and r["status"] != "aborted"]
    recovery = (
        f"{big[0]['server_s']:.0f} s of server compute at {big[0]['n']} clients with {big[0]['drop']:.0%} "
        f"dropped on this machine, against {overhead[-1]['runs'][0]['server_s']:.1f} s without dropouts"
        if big and "server_s" in overhead[-1]["runs"][0]
        else "see the rows above"
    )
    lines += ["", ABORT_NOTE.format(recovery=recovery), ""]
    if plus:
        n, k = plus[0]["n"], plus[0]["k"]
        lines += [
            f"## SecAgg+ at {n} clients: masks and shares over a {k}-regular graph (`secagg.neighbors: {k}`)",
            "",
            "Bell et al. 2020: each client pairs with k neighbours on a ring drawn from a public seed "
            "instead of all n - 1 clients, and t counts share holders of one neighbourhood (k + 1). Every "
            "stage runs for every client and the sums are checked exact; dropouts as above.",
            "",
            *_table(
                [
                    "dropped",
                    "t (of k + 1)",
                    "outcome",
                    "bytes up / plain",
                    "client time / local epoch",
                    "server time / plain mean",
                ]
            ),
        ]
        for r in plus:
            if r["status"] == "aborted":
                lines.append(f"| {r['drop']:.0%} | {r['t']} | aborted: `{r['error']}` | | | |")
                continue
            exact = "" if r.get("exact") else " (SUM MISMATCH)"
            lines.append(
                f"| {r['drop']:.0%} | {r['t']} | {r['status']}{exact}, {r['survivors']} survivors | "
                f"{r['up'] / plain_up:.3g} | {r['client_s'] / train_s:.3g} | "
                f"{r['server_s'] / (r['plain_s'] or float('nan')):.3g} |"
            )
        lines += [
            "",
            "A neighbourhood that loses more than k + 1 - t members cannot be unmasked, so at high dropout "
            "rates SecAgg+ needs a larger k or a lower t; the masked vector still dominates the bytes.",
            "",
        ]
    if accuracy:
        ref = accuracy[0]
        lines += [
            "## End to end: FedAvg on MNIST with and without secure aggregation",
            "",
            f"{ref.get('rounds', '?')} rounds; 100 clients (Dirichlet 0.5), 10 per round, MLP 784-200-10, "
            "one local epoch, same seed; "
            "bytes are up + down over the run, protocol stages included; wall is the whole run.",
            "",
            *_table(
                [
                    "run",
                    "global accuracy",
                    "client accuracy (mean)",
                    "bytes / plain FedAvg",
                    "wall / plain FedAvg",
                    "aborted rounds",
                    "recovered clients",
                ]
            ),
        ]
        for r in accuracy:
            lines.append(
                f"| {r['label']} | {r['global_accuracy']:.4f} | {r['accuracy_mean']:.4f} | "
                f"{r['bytes'] / ref['bytes']:.3g} | {r['wall'] / ref['wall']:.3g} | {r['aborted']} | "
                f"{r['recovered']} |"
            )
        lines += [
            "",
            "The first two rows are the same computation up to 16-bit quantisation of the updates. The last "
            "two aggregate different clients (clients lost mid-protocol, rounds aborted below t = 7 of 10 "
            "keep the previous model), so their accuracies differ by chance at this number of rounds.",
            "",
        ]
    lines += ["## CKKS (TenSEAL) at 10 clients: one FedAvg round on MNIST", ""]
    if "secagg_status" in ckks:
        lines += [
            *_table(
                [
                    "bytes up / plain",
                    "encrypt time / local epoch",
                    "server sum time / plain mean",
                    "decrypt (sum) time / local epoch",
                    "max abs diff to plain FedAvg",
                ]
            ),
            f"| {ckks['secagg_bytes_up_per_client'] / ckks['plain_up']:.3g} | "
            f"{ckks['secagg_encrypt_seconds'] / ckks['train_s']:.3g} | "
            f"{ckks['secagg_server_seconds'] / plain_of.get(10, float('nan')):.3g} | "
            f"{ckks['secagg_decrypt_seconds'] / ckks['train_s']:.3g} | {ckks['max_abs_diff']:.2g} |",
            "",
            "CKKS with poly degree 8192 (4096 slots per ciphertext), scale 2^40; the server adds "
            "ciphertexts under the public context and one key holder decrypts only the sum.",
        ]
    else:
        lines.append(f"not run: {ckks.get('status')}")
    cmd = " ".join(["fedmtl bench secagg", *argv])
    lines += ["", f"Whole benchmark: {minutes:.1f} min wall. Reproduce: `{cmd}`.", ""]
    return "\n".join(lines)
