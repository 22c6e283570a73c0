"""Flower adapter, fast: the ServerApp driver and ClientApp over an in-process Grid.

The Grid here pushes every message and context through Flower's own wire encoding and calls the real
ClientApp, so these tests check the protocol, the state handling and equality with the in-process
simulator in seconds; ``test_flower_deploy.py`` runs the same code on real SuperLink/SuperNodes."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

flwr = pytest.importorskip("flwr", reason="Flower is not installed (pip install 'fedmtl[flower]')")

from flwr.app import Error, RecordDict  # noqa: E402
from flwr.app import Message as FlowerMessage  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402
from flwr.common.serde import context_from_proto, context_to_proto  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects  # noqa: E402
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

import fedmtl  # noqa: E402
from fedmtl.algorithms import Message, algorithm_names  # noqa: E402
from fedmtl.algorithms.fedavg import FedAvg  # noqa: E402
from fedmtl.config import parse_config  # noqa: E402
from fedmtl.errors import ConfigError, ProtocolError  # noqa: E402
from fedmtl.flower import client_app, codec, protocol  # noqa: E402
from fedmtl.flower.server import FlowerRunError, FlowerServer, Settings, run_on_grid  # noqa: E402
from tests.conftest import digits_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Fields that describe the engine (timings, how clients ran), not the computation.
ENGINE = {"wall_time", "compute_wall", "exchange_time", "execution"}


def _wire(msg: FlowerMessage) -> FlowerMessage:
    """Serialise and rebuild a message exactly as the SuperLink/SuperNode transport does."""
    objects = get_all_nested_objects(msg)
    back = inflate_object_from_contents(msg.object_id, {k: v.deflate() for k, v in objects.items()})
    back.metadata.__dict__["_message_id"] = msg.object_id
    return back


class LoopbackGrid(Grid):
    """In-process Grid: node i holds ``node_configs[i]``; replies are computed on push."""

    def __init__(
        self, node_configs: list[dict[str, Any]], app: Any = None, state_dir: Path | None = None
    ) -> None:
        self.app = app or client_app()
        # each node keeps client state on its own disk: here, one temporary folder per grid (or the
        # folder of an earlier grid: the same machines after a server restart)
        self.state_dir = state_dir or Path(tempfile.mkdtemp(prefix="fedmtl-node-state-"))
        self.contexts = {
            100 + i: flwr.app.Context(
                run_id=1,
                node_id=100 + i,
                # computed in the ClientApp call itself (the warm worker has its own test)
                node_config={"state-dir": str(self.state_dir / f"node-{i}"), "warm": False, **c},
                state=RecordDict(),
                run_config={},
            )
            for i, c in enumerate(node_configs)
        }
        self.silent: set[int] = set()  # nodes that take messages but never answer (killed mid-round)
        self.gone: set[int] = set()  # nodes the SuperLink no longer lists
        self.replies: dict[str, FlowerMessage] = {}
        self.log: list[tuple[str, str, int]] = []  # (group, message type, node)
        self.on_push: Any = None

    def set_run(self, run: Any) -> None:
        pass

    @property
    def run(self) -> Any:
        return None

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl=None
    ):
        return FlowerMessage(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.gone]

    def push_messages(self, messages: Iterable[FlowerMessage]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            node = msg.metadata.dst_node_id
            self.log.append((msg.metadata.group_id, msg.metadata.message_type, node))
            if self.on_push is not None:
                self.on_push(self, msg)
            ids.append(msg.metadata.message_id)
            if node in self.silent:
                continue
            incoming = _wire(msg)
            context = context_from_proto(context_to_proto(self.contexts[node]))
            try:
                reply = self.app(incoming, context)
                self.contexts[node] = context  # a failed ClientApp leaves the node's state as it was
            except Exception as exc:  # what flwr-clientapp does with an exception
                reason = f"{type(exc)}:<'{exc}'>"
                reply = FlowerMessage(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=incoming)
            reply.metadata.__dict__["_message_id"] = reply.object_id
            self.replies[msg.metadata.message_id] = _wire(reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[FlowerMessage]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages: Iterable[FlowerMessage], *, timeout: float | None = None):
        return self.pull_messages(self.push_messages(messages))


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    """Messages are stamped with the running task's identity, which Flower's runtimes set."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None  # type: ignore[assignment]


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Register a test algorithm for one test only (other tests list the registry)."""
    from fedmtl import algorithms

    return lambda cls: monkeypatch.setitem(algorithms._REGISTRY, cls.name, cls)


def _nodes(n: int) -> list[dict[str, Any]]:
    return [{"partition-id": i, "num-partitions": n} for i in range(n)]


def _cfg(**over: Any) -> dict[str, Any]:
    """A small digits config; few local steps keep these tests about the protocol, not training."""
    return digits_config(**{"train__local_steps": 5, "clients__per_round": None, **over})


def _fast(**over: Any) -> Settings:
    return Settings(
        **{"round_timeout": 5.0, "node_timeout": 1.0, "suspect_grace": 0.2, "poll_interval": 0.01, **over}
    )


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(expected_dir: Path, got_dir: Path) -> None:
    """Every row and value of the in-process run appears in the Flower run (timings aside)."""
    exp, got = _rows(expected_dir), _rows(got_dir)
    assert [(r["kind"], r["round"], r.get("client")) for r in got] == [
        (r["kind"], r["round"], r.get("client")) for r in exp
    ]
    for e, g in zip(exp, got, strict=True):
        for key, value in e.items():
            if key in ENGINE:
                continue
            assert key in g, (key, e)
            if isinstance(value, float):
                assert g[key] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), (key, e, g)
            else:
                assert g[key] == value, (key, e, g)


def _flower_run(
    tmp_path: Path, raw: dict[str, Any], grid: LoopbackGrid, **settings: Any
) -> fedmtl.experiment.run.RunResult:
    return FlowerServer(grid, parse_config(raw), _fast(**settings)).run(out=tmp_path / "flower")


# ------------------------------------------------------------------------------------ codec
def test_codec_round_trips_messages_and_states_through_the_wire():
    content = RecordDict()
    msg = Message(
        arrays={"net.0.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "empty": np.zeros(0)},
        scalars={"num_examples": 5, "train_loss": 0.25, "tag": "x", "flag": True, "f32": np.float32(0.5)},
    )
    codec.put_message(content, "m", msg)
    state = {"params": {"a.b": np.ones(3, dtype=np.float64)}, 3: (np.int64(4), [1.5, None, "q"]), "e": {}}
    codec.put_tree(content, "s", state)
    back = _wire(FlowerMessage(content, 7, "train", group_id="1")).content

    m = codec.get_message(back, "m")
    assert m.scalars == {"num_examples": 5, "train_loss": 0.25, "tag": "x", "flag": True, "f32": 0.5}
    assert type(m.scalars["num_examples"]) is int and type(m.scalars["flag"]) is bool
    for key, arr in msg.arrays.items():
        assert m.arrays[key].dtype == arr.dtype and np.array_equal(m.arrays[key], arr)
    assert codec.has_message(back, "m") and not codec.has_message(back, "other")

    s = codec.get_tree(back, "s")
    assert s.keys() == state.keys() and s["e"] == {} and s[3][1] == [1.5, None, "q"]
    assert isinstance(s[3], tuple) and type(s[3][0]) is np.int64 and s[3][0] == 4
    assert np.array_equal(s["params"]["a.b"], state["params"]["a.b"])


def test_codec_names_the_path_of_a_value_it_cannot_send():
    with pytest.raises(ProtocolError, match="state value at '/params/w' has type object"):
        codec.put_tree(RecordDict(), "s", {"params": {"w": object()}})


# ------------------------------------------------------------------------------------ equality
#: Registered algorithms whose Flower-vs-in-process equality needs data or a model of their own,
#: and where that test lives (each runs the full round trip through LoopbackGrid).
OWN_FLOWER_TEST = {
    "mocha": "tests/test_mocha_flower.py (Land Mine, a linear model per task)",
    "fedbone": "tests/test_fedbone.py (the split model; its multi-step round)",
    "fdrmfl": "tests/test_fdrmfl.py (the multi-modal diabetes federation)",
}
#: Chosen settings (sampling, drops, multi-task, stateful clients); every other registered algorithm
#: joins the grid with its defaults on two digits clients, so a new one is checked the day it is
#: registered.
FLOWER_VARIANTS = [
    {"data__partition__num_clients": 2, "train__rounds": 2},
    # sampling, stragglers, simulated drops, eval every 2 rounds, lr schedule, server momentum
    {
        "data__partition__num_clients": 4,
        "clients__per_round": 2,
        "train__rounds": 3,
        "runtime__work_fraction": [0.5, 1.0],
        "runtime__drop_prob": 0.3,
        "eval__every": 2,
        "train__lr_schedule": "exponential",
        "algorithm": {"name": "fedavg", "server_optimizer": {"name": "momentum", "lr": 0.5}},
    },
    # stateful clients: every client's model lives in context.state between messages
    {
        "data__partition__num_clients": 3,
        "clients__per_round": 2,
        "train__rounds": 2,
        "algorithm": {"name": "local"},
    },
    {"data__partition__num_clients": 2, "train__rounds": 2, "algorithm": {"name": "fedprox", "mu": 0.1}},
    # personalised multi-task: heads of different sizes stay on the nodes, only the body travels
    {
        "data__partition__num_clients": 2,
        "data__tasks": ["digit", "parity"],
        "train__rounds": 2,
        "algorithm": {"name": "fedper"},
    },
    {"data__partition__num_clients": 2, "train__rounds": 2, "algorithm": {"name": "ditto", "lam": 0.1}},
    {
        "data__partition__num_clients": 2,
        "train__rounds": 2,
        "algorithm": {"name": "fedavg_ft", "finetune_steps": 3},
    },
    {"data__partition__num_clients": 2, "train__rounds": 2, "algorithm": {"name": "fedrep"}},
    {"data__partition__num_clients": 2, "train__rounds": 2, "algorithm": {"name": "apfl"}},
    {
        "data__partition__num_clients": 2,
        "data__tasks": ["digit", "parity"],
        "train__rounds": 2,
        "algorithm": {"name": "lg_fedavg"},
    },
    {"data__partition__num_clients": 2, "train__rounds": 2, "algorithm": {"name": "fedbabu"}},
    # evaluation views hold only the client's task (or group) head
    {
        "data__partition__num_clients": 4,
        "data__tasks": ["digit", "parity"],
        "train__rounds": 2,
        "algorithm": {"name": "fedavg"},
    },
    {
        "data__partition__num_clients": 4,
        "data__tasks": ["digit", "parity"],
        "train__rounds": 2,
        "algorithm": {"name": "hierarchical"},
    },
]
FLOWER_VARIANT_IDS = [
    "fedavg",
    "sampling-drops-momentum",
    "local-stateful",
    "fedprox",
    "fedper-multitask",
    "ditto",
    "fedavg-ft",
    "fedrep",
    "apfl",
    "lg-fedavg-multitask",
    "fedbabu",
    "fedavg-multitask",
    "hierarchical-multitask",
]
_ON_FLOWER = {v.get("algorithm", {"name": "fedavg"})["name"] for v in FLOWER_VARIANTS}
_DEFAULTS = [n for n in algorithm_names() if n not in _ON_FLOWER and n not in OWN_FLOWER_TEST]
FLOWER_GRID = FLOWER_VARIANTS + [
    {"data__partition__num_clients": 2, "train__rounds": 2, "algorithm": {"name": n}} for n in _DEFAULTS
]
FLOWER_GRID_IDS = FLOWER_VARIANT_IDS + _DEFAULTS


def test_every_registered_algorithm_is_in_the_flower_grid_or_has_its_own_test():
    for name in algorithm_names():
        assert name in OWN_FLOWER_TEST or any(
            v.get("algorithm", {"name": "fedavg"})["name"] == name for v in FLOWER_GRID
        ), name


@pytest.mark.parametrize("over", FLOWER_GRID, ids=FLOWER_GRID_IDS)
def test_flower_run_equals_in_process_run(tmp_path, over):
    raw = _cfg(**over)
    n = raw["data"]["partition"]["num_clients"]
    expected = fedmtl.run(raw, out=tmp_path / "inproc")
    got = _flower_run(tmp_path, raw, LoopbackGrid(_nodes(n)))
    assert_same_metrics(expected.run_dir, got.run_dir)
    assert got.summary["final"][f"{got.summary['primary_metric']}_mean"] == pytest.approx(
        expected.summary["final"][f"{expected.summary['primary_metric']}_mean"]
    )
    assert got.summary["engine"] == "flower" and len(got.summary["nodes"]) == n


def test_one_exchange_per_round_evaluation_rides_on_the_next_train_message(tmp_path):
    raw = _cfg(data__partition__num_clients=2, train__rounds=3)
    grid = LoopbackGrid(_nodes(2))
    _flower_run(tmp_path, raw, grid)
    kinds = [(g, t) for g, t, _ in grid.log]
    assert (
        kinds
        == [("handshake", "query")] * 2
        + [(str(r), "train") for r in (1, 2, 3) for _ in (0, 1)]
        + [("3.eval", "evaluate")] * 2
    )


# ------------------------------------------------------------------------------------ faults
def test_a_node_lost_mid_round_is_recorded_and_training_goes_on(tmp_path):
    raw = _cfg(data__partition__num_clients=2, train__rounds=3)
    grid = LoopbackGrid(_nodes(2))

    def kill_node_1_in_round_2(g: LoopbackGrid, msg: FlowerMessage) -> None:
        if msg.metadata.group_id == "2":
            g.silent.add(101)

    grid.on_push = kill_node_1_in_round_2
    res = _flower_run(tmp_path, raw, grid, round_timeout=0.5, suspect_grace=0.1)
    rounds = {r["round"]: r for r in res.rounds}
    assert rounds[1]["missing_clients"] == []
    assert rounds[2]["missing_clients"] == [1] and "no reply within" in rounds[2]["missing_reasons"]["1"]
    assert rounds[3]["missing_clients"] == [1]
    # round 1's evaluation travelled with round 2's messages, so client 1 is missing there too
    assert rounds[1]["eval_missing_clients"] == [1]
    # the survivor kept training: FedAvg of one client is that client's model
    trained = [r for r in _rows(res.run_dir) if r["kind"] == "train" and not r.get("missing")]
    assert [(r["round"], r["client"]) for r in trained] == [(1, 0), (1, 1), (2, 0), (3, 0)]
    assert res.summary["complete"] and res.summary["final"]["round"] == 3
    assert np.isfinite(res.summary["final"]["accuracy_mean"])


def test_a_node_the_superlink_no_longer_lists_is_skipped_without_waiting(tmp_path):
    raw = _cfg(data__partition__num_clients=2, train__rounds=2)
    grid = LoopbackGrid(_nodes(2))
    grid.on_push = lambda g, msg: g.gone.add(101) if msg.metadata.group_id == "1" else None
    res = _flower_run(tmp_path, raw, grid, round_timeout=60.0)
    assert res.rounds[1]["missing_clients"] == [1]
    assert res.rounds[1]["missing_reasons"] == {"1": "node offline"}
    assert res.rounds[1]["exchange_time"] < 5


def test_a_node_claiming_a_partition_the_config_lacks_stops_the_run_at_the_handshake(tmp_path):
    raw = _cfg(data__partition__num_clients=2, train__rounds=2)
    nodes = _nodes(2)
    nodes[1]["partition-id"] = 5
    with pytest.raises(
        FlowerRunError, match=r"node 101 has partition-id=5 num-partitions=2, but the config makes 2"
    ):
        _flower_run(tmp_path, raw, LoopbackGrid(nodes))


class _Broken(FedAvg):
    """Raises on client 1: a bug in an algorithm must stop the run, not be waited out."""

    name = "test-broken"

    def client_step(self, state, data, msg, work):
        if data.cid == 1:
            raise ValueError("boom in client_step")
        return super().client_step(state, data, msg, work)


def test_a_client_exception_stops_the_run_naming_the_client(tmp_path, registered):
    registered(_Broken)
    raw = _cfg(data__partition__num_clients=2, train__rounds=2, algorithm={"name": "test-broken"})
    with pytest.raises(FlowerRunError, match=r"client 1 \(node 101\) failed: .*boom in client_step"):
        _flower_run(tmp_path, raw, LoopbackGrid(_nodes(2)))
    nodes = _nodes(2)
    nodes[0]["partition-id"] = "first"
    with pytest.raises(  # found at the handshake, before any run folder: the node's own one line
        FlowerRunError,
        match=r"^node 100 cannot run this config: node_config: partition-id = 'first': must be an integer$",
    ):
        _flower_run(tmp_path / "2", raw, LoopbackGrid(nodes))
    assert not (tmp_path / "2").exists()


def test_each_node_reads_its_own_copy_of_the_data(tmp_path, shared_data):
    """``data-dir`` in a node's node_config replaces ``data.dir`` on that node only."""
    raw = _cfg(
        data={"dataset": "landmine_small", "partition": {"kind": "natural"}, "max_clients": 2},
        model={"name": "linear"},
        train__rounds=1,
    )
    expected = fedmtl.run(raw, out=tmp_path / "inproc")
    nodes = [{**n, "data-dir": str(shared_data)} for n in _nodes(2)]
    assert_same_metrics(expected.run_dir, _flower_run(tmp_path, raw, LoopbackGrid(nodes)).run_dir)
    nodes[1]["data-dir"] = str(tmp_path / "nowhere")
    with pytest.raises(
        FlowerRunError, match=r"node 101 \(client 1\) cannot run this config: .*nowhere.*does not exist"
    ):
        _flower_run(tmp_path / "2", raw, LoopbackGrid(nodes))
    assert not (tmp_path / "2" / "flower").exists()  # found at the handshake, before any folder


