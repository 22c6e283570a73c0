"""Flower deployment on loopback: a real SuperLink and two SuperNodes, `flwr run`, faults.

Slow (Flower starts a process per message and polls every few seconds) but run in CI. Every process
is started in its own process group and stopped by PID in a finalizer, also when a test fails; the
tests check that nothing is left running."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'fedmtl[flower]')")
if shutil.which("flower-superlink", path=str(Path(sys.executable).parent)) is None:
    pytest.skip("flower-superlink is not installed next to this Python", allow_module_level=True)

import fedmtl  # noqa: E402
from fedmtl.config import load_config  # noqa: E402
from fedmtl.flower.local import LocalFederation  # noqa: E402
from tests.test_flower import assert_same_metrics  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "flower_app"
EXAMPLE = ROOT / "examples" / "flower_digits.yaml"
# Small local work: the round time is Flower's (process start, polling), not training.
OVERRIDES = ["train.rounds=2", "train.local_steps=10"]


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Callable[[int], LocalFederation]]:
    """Start SuperLink + n SuperNodes on free loopback ports; always stopped and checked afterwards."""
    started: list[LocalFederation] = []

    def start(n: int, configs: list[dict[str, Any]] | None = None, database: bool = False) -> LocalFederation:
        fed = LocalFederation(
            tmp_path / "flower",
            configs or [{"partition-id": i, "num-partitions": n} for i in range(n)],
            database=database,
        )
        started.append(fed)
        return fed.start()

    yield start  # type: ignore[misc]
    for fed in started:
        fed.stop()
    left = {pid for fed in started for pid in fed.alive()}
    assert not left, f"processes still running after stop: {sorted(left)}"


def _run_config(tmp_path: Path, overrides: list[str] = OVERRIDES, **extra: Any) -> dict[str, Any]:
    return {
        "config": str(EXAMPLE),
        "overrides": "; ".join(overrides),
        "out": str(tmp_path / "flower-run"),
        "poll-interval": 0.1,
        **extra,
    }


def _round_times(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["exchange_time"] for r in rows if r["kind"] == "round"]


@pytest.mark.parametrize(
    "extra",
    [[], ["algorithm.name=fedper", "data.tasks=[digit, parity]"]],
    ids=["fedavg", "fedper-multitask"],
)
def test_two_rounds_on_loopback_equal_the_in_process_run(tmp_path, federation, extra):
    overrides = OVERRIDES + extra
    expected = fedmtl.run(load_config(EXAMPLE, overrides), out=tmp_path / "inproc")  # before Flower's CPU use
    fed = federation(2)
    t0 = time.perf_counter()
    proc = fed.run(APP, _run_config(tmp_path, overrides, **{"round-timeout": 150.0}), timeout=300)
    wall = time.perf_counter() - t0
    run_dir = tmp_path / "flower-run"
    assert proc.returncode == 0 and (run_dir / "summary.json").is_file(), fed.logs()
    assert_same_metrics(expected.run_dir, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["engine"] == "flower" and sorted(summary["nodes"]) == ["0", "1"]
    print(f"\nloopback: flwr run {wall:.1f} s; exchange per round {_round_times(run_dir)} s")


def test_a_supernode_killed_mid_round_is_recorded_and_training_continues(tmp_path, federation):
    fed = federation(2)
    run_dir = tmp_path / "flower-run"
    proc = fed.submit(APP, _run_config(tmp_path, **{"round-timeout": 45.0, "suspect-grace": 3.0}))
    events = run_dir / "flower.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.popen.poll() is None:
        if events.is_file() and any(
            json.loads(x).get("group") == "1" for x in events.read_text().splitlines()
        ):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"round 1 never started:\n{fed.logs()}")
    fed.kill_node(1, signal.SIGKILL)  # mid-round: round 1's messages are out, node 1 dies with its ClientApp
    out = fed.wait(proc, timeout=240)
    assert out.returncode == 0 and (run_dir / "summary.json").is_file(), fed.logs()

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = {r["round"]: r for r in rows if r["kind"] == "round"}
    assert rounds[1]["missing_clients"] == [1], rounds[1]
    assert rounds[2]["missing_clients"] == [1], rounds[2]
    trained = [(r["round"], r["client"]) for r in rows if r["kind"] == "train" and not r.get("missing")]
    assert trained == [(1, 0), (2, 0)]  # the surviving node kept training
    evaluated = [(r["round"], r["client"]) for r in rows if r["kind"] == "client"]
    assert evaluated == [(1, 0), (2, 0)]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] and summary["final"]["round"] == 2
    assert summary["final"]["accuracy_mean"] > 0.1
    print(f"\nfaults: exchange per round {_round_times(run_dir)} s (round-timeout 45 s, suspect-grace 3 s)")


def test_four_sites_with_only_their_own_files_and_a_server_without_data(tmp_path, federation):
    """The server reads federation.json (no samples); SuperNode i reads only node-i/client.npz."""
    from fedmtl.cli import main

    overrides = [*OVERRIDES, "data.partition.num_clients=4"]
    cfg = load_config(EXAMPLE, overrides)
    expected = fedmtl.run(cfg, out=tmp_path / "inproc")
    sites = tmp_path / "sites"
    assert main(["flower", "split", str(EXAMPLE), str(sites), *(f"--set={o}" for o in overrides)]) == 0
    fed = federation(4, [{"partition-id": i, "data-path": str(sites / f"node-{i}")} for i in range(4)])
    server = [*overrides, f"data={{dataset: federation, file: {sites / 'federation.json'}}}"]
    proc = fed.run(APP, _run_config(tmp_path, server, **{"round-timeout": 150.0}), timeout=400)
    run_dir = tmp_path / "flower-run"
    assert proc.returncode == 0 and (run_dir / "summary.json").is_file(), fed.logs()
    assert_same_metrics(expected.run_dir, run_dir)
    print(f"\nfour sites: exchange per round {_round_times(run_dir)} s")


def test_a_node_whose_files_do_not_match_federation_json_stops_flower_run_in_one_line(tmp_path, capsys):
    """fedmtl flower run with node 1 holding node 0's client.npz: the node says why at the handshake,
    the command exits 2 with that one line, no run folder is written and no process is left."""
    from fedmtl.cli import main

    overrides = [*OVERRIDES, "data.partition.num_clients=2"]
    sites = tmp_path / "sites"
    assert main(["flower", "split", str(EXAMPLE), str(sites), *(f"--set={o}" for o in overrides)]) == 0
    shutil.copy(sites / "node-0" / "client.npz", sites / "node-1" / "client.npz")
    capsys.readouterr()
    out, work = tmp_path / "run", tmp_path / "flower"
    argv = [
        "flower",
        "run",
        str(EXAMPLE),
        "--node-data",
        str(sites),
        "--out",
        str(out),
        "--workdir",
        str(work),
    ]
    code = main([*argv, *(f"--set={o}" for o in overrides), "--timeout", "300"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "flower: node " in err and "(client 1) cannot run this config: data path " in err, err
    assert "train samples, the federation description says" in err
    assert not out.exists()


def test_a_killed_superlink_and_serverapp_resume_to_the_uninterrupted_metrics(tmp_path, federation):
    """Kill the SuperLink (with its ServerApp) once round 2 is checkpointed, start it again, submit
    the run with resume = true: it finishes with the metrics of an uninterrupted run. Ditto, so the
    nodes' personal models must survive on their disks and repeated rounds start where they did."""
    from fedmtl.experiment.records import RunDir

    overrides = ["train.rounds=4", "train.local_steps=10", "algorithm.name=ditto"]
    expected = fedmtl.run(load_config(EXAMPLE, overrides), out=tmp_path / "inproc")
    fed = federation(2, database=True)
    run_dir = tmp_path / "flower-run"
    rc = _run_config(tmp_path, overrides, **{"round-timeout": 150.0})
    proc = fed.submit(APP, rc)
    ckpt, deadline = run_dir / "checkpoint.tree", time.monotonic() + 300
    while not (ckpt.is_file() and RunDir(run_dir).load_checkpoint()["round"] >= 2):
        assert time.monotonic() < deadline and proc.popen.poll() is None, fed.logs()
        time.sleep(0.2)
    fed.kill_superlink()  # the ServerApp dies with it, mid-round 3 or 4
    proc.popen.kill()
    proc.popen.wait(timeout=30)
    t0 = time.perf_counter()
    fed.restart_superlink()
    dead = json.loads((run_dir / "flower-run.json").read_text())["flower_run_ids"][-1]
    assert fed.stop_run(dead).returncode == 0  # so the SuperLink drops the dead run's queued messages
    resumed = fed.run(APP, {**rc, "resume": True}, timeout=400)
    assert resumed.returncode == 0 and (run_dir / "summary.json").is_file(), fed.logs()
    assert_same_metrics(expected.run_dir, run_dir)
    print(f"\nresume: killed after checkpoint 2, restarted and finished in {time.perf_counter() - t0:.1f} s")


