"""The ClientApp side: run an algorithm's client step on this SuperNode's own partition.

Every message carries the resolved fedmtl config, so a node needs no copy of the YAML; which
partition it holds comes from its ``node_config``. Client state (personal layers, dual variables,
optimizer state) lives on the node's disk between messages (``node_state``: Flower starts a fresh
ClientApp process for every message, and a restarted node or resumed server must find it), and the
latest copy in ``context.state``. Randomness is the simulator's ``Stream(seed, TRAIN, round, client)``,
so a node draws exactly the batches the in-process simulator draws for the same client and round.

Loading this module imports neither torch nor the data stack. The server's first handshake asks
the node to check its files against the run (``protocol.CHECK``): the node builds its side then (in
its warm worker, which keeps it for round 1) and a problem comes back as one line in the reply
(``protocol.NODE_ERROR``), before the server writes anything; later handshakes (probes of a node
that missed a deadline) only read the ``node_config``."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, MetricRecord, RecordDict
from flwr.app import Message as FlowerMessage
from flwr.clientapp import ClientApp

from fedmtl.errors import ConfigError, FedmtlError, ProtocolError
from fedmtl.flower import codec, protocol, worker
from fedmtl.flower.node_state import NodeStates, state_root

if TYPE_CHECKING:
    from fedmtl.algorithms.base import Algorithm, ClientWork
    from fedmtl.config import Config
    from fedmtl.data.federated import ClientData, FederatedData

StepFn = Callable[..., tuple[dict[str, Any], Any]]


@dataclass
class NodeSide:
    """What one node builds from the run's config: its own client's data and the algorithm."""

    cfg: Config
    data: FederatedData  # a view holding only this node's client
    client: ClientData
    algo: Algorithm
    device: Any = None  # torch.device of runtime.device, resolved on the node


class _ByCid(list):
    """The node's clients, indexable by fedmtl client id.

    ``evaluate_clients`` indexes ``data.clients`` by client id; this view lets a node run that same
    function on its single partition, whatever its id."""

    def __getitem__(self, cid: Any) -> Any:
        for c in list.__iter__(self):
            if c.cid == cid:
                return c
        raise IndexError(cid)


_CACHE: dict[tuple[str, str], NodeSide] = {}


def _node_int(node_config: dict[str, Any], key: str) -> int | None:
    if key not in node_config:
        return None
    value = node_config[key]
    text = str(value)
    if isinstance(value, bool) or not isinstance(value, int | str) or not text.lstrip("-").isdigit():
        raise ConfigError(f"node_config: {key} = {value!r}: must be an integer")
    return int(text)


def partition_of(node_config: dict[str, Any]) -> tuple[int, int | None]:
    """(partition-id, num-partitions or None) from a SuperNode's ``--node-config``."""
    pid = _node_int(node_config, protocol.PARTITION_ID)
    if pid is None:
        raise ConfigError(
            f"node_config: '{protocol.PARTITION_ID}' is missing; start the SuperNode with "
            f'--node-config "{protocol.PARTITION_ID}=0 {protocol.NUM_PARTITIONS}=N"'
        )
    return pid, _node_int(node_config, protocol.NUM_PARTITIONS)