def test_no_nodes_is_an_error_not_a_hang(tmp_path):
    raw = _cfg(data__partition__num_clients=2, train__rounds=1)
    with pytest.raises(FlowerRunError, match="no SuperNode connected within 0 s"):
        _flower_run(tmp_path, raw, LoopbackGrid([]), node_timeout=0.1)


# ------------------------------------------------------------------------------------ multi-step
class _TwoStep(FedAvg):
    """A toy two-step protocol: clients first report their label counts, then train."""

    name = "test-two-step"

    def client_actions(self):  # noqa: ANN201
        return {"census": self.client_census}

    def client_census(self, state, data, msg, work):
        counts = np.bincount(data.y_train, minlength=10).astype(np.int64) * int(msg.scalars["scale"])
        return {**state, "asked": int(state.get("asked", 0)) + 1}, Message(arrays={"counts": counts})


def test_custom_message_types_carry_a_multi_step_protocol(tmp_path, registered):
    registered(_TwoStep)
    raw = _cfg(data__partition__num_clients=2, train__rounds=1, algorithm={"name": "test-two-step"})
    grid = LoopbackGrid(_nodes(2))
    srv = FlowerServer(grid, parse_config(raw), _fast())
    srv.connect()
    replies, missing = srv.exchange(
        "census", {0: Message(scalars={"scale": 2}), 1: Message(scalars={"scale": 2})}, 1
    )
    assert missing == {} and ("1.census", "train.census", 100) in grid.log
    for cid in (0, 1):
        y = srv.data.clients[cid].y_train
        assert np.array_equal(replies[cid].arrays["counts"], 2 * np.bincount(y, minlength=10))
    replies, _ = srv.exchange("census", {1: Message(scalars={"scale": 1})}, 2)
    assert codec.get_tree(grid.contexts[101].state, protocol.STATE)["asked"] == 2  # state kept by the node