def test_a_killed_and_restarted_supernode_keeps_its_client_state(tmp_path, federation):
    """Ditto, one client per round (seed 4 samples client 1 in rounds 1, 3 and 7 only): SuperNode 1
    is killed with SIGKILL when round 4 starts and started again; the new node (a new node id, the same
    disk) takes client 1 over and round 7 trains its personal model from the state the killed process
    left, so the run ends with the in-process metrics (a lost state would restart it from scratch)."""
    overrides = [
        "train.rounds=8",
        "train.local_steps=30",
        "algorithm.name=ditto",
        "clients.per_round=1",
        "eval.every=8",
        "seed=4",
    ]
    expected = fedmtl.run(load_config(EXAMPLE, overrides), out=tmp_path / "inproc")
    fed = federation(2)
    run_dir = tmp_path / "flower-run"
    proc = fed.submit(APP, _run_config(tmp_path, overrides, **{"round-timeout": 150.0}))
    events, deadline = run_dir / "flower.jsonl", time.monotonic() + 300
    while not (
        events.is_file() and any(json.loads(x).get("group") == "4" for x in events.read_text().splitlines())
    ):
        assert time.monotonic() < deadline and proc.popen.poll() is None, fed.logs()
        time.sleep(0.1)
    fed.restart_node(1)
    out = fed.wait(proc, timeout=400)
    assert out.returncode == 0 and (run_dir / "summary.json").is_file(), fed.logs()
    assert_same_metrics(expected.run_dir, run_dir)
    first = next(json.loads(x) for x in events.read_text().splitlines() if '"nodes"' in x)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["nodes"]["1"] != first["clients"]["1"]  # client 1 ended on the restarted node
