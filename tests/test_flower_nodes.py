"""Each node holds only its own data, the server none: a federation description and per-node files.

Over the in-process Grid of ``test_flower.py`` (real ClientApp, Flower's wire encoding): the server
builds everything from ``federation.json`` and each node reads only its own ``node-<i>`` folder, and
the metrics equal the in-process run on the full dataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'fedmtl[flower]')")

import fedmtl  # noqa: E402
from fedmtl.cli import main  # noqa: E402
from fedmtl.config import parse_config  # noqa: E402
from fedmtl.data import load_federated  # noqa: E402
from fedmtl.data.description import FILE, describe, load_described, node_client, write_node_folders  # noqa: E402
from fedmtl.errors import ConfigError, DataError  # noqa: E402
from tests.test_flower import LoopbackGrid, _cfg, _flower_run, _task_identity, assert_same_metrics  # noqa: E402, F401


def _split(tmp_path: Path, raw: dict) -> Path:
    cfg = parse_config(raw)
    return write_node_folders(load_federated(cfg.data, cfg.seed), tmp_path / "sites")


def _server_raw(raw: dict, sites: Path) -> dict:
    out = json.loads(json.dumps(raw))
    out["data"] = {"dataset": "federation", "file": str(sites / FILE)}
    return out


def _site_nodes(sites: Path, n: int) -> list[dict]:
    return [{"partition-id": i, "data-path": str(sites / f"node-{i}")} for i in range(n)]


@pytest.mark.parametrize(
    "over",
    [
        {"algorithm": {"name": "fedavg"}},
        {"algorithm": {"name": "fedper"}, "data__tasks": ["digit", "parity"]},
        {"algorithm": {"name": "ditto"}},
    ],
    ids=["fedavg", "fedper-multitask", "ditto"],
)
def test_nodes_with_only_their_own_files_equal_the_in_process_run(tmp_path, over):
    raw = _cfg(data__partition__num_clients=4, train__rounds=3, **over)
    expected = fedmtl.run(raw, out=tmp_path / "inproc")
    sites = _split(tmp_path, raw)
    got = _flower_run(tmp_path, _server_raw(raw, sites), LoopbackGrid(_site_nodes(sites, 4)))
    assert_same_metrics(expected.run_dir, got.run_dir)
    # the server's folder holds no samples: only the description and the global test set
    assert {p.name for p in sites.iterdir() if p.is_file()} <= {"federation.json", "global_test.npz"}


def test_the_server_view_has_counts_and_tasks_but_no_samples(tmp_path):
    raw = _cfg(data__partition__num_clients=4, data__tasks=["digit", "parity"])
    cfg = parse_config(raw)
    full = load_federated(cfg.data, cfg.seed)
    sites = write_node_folders(full, tmp_path / "sites")
    server = load_described(sites)
    assert server.num_clients == 4 and server.input_shape == full.input_shape
    assert server.tasks == full.tasks and server.task_names() == full.task_names()
    assert list(server.train_sizes()) == list(full.train_sizes())
    assert all(len(c.x_train) == 0 and len(c.y_test) == 0 for c in server.clients)
    assert describe(server)["train_samples"] == describe(full)["train_samples"]
    own = node_client(sites / "node-2", server, 2)
    np.testing.assert_array_equal(own.x_train, full.clients[2].x_train)
    np.testing.assert_array_equal(own.y_test, full.clients[2].y_test)


def test_a_node_reads_a_plain_npz_of_its_arrays(tmp_path):
    raw = _cfg(data__partition__num_clients=3)
    sites = _split(tmp_path, raw)
    server = load_described(sites)
    with np.load(sites / "node-1" / "client.npz") as z:
        np.savez(tmp_path / "mine.npz", **{k: z[k] for k in z.files})
    got = node_client(tmp_path / "mine.npz", server, 1)
    assert got.n_train == server.clients[1].n_train


def test_a_node_whose_files_disagree_with_the_description_is_one_line(tmp_path):
    raw = _cfg(data__partition__num_clients=3)
    sites = _split(tmp_path, raw)
    server = load_described(sites)
    with pytest.raises(DataError) as exc:
        node_client(sites / "node-0", server, 1)  # client 0's files at the node for client 1
    n0, n1 = server.clients[0].n_train, server.clients[1].n_train
    assert str(exc.value) == (
        f"data path {sites / 'node-0' / 'client.npz'}: client 1 has {n0} train samples, the federation "
        f"description says {n1}"
    )
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((3, 5)), y_train=np.zeros(3))
    with pytest.raises(DataError, match=r"bad.npz: no array 'x_test' \(a node's .npz holds"):
        node_client(tmp_path / "bad.npz", server, 0)
    with pytest.raises(DataError, match="not found, or not a client.npz"):
        node_client(tmp_path / "nowhere", server, 0)


def test_a_node_failing_to_read_its_files_stops_the_run_naming_it(tmp_path):
    raw = _cfg(data__partition__num_clients=2, train__rounds=1)
    sites = _split(tmp_path, raw)
    shutil.copy(sites / "node-0" / "client.npz", sites / "node-1" / "client.npz")
    from fedmtl.flower.server import FlowerRunError

    with pytest.raises(  # at the handshake, before round 1 and before any run folder
        FlowerRunError,
        match=r"^node 101 \(client 1\) cannot run this config: data path .*node-1/client.npz: client 1 has "
        r"\d+ train samples, the federation description says \d+$",
    ):
        _flower_run(tmp_path, _server_raw(raw, sites), LoopbackGrid(_site_nodes(sites, 2)))
    assert not (tmp_path / "flower").exists()


def test_a_node_without_a_data_path_is_told_what_to_start_it_with(tmp_path):
    raw = _cfg(data__partition__num_clients=2, train__rounds=1)
    sites = _split(tmp_path, raw)
    from fedmtl.flower.server import FlowerRunError

    nodes = [{"partition-id": 0, "data-path": str(sites / "node-0")}, {"partition-id": 1}]
    with pytest.raises(FlowerRunError, match="node_config: 'data-path' is missing; this run's data lives"):
        _flower_run(tmp_path, _server_raw(raw, sites), LoopbackGrid(nodes))


def test_a_described_federation_does_not_run_in_process(tmp_path):
    sites = _split(tmp_path, _cfg(data__partition__num_clients=2))
    with pytest.raises(ConfigError, match="its samples are on the Flower nodes, not here"):
        fedmtl.run(_server_raw(_cfg(), sites), out=tmp_path / "r")
    with pytest.raises(ConfigError, match="data.holdout_clients: dataset 'federation' keeps"):
        raw = _server_raw(_cfg(), sites)
        raw["data"]["holdout_clients"] = 1
        load_federated(parse_config(raw).data, 0)


def test_fedmtl_flower_split_writes_the_folders_and_says_how_to_start(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {dataset: digits, partition: {num_clients: 3}}\n")
    assert main(["flower", "split", str(cfg), str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "3 node folders" in text and "data-path" in text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "federation.json",
        "global_test.npz",
        "node-0",
        "node-1",
        "node-2",
    ]
    desc = json.loads((tmp_path / "out" / FILE).read_text())
    assert desc["provenance"]["command"].startswith("fedmtl flower split")
    assert main(["flower", "split", str(cfg), str(tmp_path / "out")]) == 2  # never overwritten
    assert "already exists and is not empty" in capsys.readouterr().err


def _digits_writers(root: Path) -> Path:
    from sklearn.datasets import load_digits

    from tests.leaf_files import image_writers

    d = load_digits()
    return image_writers(root, d.images / 16.0, d.target, writers=4)


def test_nodes_reading_leaf_json_equal_the_in_process_run(tmp_path):
    """Each node's data-path is LEAF data (train/ and test/ JSON); the node picks its user by name."""
    leaf = _digits_writers(tmp_path / "leaf")
    raw = _cfg(train__rounds=2, eval__global_test=False)  # LEAF's global test set is the users' tests
    raw["data"] = {"dataset": "leaf", "file": str(leaf), "input_shape": [1, 8, 8]}
    raw["model"] = {"name": "cnn", "channels": [4, 8], "fc": 16}
    expected = fedmtl.run(raw, out=tmp_path / "inproc")
    cfg = parse_config(raw)
    desc = tmp_path / "federation.json"
    desc.write_text(json.dumps(describe(load_federated(cfg.data, cfg.seed)), default=str))
    nodes = [{"partition-id": i, "data-path": str(leaf)} for i in range(4)]
    got = _flower_run(tmp_path, _server_raw(raw, tmp_path), LoopbackGrid(nodes))
    assert_same_metrics(expected.run_dir, got.run_dir)


def test_a_node_reads_its_user_of_leaf_text_through_the_federations_vocabulary(tmp_path):
    from tests.leaf_files import text_roles

    leaf = text_roles(tmp_path / "text", roles=3, samples=40)
    cfg = parse_config({"data": {"dataset": "leaf", "file": str(leaf)}})
    full = load_federated(cfg.data, 0)
    server = load_described_from(tmp_path, full)
    for cid in range(3):
        own = node_client(leaf, server, cid)
        np.testing.assert_array_equal(own.x_train, full.clients[cid].x_train)
        np.testing.assert_array_equal(own.y_test, full.clients[cid].y_test)
    server.clients[1].name = "NOBODY"
    with pytest.raises(DataError, match="holds 3 LEAF users and none is 'NOBODY', the user of client 1"):
        node_client(leaf, server, 1)


def load_described_from(tmp_path: Path, data):
    path = tmp_path / "federation.json"
    path.write_text(json.dumps(describe(data), default=str))
    return load_described(path)
