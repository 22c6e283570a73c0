"""MOCHA on the Flower runtime: two rounds over the in-process loopback Grid equal the simulator.

Each node keeps its client's dual variables in the Flower node state between messages."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'fedmtl[flower]')")
flower_tests = pytest.importorskip("tests.test_flower", reason="the Flower loopback Grid helpers")

import fedmtl  # noqa: E402
from fedmtl.flower import codec, protocol  # noqa: E402
from fedmtl.runtime.client_states import read_states  # noqa: E402

_task_identity = flower_tests._task_identity  # autouse fixture: Flower stamps messages with a task id


def test_mocha_two_rounds_on_flower_equal_the_simulator(tmp_path, shared_data):
    raw = {
        "name": "mocha-flower",
        "seed": 1,
        "data": {"dataset": "landmine_small", "partition": {"kind": "natural"}, "max_clients": 3},
        "model": {"name": "linear"},
        "algorithm": {"name": "mocha", "lam": 1e-3, "inner": 1, "omega_steps": 1},
        "train": {"rounds": 2},
        "runtime": {"work_fraction": [0.5, 1.0]},
        "eval": {"every": 1, "global_test": False},
        "output": {"progress": False},
    }
    expected = fedmtl.run(raw, out=tmp_path / "inproc")
    grid = flower_tests.LoopbackGrid(flower_tests._nodes(3))
    got = flower_tests._flower_run(tmp_path, raw, grid)
    flower_tests.assert_same_metrics(expected.run_dir, got.run_dir)
    clients = read_states(expected.run_dir)
    for i, context in enumerate(grid.contexts.values()):
        state = codec.get_tree(context.state, protocol.STATE)
        np.testing.assert_allclose(state["alpha"], clients[i]["alpha"], rtol=1e-12)
        assert np.count_nonzero(state["alpha"]) > 0
