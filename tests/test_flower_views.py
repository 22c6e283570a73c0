"""What leaves the server is what the client needs: no message to client A carries client B's
personal parameters, another task's or group's head, or anyone else's row of a per-client matrix.

Every message the ServerApp pushes is decoded (the algorithm's message and the evaluation view) and
checked against the federation: by name (heads of other tasks), by shape (MOCHA's W), and by value
(every array a node holds in its client state that the server never sent it is personal: it must
not reach another node)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'fedmtl[flower]')")

from fedmtl.algorithms.heads import SEP  # noqa: E402
from fedmtl.config import parse_config  # noqa: E402
from fedmtl.data import load_federated  # noqa: E402
from fedmtl.flower import codec, protocol  # noqa: E402
from tests.test_flower import LoopbackGrid, _cfg, _flower_run, _nodes, _task_identity  # noqa: E402, F401

PERSONALISED = [
    "fedavg",
    "fedper",
    "fedrep",
    "ditto",
    "apfl",
    "lg_fedavg",
    "fedbabu",
    "fedavg_ft",
    "hierarchical",
]


def _leaves(tree: Any, path: str = "") -> list[tuple[str, np.ndarray]]:
    if isinstance(tree, dict):
        return [leaf for k, v in tree.items() for leaf in _leaves(v, f"{path}/{k}")]
    if isinstance(tree, list | tuple):
        return [leaf for i, v in enumerate(tree) for leaf in _leaves(v, f"{path}/{i}")]
    if isinstance(tree, np.ndarray) and tree.size > 1:
        return [(path, tree)]
    return []


def _sent(grid: LoopbackGrid) -> dict[int, list[tuple[str, np.ndarray]]]:
    """Record every array pushed to each node (message and evaluation view)."""
    sent: dict[int, list[tuple[str, np.ndarray]]] = defaultdict(list)

    def record(_: LoopbackGrid, msg: Any) -> None:
        node, content = msg.metadata.dst_node_id, msg.content
        if codec.has_message(content, protocol.MSG):
            m = codec.get_message(content, protocol.MSG)
            sent[node] += [(f"msg/{k}", np.array(v)) for k, v in m.arrays.items()]
        if codec.has_tree(content, protocol.EVAL_VIEW):
            sent[node] += _leaves(codec.get_tree(content, protocol.EVAL_VIEW), "view")

    grid.on_push = record
    return sent


def _key(a: np.ndarray) -> tuple[Any, ...]:
    return (a.shape, np.ascontiguousarray(a, dtype=np.float64).tobytes())


@pytest.mark.parametrize("algorithm", PERSONALISED)
def test_no_message_to_a_client_carries_another_clients_or_tasks_parameters(tmp_path, algorithm):
    raw = _cfg(
        data__partition__num_clients=4,
        data__tasks=["digit", "parity"],
        train__rounds=3,
        algorithm={"name": algorithm},
    )
    cfg = parse_config(raw)
    tasks = load_federated(cfg.data, cfg.seed).task_names()
    grid = LoopbackGrid(_nodes(4))
    sent = _sent(grid)
    _flower_run(tmp_path, raw, grid)
    node_of = {100 + c: c for c in range(4)}
    assert set(sent) == set(node_of)
    # by name: a client of task T sees no other task's head (nor another group's)
    for node, arrays in sent.items():
        mine = tasks[node_of[node]]
        for path, _ in arrays:
            name = path.rsplit("/", 1)[-1]
            if SEP in name:
                assert name.split(SEP)[0] == mine, (algorithm, node, path)
    # by value: what a node holds that the server never sent it is personal; no one else gets it
    received = {node: {_key(a) for _, a in arrays} for node, arrays in sent.items()}
    for node, context in grid.contexts.items():
        if not codec.has_tree(context.state, protocol.STATE):
            continue
        state = codec.get_tree(context.state, protocol.STATE)
        personal = {_key(a) for _, a in _leaves(state)} - received[node]
        for other, keys in received.items():
            if other != node:
                assert not personal & keys, (algorithm, node, other)


def test_mocha_sends_each_client_only_its_own_row_of_w(tmp_path, shared_data):
    raw = {
        "name": "mocha-views",
        "seed": 1,
        "data": {"dataset": "landmine_small", "partition": {"kind": "natural"}, "max_clients": 3},
        "model": {"name": "linear"},
        "algorithm": {"name": "mocha", "lam": 1e-3, "inner": 1, "omega_steps": 1},
        "train": {"rounds": 2},
        "eval": {"every": 1, "global_test": False},
        "output": {"progress": False},
    }
    grid = LoopbackGrid(_nodes(3))
    sent = _sent(grid)
    _flower_run(tmp_path, raw, grid)
    for arrays in sent.values():
        assert arrays and all(a.ndim == 1 for _, a in arrays)  # a d-vector each, never the m x d matrix
        assert {p for p, _ in arrays} <= {"msg/w", "view/w_own"}