def node_side(config_json: str, node_config: dict[str, Any], federation_json: str = "") -> NodeSide:
    """Build (once per process) this node's data view and algorithm from the run's config.

    ``data-path`` in the node_config names this node's own client files, read against the
    federation the server describes (``federation_json``): the node holds no one else's data.
    Without it, ``data-dir``/``data-file`` point at a copy of the whole dataset, which the node
    partitions as the config says and keeps its partition of (trials on one machine)."""
    key = (config_json, federation_json, json.dumps(node_config, sort_keys=True, default=str))
    if key in _CACHE:
        return _CACHE[key]
    from fedmtl.config import parse_config
    from fedmtl.experiment.run import build_algorithm
    from fedmtl.training import device

    pid, want = partition_of(node_config)
    raw = json.loads(config_json)
    if protocol.DATA_PATH in node_config:
        if not federation_json:
            raise ProtocolError("flower message has no federation description (a server of another version?)")
        from fedmtl.data.description import node_federation

        cfg = parse_config(raw)
        own, _ = node_federation(federation_json, node_config[protocol.DATA_PATH], pid)
        data, algo, _ = build_algorithm(cfg, own)
    else:
        if raw.get("data", {}).get("dataset") == "federation":
            raise ConfigError(
                f"node_config: '{protocol.DATA_PATH}' is missing; this run's data lives on the nodes: "
                f'start the SuperNode with --node-config "{protocol.PARTITION_ID}=N '
                f'{protocol.DATA_PATH}="/path/to/its/files""'
            )
        for name, field in ((protocol.DATA_DIR, "dir"), (protocol.DATA_FILE, "file")):
            if name in node_config:
                raw.setdefault("data", {})[field] = str(node_config[name])
        cfg = parse_config(raw)
        data, algo, _ = build_algorithm(cfg)
    n = data.num_clients
    if not 0 <= pid < n:
        raise ConfigError(
            f"node_config: {protocol.PARTITION_ID} = {pid}: the config has {n} clients (0..{n - 1})"
        )
    if want is not None and want != n:
        raise ConfigError(
            f"node_config: {protocol.NUM_PARTITIONS} = {want}, but the run's config makes {n} clients"
        )
    client = data.clients[pid]
    view = dataclasses.replace(data, clients=_ByCid([client]))
    side = NodeSide(cfg, view, client, algo, device.resolve(cfg.runtime.device))
    if len(_CACHE) >= 4:  # a process serves one node, or a few virtual ones (simulation, tests)
        _CACHE.clear()
    _CACHE[key] = side
    return side


def _side(content: RecordDict, node_config: dict[str, Any]) -> NodeSide:
    try:
        run = content.config_records[protocol.RUN]
        config_json = str(run["config"])
    except KeyError:
        raise ProtocolError("flower message has no fedmtl run config") from None
    return node_side(config_json, node_config, str(run.get("federation", "")))


def _work(content: RecordDict, side: NodeSide) -> tuple[int, ClientWork]:
    from fedmtl.algorithms.base import ClientWork
    from fedmtl.runtime.round import TRAIN_STREAM
    from fedmtl.training.shuffle import Stream

    w = content.config_records[protocol.WORK]
    cid, rnd = int(w["cid"]), int(w["round"])  # type: ignore[arg-type]
    if cid != side.client.cid:
        raise ProtocolError(f"message for client {cid} reached the node holding client {side.client.cid}")
    rng = Stream(side.cfg.seed, TRAIN_STREAM, rnd, cid)
    return cid, ClientWork(round=rnd, fraction=float(w["fraction"]), rng=rng, lr=float(w["lr"]))  # type: ignore[arg-type]


def _store(content: RecordDict, node_config: dict[str, Any], run_id: int, cid: int) -> NodeStates:
    """This client's state versions on the node's disk, under the fedmtl run's key."""
    run = content.config_records[protocol.RUN]
    key = str(run["run_key"]) if "run_key" in run else f"flower-{run_id}"
    return NodeStates(state_root(node_config), key, cid)


def _evaluate_into(out: RecordDict, content: RecordDict, side: NodeSide, store: NodeStates) -> None:
    """Evaluate with the same code as in-process, on this node's client, if the message asks."""
    if protocol.EVAL not in content.config_records:
        return
    from fedmtl.experiment.evaluate import evaluate_clients

    rnd = int(content.config_records[protocol.EVAL]["round"])  # type: ignore[arg-type]
    server = codec.get_tree(content, protocol.EVAL_VIEW)
    cid = side.client.cid
    state = store.upto(rnd)
    # In-process evaluation sees ``{}`` for a client that never trained; keep that.
    states = {cid: state} if state is not None else {}
    rows = evaluate_clients(side.algo, server, states, side.data, rnd, [cid])
    codec.put_tree(out, protocol.EVAL_ROW, rows)


def _step_fn(side: NodeSide, action: str) -> StepFn:
    if action == protocol.TRAIN:
        return side.algo.client_step
    method = side.algo.client_actions().get(action)
    if method is None:
        raise ProtocolError(f"algorithm {side.algo.name!r} has no client action {action!r}")
    return method