# ------------------------------------------------------------------------------------ config
def test_run_config_names_a_yaml_relative_to_the_app_and_overrides_it(tmp_path):
    app = ROOT / "flower_app"
    grid = LoopbackGrid(_nodes(2))
    rc = {
        "overrides": "train.rounds=1; seed=3",
        "out": str(tmp_path / "run"),
        "node-timeout": 5.0,
        "poll-interval": 0.01,
    }
    res = run_on_grid(grid, rc, app_dir=app)
    cfg = yaml.safe_load((res.run_dir / "config.yaml").read_text())
    assert cfg["seed"] == 3 and cfg["train"]["rounds"] == 1 and cfg["name"] == "flower-digits"


def test_the_app_ships_the_example_config():
    app_cfg = yaml.safe_load((ROOT / "flower_app" / "fedmtl.yaml").read_text())
    example = yaml.safe_load((ROOT / "examples" / "flower_digits.yaml").read_text())
    assert parse_config(app_cfg) == parse_config(example)


@pytest.mark.parametrize(
    ("rc", "message"),
    [
        (
            {"rounds": 3},
            "run config: unknown key 'rounds'; allowed: accept-mismatch, config, min-nodes, node-timeout",
        ),
        ({"round-timeout": "soon"}, "run config: round-timeout = 'soon': expected float"),
    ],
)
def test_bad_run_config_is_one_line(rc, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_run_config(rc)


def test_app_defaults_match_settings_defaults():
    """The app's pyproject run config and ``Settings`` must not drift apart."""
    import tomllib

    project = tomllib.loads((ROOT / "flower_app" / "pyproject.toml").read_text())
    defaults = project["tool"]["flwr"]["app"]["config"]
    assert Settings.from_run_config(defaults) == Settings()
