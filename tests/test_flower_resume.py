"""A Flower run survives its server and its nodes: the ServerApp checkpoints after every round and
a restarted one continues from the last checkpoint; nodes keep client state on their own disk, in
versions by round, so repeated rounds start where they first started and a restarted node finds
its state. Over the in-process Grid of ``test_flower.py`` (real ClientApp, Flower's wire format)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

flwr = pytest.importorskip("flwr", reason="Flower is not installed (pip install 'fedmtl[flower]')")

from flwr.app import RecordDict  # noqa: E402

import fedmtl  # noqa: E402
from fedmtl.config import parse_config  # noqa: E402
from fedmtl.errors import ConfigError  # noqa: E402
from fedmtl.experiment.records import RunDir  # noqa: E402
from fedmtl.flower.server import FlowerServer, run_on_grid  # noqa: E402
from tests.test_flower import LoopbackGrid, _cfg, _fast, _nodes, _task_identity, assert_same_metrics  # noqa: E402, F401


class ServerKilled(Exception):
    """Stands for the ServerApp process dying: nothing after it runs."""


def _kill_at(group: str):
    def hook(grid: LoopbackGrid, msg: Any) -> None:
        if msg.metadata.group_id == group:
            raise ServerKilled(group)

    return hook


def _raw(algorithm: dict[str, Any]) -> dict[str, Any]:
    return _cfg(data__partition__num_clients=3, train__rounds=4, algorithm=algorithm)


@pytest.mark.parametrize("killed_at", ["3", "4", "4.eval"], ids=["round3", "round4", "final-eval"])
@pytest.mark.parametrize(
    "algorithm",
    [{"name": "ditto", "lam": 0.1}, {"name": "fedrep"}, {"name": "fedavg"}],
    ids=lambda a: a["name"],
)
def test_a_killed_server_resumes_to_the_metrics_of_an_uninterrupted_run(tmp_path, algorithm, killed_at):
    raw = _raw(algorithm)
    expected = fedmtl.run(raw, out=tmp_path / "inproc")
    out = tmp_path / "flower"
    first = LoopbackGrid(_nodes(3))
    first.on_push = _kill_at(killed_at)
    with pytest.raises(ServerKilled):
        FlowerServer(first, parse_config(raw), _fast()).run(out=out)
    assert (out / "checkpoint.tree").is_file()
    # a new ServerApp (a new Flower run: the nodes' context.state is empty), the same node disks
    second = LoopbackGrid(_nodes(3), state_dir=first.state_dir)
    res = run_on_grid(second, {"resume": True, "out": str(out), "round-timeout": 5.0, "node-timeout": 1.0,
                               "poll-interval": 0.01})  # fmt: skip
    assert_same_metrics(expected.run_dir, res.run_dir)
    assert res.summary["complete"] and res.summary["final"]["round"] == 4


def test_a_restarted_node_finds_its_client_state_on_its_disk(tmp_path):
    raw = _raw({"name": "ditto", "lam": 0.1})
    expected = fedmtl.run(raw, out=tmp_path / "inproc")
    grid = LoopbackGrid(_nodes(3))

    def restart_node_1(g: LoopbackGrid, msg: Any) -> None:
        if msg.metadata.group_id == "3" and msg.metadata.dst_node_id == 101:
            old = g.contexts[101]  # the SuperNode process dies: its memory (context.state) with it
            g.contexts[101] = flwr.app.Context(
                run_id=1, node_id=101, node_config=old.node_config, state=RecordDict(), run_config={}
            )

    grid.on_push = restart_node_1
    got = FlowerServer(grid, parse_config(raw), _fast()).run(out=tmp_path / "flower")
    assert_same_metrics(expected.run_dir, got.run_dir)


def test_resume_of_a_finished_run_returns_it_and_bad_resumes_are_one_line(tmp_path):
    raw = _raw({"name": "fedavg"})
    grid = LoopbackGrid(_nodes(3))
    done = FlowerServer(grid, parse_config(raw), _fast()).run(out=tmp_path / "flower")
    again = run_on_grid(LoopbackGrid(_nodes(3)), {"resume": True, "out": str(done.run_dir)})
    assert again.summary == done.summary
    inproc = fedmtl.run(raw, out=tmp_path / "inproc")
    with pytest.raises(ConfigError, match="has no flower-run.json; it is not a Flower run to continue"):
        run_on_grid(LoopbackGrid(_nodes(3)), {"resume": True, "out": str(inproc.run_dir)})
    with pytest.raises(ConfigError, match="resume = true needs out = the run directory"):
        FlowerServer(grid, parse_config(raw), _fast(resume=True)).run()
    assert RunDir.open(done.run_dir).read_summary()["complete"]


def test_nodes_forget_state_versions_the_server_will_not_go_back_to(tmp_path):
    from fedmtl.flower.node_state import NodeStates

    store = NodeStates(Path(tmp_path), "run-1", 0)
    for r in (1, 2, 3):
        store.put(r, {"r": r}, committed=r - 1)
    assert sorted(store.versions) == [2, 3]  # 1 is older than the newest committed version (2)
    again = NodeStates(Path(tmp_path), "run-1", 0)  # a restarted node reads them back
    assert again.before(3) == {"r": 2} and again.upto(3) == {"r": 3} and again.before(2) is None
    again.put(3, {"r": 30}, committed=2)  # a repeated round replaces what it wrote the first time
    assert again.upto(9) == {"r": 30}
    with pytest.raises(ConfigError, match="bad run key"):
        NodeStates(Path(tmp_path), "../x", 0)


def test_the_warm_worker_computes_what_the_clientapp_computes(tmp_path):
    """Messages handed to the node's long-lived worker give the metrics of the in-process run."""
    from fedmtl.flower import worker

    raw = _raw({"name": "ditto", "lam": 0.1})
    raw["train"]["rounds"] = 2
    expected = fedmtl.run(raw, out=tmp_path / "inproc")
    configs = [{**c, "warm": True, "state-dir": str(tmp_path / f"node-{i}")} for i, c in enumerate(_nodes(3))]
    grid = LoopbackGrid(configs)
    try:
        got = FlowerServer(grid, parse_config(raw), _fast()).run(out=tmp_path / "flower")
        for context in grid.contexts.values():
            assert worker.socket_path(dict(context.node_config)).exists()  # one worker per node
    finally:
        stopped = [worker.stop(dict(ctx.node_config)) for ctx in grid.contexts.values()]
    assert stopped == [True, True, True]
    assert_same_metrics(expected.run_dir, got.run_dir)