def compute(
    content: RecordDict, node_config: dict[str, Any], run_id: int, action: str | None
) -> tuple[RecordDict, RecordDict | None]:
    """What this node answers to a message (``action``: None = evaluate only, ``train``, or a
    further action of a multi-step protocol), and its client's new state as records (or None).

    A pure function of the message, the node's config and the node's disk, so the ClientApp
    process and the node's warm worker (``fedmtl.flower.worker``) give the same answer."""
    from fedmtl.training import device

    side = _side(content, node_config)
    if action == protocol.CHECK:  # the handshake: the node side builds, so its files fit the run
        return RecordDict(), None
    store = _store(content, node_config, run_id, side.client.cid)
    out = RecordDict()
    with device.using(side.device):
        _evaluate_into(out, content, side, store)
    if action is None:
        return out, None
    cid, work = _work(content, side)
    w = content.config_records[protocol.WORK]
    first = int(w.get("exchange", 0)) == 0  # type: ignore[arg-type]
    state = store.before(work.round) if first else store.upto(work.round)
    incoming = codec.get_message(content, protocol.MSG)
    if state is None:
        state = side.algo.init_client(cid)
    from fedmtl.training.executors import run_local

    step = _step_fn(side, action)
    t0 = time.perf_counter()
    with device.using(side.device):
        new_state, reply = run_local(step(state, side.client, incoming, work))
    wall = time.perf_counter() - t0
    store.put(work.round, new_state, int(w.get("committed", 0)))  # type: ignore[arg-type]
    codec.put_message(out, protocol.REPLY, reply)
    out[protocol.META] = MetricRecord({"cid": cid, "compute_wall": wall})
    latest = RecordDict()
    codec.put_tree(latest, protocol.STATE, new_state)
    return out, latest


def _step(msg: FlowerMessage, context: Context, action: str | None) -> FlowerMessage:
    node_config = dict(context.node_config)
    request = (msg.content, node_config, int(context.run_id), action)
    out, latest = worker.call(node_config, request) if worker.enabled(node_config) else compute(*request)
    if latest is not None:  # the latest state also in context.state, for Flower's own tools
        for key, record in latest.items():
            context.state[key] = record
    return FlowerMessage(out, reply_to=msg)


def handle_query(msg: FlowerMessage, context: Context) -> FlowerMessage:
    """Handshake: which client this node serves (its node_config) and, if the server asks, whether
    its files fit the run; a problem is the reply's one-line reason, not a ClientApp exception."""
    node_config = dict(context.node_config)
    out = RecordDict()
    try:
        pid, num = partition_of(node_config)
        out[protocol.NODE] = MetricRecord(
            {"cid": pid} if num is None else {"cid": pid, "num_partitions": num}
        )  # type: ignore[arg-type]
        if protocol.CHECK in msg.content.config_records:
            request = (msg.content, node_config, int(context.run_id), protocol.CHECK)
            worker.call(node_config, request) if worker.enabled(node_config) else compute(*request)
    except FedmtlError as exc:
        out[protocol.NODE_ERROR] = ConfigRecord(
            {"reason": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
        )
    return FlowerMessage(out, reply_to=msg)


def handle_train(msg: FlowerMessage, context: Context) -> FlowerMessage:
    return _step(msg, context, protocol.TRAIN)


def handle_evaluate(msg: FlowerMessage, context: Context) -> FlowerMessage:
    return _step(msg, context, None)


def _action_handler(action: str) -> Callable[[FlowerMessage, Context], FlowerMessage]:
    """``train.<action>``: a step of a multi-step protocol, one of ``Algorithm.client_actions()``."""

    def handle(msg: FlowerMessage, context: Context) -> FlowerMessage:
        return _step(msg, context, action)

    return handle


class FedmtlClientApp(ClientApp):
    """A ClientApp whose custom ``train.<action>`` handlers are registered on first use.

    So any algorithm's multi-step protocol runs without changing the app, and loading the app does
    not import the algorithm registry (and torch) just to list action names."""

    def __init__(self, actions: Iterable[str] = ()) -> None:
        super().__init__()
        self._actions: set[str] = set()
        self.query()(handle_query)
        self.train()(handle_train)
        self.evaluate()(handle_evaluate)
        for action in actions:
            self._add_action(action)

    def _add_action(self, action: str) -> None:
        self.train(action)(_action_handler(action))
        self._actions.add(action)

    def __call__(self, message: FlowerMessage, context: Context) -> FlowerMessage:
        category, _, action = message.metadata.message_type.partition(".")
        if category == protocol.TRAIN and action.isidentifier() and action not in self._actions | {"default"}:
            self._add_action(action)
        return super().__call__(message, context)


def client_app(extra_actions: Iterable[str] = ()) -> ClientApp:
    """A ClientApp serving every fedmtl algorithm: handshake, train, evaluate and custom actions."""
    return FedmtlClientApp(extra_actions)
