"""A real Flower deployment on loopback: the per-exchange floor, cold vs warm nodes, and resume.

One SuperLink and 2 or 8 SuperNodes on 127.0.0.1 (``fedmtl.flower.local.LocalFederation``), each
node holding only its own client's files (``fedmtl flower split``; the server reads only
``federation.json``), FedAvg on digits with 2 local steps per round, so the time is Flower's and
fedmtl's per-message cost, not training. Per configuration: the median exchange of a round (one
train message per client, carrying the previous round's evaluation) and the wall time from
``flwr run`` to its end. ``cold``: every message computed in the fresh ClientApp process Flower
starts for it (import torch, read the node's files, build the model); ``warm``: the ClientApp hands
the message to the node's long-lived worker (``fedmtl.flower.worker``), which keeps them. Both in the
same run, so the ratio is what the worker saves on this machine. Then resume: Ditto over 2 nodes for
4 rounds, the SuperLink (with its ServerApp) killed once round 2 is checkpointed, restarted, and the
run submitted again with ``resume = true``, once as is and once after stopping the dead run through
Flower's Control API (``flwr stop`` with the id the run folder's ``flower-run.json`` records): the
seconds from the restart until the resumed ServerApp sends its first message (the handshake) and
the first repeated round's messages, and until the run ends.

Run with ``fedmtl bench flower_deploy [--quick]``; writes ``benchmarks/results/flower_deploy.md``."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "flower_app"
EXAMPLE = ROOT / "examples" / "flower_digits.yaml"


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def deployment(work: Path, nodes: int, warm: bool, rounds: int) -> dict[str, Any]:
    """One run on ``nodes`` SuperNodes with only their own files; exchange and wall times."""
    from fedmtl.cli import main
    from fedmtl.flower.local import LocalFederation

    tag = f"{nodes}-{'warm' if warm else 'cold'}"
    sites = work / f"sites-{nodes}"
    data = [f"data.partition.num_clients={nodes}"]
    if not sites.exists():
        assert main(["flower", "split", str(EXAMPLE), str(sites), *(f"--set={o}" for o in data)]) == 0
    configs = [{"partition-id": i, "data-path": str(sites / f"node-{i}"), "warm": warm} for i in range(nodes)]
    overrides = [
        f"train.rounds={rounds}",
        "train.local_steps=2",
        f"data={{dataset: federation, file: {sites / 'federation.json'}}}",
    ]
    run_dir = work / f"run-{tag}"
    with LocalFederation(work / f"flower-{tag}", configs) as fed:
        fed.start()
        rc = {"config": str(EXAMPLE), "overrides": "; ".join(overrides), "out": str(run_dir),
              "poll-interval": 0.1, "round-timeout": 300.0}  # fmt: skip
        t0 = time.perf_counter()
        proc = fed.run(APP, rc, timeout=1800)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{tag}: flwr run failed\n{fed.logs()}")
    rounds_rows = [r for r in _rows(run_dir) if r["kind"] == "round"]
    exchanges = [r["exchange_time"] for r in rounds_rows]
    return {
        "exchange_s": statistics.median(exchanges[1:] or exchanges),  # round 1 also starts the workers
        "first_s": exchanges[0],
        "wall_s": wall,
        "accuracy": rounds_rows[-1]["accuracy_mean"],
    }


def resume_timing(work: Path, stop_dead: bool) -> dict[str, float]:
    """Kill the SuperLink + ServerApp after checkpoint 2 of 4 (Ditto, 2 nodes), restart, resume
    (``stop_dead``: after stopping the killed run through Flower's API)."""
    from fedmtl.experiment.records import RunDir
    from fedmtl.flower.local import LocalFederation
    from fedmtl.flower.server import RUN_META

    tag = "stop" if stop_dead else "plain"
    run_dir = work / f"run-resume-{tag}"
    configs = [{"partition-id": i, "num-partitions": 2} for i in range(2)]
    overrides = ["train.rounds=4", "train.local_steps=10", "algorithm.name=ditto"]
    rc = {"config": str(EXAMPLE), "overrides": "; ".join(overrides), "out": str(run_dir),
          "poll-interval": 0.1, "round-timeout": 300.0}  # fmt: skip
    with LocalFederation(work / f"flower-resume-{tag}", configs, database=True) as fed:
        fed.start()
        proc = fed.submit(APP, rc)
        ckpt = run_dir / "checkpoint.tree"
        deadline = time.monotonic() + 900
        while not (ckpt.is_file() and RunDir(run_dir).load_checkpoint()["round"] >= 2):
            if time.monotonic() > deadline or proc.popen.poll() is not None:
                raise RuntimeError(f"resume: round 2 never checkpointed\n{fed.logs()}")
            time.sleep(0.1)
        done = RunDir(run_dir).load_checkpoint()["round"]
        fed.kill_superlink()
        proc.popen.kill()
        proc.popen.wait(timeout=30)
        t0, wall0 = time.perf_counter(), time.time()
        fed.restart_superlink()
        if stop_dead:
            dead = json.loads((run_dir / RUN_META).read_text())["flower_run_ids"][-1]
            stopped = fed.stop_run(dead)
            if stopped.returncode != 0:
                raise RuntimeError(f"resume: flwr stop {dead} failed\n{stopped.stdout}{stopped.stderr}")
        again = fed.submit(APP, {**rc, "resume": True})
        again.popen.wait(timeout=1800)
        end = time.perf_counter() - t0
        if again.popen.returncode != 0:
            raise RuntimeError(f"resume: the resumed run failed\n{fed.logs()}")
    rows = [r for r in _rows(run_dir) if r["kind"] == "round"]
    events = [json.loads(x) for x in (run_dir / "flower.jsonl").read_text().splitlines()]
    after = [e for e in events if e["t"] > wall0 and e.get("event") == "push"]
    pushed = [e["t"] for e in after if e.get("group") == str(done + 1)]
    first = (pushed[0] - wall0) if pushed else end
    first_message = (after[0]["t"] - wall0) if after else end
    return {
        "checkpoint": done,
        "first_message_s": first_message,
        "first_round_s": first,
        "finish_s": end,
        "rounds": len(rows),
    }


def _flwr_version() -> str:
    import flwr

    return str(flwr.__version__)


def main(argv: list[str]) -> Path:
    ap = argparse.ArgumentParser(prog="fedmtl bench flower_deploy")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--nodes", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--quick", action="store_true", help="2 nodes, 2 rounds, no resume: a smoke test")
    ap.add_argument(
        "--resume-only", action="store_true", help="only the resume measurements, printed (no table written)"
    )
    ap.add_argument("--out", default=str(RESULTS / "flower_deploy.md"))
    a = ap.parse_args(argv)
    if a.quick:
        a.rounds, a.nodes = 2, [2]
    work = Path(tempfile.mkdtemp(prefix="fedmtl-flower-bench-"))
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    measured: dict[tuple[int, bool], dict[str, Any]] = {}
    for nodes in [] if a.resume_only else a.nodes:
        for warm in (False, True):
            measured[(nodes, warm)] = m = deployment(work, nodes, warm, a.rounds)
            print(f"{nodes} nodes, {'warm' if warm else 'cold'}: {m}", flush=True)
    resume = None if a.quick else {stop: resume_timing(work, stop) for stop in (False, True)}
    print(f"resume: {resume}", flush=True)
    if a.resume_only:
        return Path(a.out)
    wall = time.perf_counter() - t_start
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    cmd = "fedmtl bench flower_deploy" + (
        " --quick" if a.quick else f" --rounds {a.rounds} --nodes " + " ".join(map(str, a.nodes))
    )
    lines = [
        "# Flower deployment on loopback: per-exchange floor, warm nodes, resume",
        "",
        f"Written by `{cmd}` on {time.strftime('%Y-%m-%d %H:%M')} at commit "
        f"{commit.stdout.strip() or 'unknown'}; {platform.machine()} machine, {os.cpu_count()} cores, "
        f"CPU only, shared with other jobs (1-minute load average {load_start:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end: above the core count, every time here stretches); "
        f"flwr {_flwr_version()}; {wall / 60:.1f} min wall.",
        "",
        f"FedAvg on digits, {a.rounds} rounds of 2 local steps, one SuperNode per client holding only its "
        "own `client.npz` (`fedmtl flower split`), the ServerApp reading only `federation.json`. `exchange` "
        "is the median round exchange after the first (train messages carrying the previous round's "
        "evaluation), `first` the first round's (it also starts the warm workers), `run` the wall time of "
        "`flwr run`. `cold`: `node_config warm=false`, each message computed in the fresh ClientApp "
        "process; `warm`: the node's long-lived worker computes it.",
        "",
        "| SuperNodes | mode | exchange s | vs cold | first round s | run s | accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for nodes in a.nodes:
        cold = measured[(nodes, False)]
        for warm in (False, True):
            m = measured[(nodes, warm)]
            lines.append(
                f"| {nodes} | {'warm' if warm else 'cold'} | {m['exchange_s']:.1f} "
                f"| {m['exchange_s'] / cold['exchange_s']:.2f}x | {m['first_s']:.1f} | {m['wall_s']:.0f} "
                f"| {m['accuracy']:.4f} |"
            )
    if resume is not None:
        lines += [
            "",
            "## Resume after a server kill",
            "",
            "Ditto, 2 SuperNodes, 4 rounds of 10 local steps; the SuperLink and its ServerApp killed "
            "(SIGKILL) once a round was checkpointed, a new SuperLink started on the same port and "
            "database, the run submitted again with `resume = true`: as is, or after `flwr stop` of the "
            "killed run (its id from the run folder's `flower-run.json`), so the SuperLink drops the "
            "dead run's queued messages instead of the nodes working them off first. Seconds from the "
            "restart until the resumed ServerApp sent its first message (the handshake), the first "
            "repeated round's messages, and until the run ended (target: first message under 20 s).",
            "",
            "| resubmitted | checkpointed round | first message s | first repeated round s | run end s "
            "| round rows |",
            "|---|---|---|---|---|---|",
        ]
        for stop, r in resume.items():
            lines.append(
                f"| {'after flwr stop of the dead run' if stop else 'as is'} | {r['checkpoint']} "
                f"| {r['first_message_s']:.1f} | {r['first_round_s']:.1f} | {r['finish_s']:.1f} "
                f"| {r['rounds']} |"
            )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"results: {out}")
    return out


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