def test_a_restarted_supernode_with_a_new_node_id_takes_over_its_client_and_state(tmp_path):
    """SuperNode 1 dies between rounds and comes back as a new node (new id, same node_config and
    disk): the server finds the old node silent, hands client 1 to the new one, and the run ends with
    the uninterrupted metrics, so the new node trained from the state the old one left on disk."""
    raw = _raw({"name": "ditto", "lam": 0.1})
    expected = fedmtl.run(raw, out=tmp_path / "inproc")
    grid = LoopbackGrid(_nodes(3))

    def restart_node_1(g: LoopbackGrid, msg: Any) -> None:
        if msg.metadata.group_id == "2" and 103 not in g.contexts and msg.metadata.dst_node_id == 102:
            g.silent.add(101)  # the old process is gone, the SuperLink still lists it for a while
            old = g.contexts[101]
            g.contexts[103] = flwr.app.Context(
                run_id=1, node_id=103, node_config=old.node_config, state=RecordDict(), run_config={}
            )

    grid.on_push = restart_node_1
    got = FlowerServer(grid, parse_config(raw), _fast()).run(out=tmp_path / "flower")
    assert_same_metrics(expected.run_dir, got.run_dir)
    assert got.summary["nodes"]["1"] == 103


def test_a_flower_resume_refuses_a_changed_config_unless_accepted_and_records_it(tmp_path):
    import yaml

    from fedmtl.errors import RunDirError

    raw = _raw({"name": "fedavg"})
    out = tmp_path / "flower"
    first = LoopbackGrid(_nodes(3))
    first.on_push = _kill_at("3")
    with pytest.raises(ServerKilled):
        FlowerServer(first, parse_config(raw), _fast()).run(out=out)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["train"]["lr"] = 0.5  # someone else's config.yaml
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    rc = {"resume": True, "out": str(out), "round-timeout": 5.0, "node-timeout": 1.0, "poll-interval": 0.01}
    with pytest.raises(RunDirError, match=r"will not resume: config.yaml differs .*\(train.lr 0.1 -> 0.5\)"):
        run_on_grid(LoopbackGrid(_nodes(3), state_dir=first.state_dir), rc)
    res = run_on_grid(LoopbackGrid(_nodes(3), state_dir=first.state_dir), {**rc, "accept-mismatch": True})
    assert res.summary["complete"] and "train.lr 0.1 -> 0.5" in (out / "resumes.jsonl").read_text()
