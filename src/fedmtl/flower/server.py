"""The ServerApp side: fedmtl's round and run loop over Flower's ``Grid``.

This module only moves messages. The round (sampling, systems draws, learning rate, exchanges,
reply checks, rows: ``fedmtl.runtime.round``) and the run (stop reasons, evaluation schedule,
records, best row, summary: ``fedmtl.runtime.loop``) are the simulator's own code; here a
``FlowerTransport`` delivers each exchange as Flower messages, and each node runs its client with
the same code and evaluates on its own test split. So a seed gives the metrics the in-process
simulator gives, in the same run directory (config.yaml, metrics.jsonl, summary.json), and
``fedmtl report``/``compare`` read Flower runs as they are.

Flower's costs shape two choices. Every message starts a fresh ClientApp process on the node, so the
evaluation of round r travels with round r+1's first messages (one exchange per round, not two).
Real nodes fail, so every exchange has a deadline: a node that misses it is recorded as missing for
that round, and until it answers again it only gets a short grace period instead of the full
deadline, so one dead node does not stall every later round."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from flwr.app import ConfigRecord, Context, RecordDict
from flwr.app import Message as FlowerMessage
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from fedmtl.algorithms.base import TRAIN, Message
from fedmtl.config import Config, load_config
from fedmtl.data.description import describe, plain
from fedmtl.errors import ConfigError, FedmtlError
from fedmtl.experiment.identity import check_resume, run_identity
from fedmtl.experiment.outputs import write_csv
from fedmtl.experiment.records import RunDir, atomic_write_bytes, dumps
from fedmtl.experiment.run import RunResult, build_algorithm, runs_a_round
from fedmtl.flower import codec, protocol
from fedmtl.metrics import primary_metric
from fedmtl.runtime.loop import Progress, RunLoop
from fedmtl.runtime.round import Delivered, Planner, RoundPlan, RoundRunner, round_lr

K = TypeVar("K")
EVENTS = "flower.jsonl"
RUN_META = "flower-run.json"  # the run's key on the nodes' disks and its Flower run ids, for a resume
# A client that raised is a bug to report, not a fault to ride out.
_FATAL = {ErrorCode.CLIENT_APP_RAISED_EXCEPTION, ErrorCode.LOAD_CLIENT_APP_EXCEPTION, ErrorCode.INVALID_FAB}


class FlowerRunError(FedmtlError):
    """The federation cannot run this config (no nodes, a node failing to load its data, a client bug)."""


@dataclass
class Settings:
    """The Flower app's run config (``[tool.flwr.app.config]``, overridable with ``--run-config``)."""

    config: str = "fedmtl.yaml"  # fedmtl YAML; relative paths are relative to the app directory
    overrides: str = ""  # fedmtl overrides "train.rounds=2; seed=1" (';' or newline separated)
    out: str = ""  # run directory on the SuperLink machine; "" = output.dir/<name>-<time>
    round_timeout: float = 600.0  # seconds to wait for the replies of one exchange
    node_timeout: float = 120.0  # seconds to wait at start for the SuperNodes to connect
    suspect_grace: float = 5.0  # seconds a node that missed a deadline gets until it answers again
    poll_interval: float = 0.2  # seconds between pulls (Flower's own send_and_receive sleeps 3 s)
    min_nodes: int = 0  # nodes to wait for at start; 0 = one per client of the config
    resume: bool = False  # continue the run in ``out`` from its last checkpoint (after a crash)
    accept_mismatch: bool = False  # resume although config, data or model no longer match (recorded)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> Settings:
        known = {f.replace("_", "-"): f for f in cls.__dataclass_fields__}
        kwargs: dict[str, Any] = {}
        for key, value in run_config.items():
            if key not in known:
                raise ConfigError(f"run config: unknown key {key!r}; allowed: {', '.join(sorted(known))}")
            default = getattr(cls, known[key])
            try:
                kwargs[known[key]] = _as_bool(value) if isinstance(default, bool) else type(default)(value)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"run config: {key} = {value!r}: expected {type(default).__name__}"
                ) from None
        return cls(**kwargs)

    def override_list(self) -> list[str]:
        return [s.strip() for s in self.overrides.replace("\n", ";").split(";") if s.strip()]

    def load(self, app_dir: str | Path | None) -> Config:
        path = Path(self.config).expanduser()
        if not path.is_absolute() and app_dir is not None:
            path = Path(app_dir) / path
        return load_config(path, self.override_list())


class FlowerEvaluation:
    """One round's evaluation by the nodes: sent with the next exchange, or on its own if asked
    for first (``rows``)."""

    def __init__(
        self, transport: FlowerTransport, round: int, records: Callable[[int], RecordDict], clients: list[int]
    ) -> None:
        self.transport = transport
        self.round = round
        self.records = records
        self.clients = clients
        self.result: tuple[list[dict[str, Any]], dict[int, str]] | None = None

    def ready(self) -> bool:
        return self.result is not None

    def rows(self) -> tuple[list[dict[str, Any]], dict[int, str]]:
        if self.result is None:
            self.transport.evaluate_now(self)
        assert self.result is not None
        return self.result

    def resolve(self, replies: dict[int, RecordDict], missing: dict[int, str]) -> None:
        rows: list[dict[str, Any]] = []
        for cid in self.clients:
            reply = replies.get(cid)
            if reply is not None and codec.has_tree(reply, protocol.EVAL_ROW):
                rows += codec.get_tree(reply, protocol.EVAL_ROW)
        self.result = (rows, missing)


class FlowerTransport:
    """Delivers a round's exchanges to the SuperNodes that hold the clients; client state lives on
    each node (``fedmtl.flower.node_state``), in versions by round, so a resumed server can repeat
    the rounds after its last checkpoint."""

    execution = "flower"
    reports_missing = True

    def __init__(self, server: FlowerServer) -> None:
        self.srv = server
        self.algo = server.algo
        self.pending: FlowerEvaluation | None = None
        self.exchange_time = 0.0
        self.committed = 0  # the last checkpointed round: nodes may forget older state versions
        self.round = 0
        self.exchanges = 0  # exchanges so far in ``self.round`` (the first starts from the old state)

    def checkpointed(self, round: int) -> None:
        self.committed = round

    def _content(
        self, cid: int, plan_round: int, fraction: float, lr: float, exchange: int = 0
    ) -> RecordDict:
        work = {
            "cid": cid,
            "round": plan_round,
            "fraction": float(fraction),
            "lr": float(lr),
            "exchange": exchange,
            "committed": self.committed,
        }
        return RecordDict({protocol.RUN: self.srv.run_record(), protocol.WORK: ConfigRecord(work)})  # type: ignore[arg-type]

    def exchange(self, action: str, messages: dict[int, Message], plan: RoundPlan) -> Delivered:
        node_of = self.srv.node_of
        items: dict[int, tuple[int, str, RecordDict]] = {}
        missing: dict[int, str] = {}
        kind = protocol.TRAIN if action == TRAIN else f"{protocol.TRAIN}.{action}"
        if plan.round != self.round:
            self.round, self.exchanges = plan.round, 0
        exchange, self.exchanges = self.exchanges, self.exchanges + 1
        for cid, msg in messages.items():
            if cid not in node_of:
                missing[cid] = "no node holds this client"
                continue
            w = plan.work[cid]
            content = self._content(cid, plan.round, w.fraction, w.lr, exchange)
            codec.put_message(content, protocol.MSG, msg)
            items[cid] = (node_of[cid], kind, content)
        pending, self.pending = self.pending, None
        if pending is not None:  # the last evaluation rides on this exchange's messages
            self._attach_eval(items, pending, plan.round, plan.lr)
        group = str(plan.round) if action == TRAIN else f"{plan.round}.{action}"
        t = time.perf_counter()
        replies, lost = self.srv.roundtrip(items, group)
        self.exchange_time += time.perf_counter() - t
        if pending is not None:
            pending.resolve(replies, {c: lost.get(c, "no node holds this client") for c in pending.clients})
        got: dict[int, Message] = {}
        wall: dict[int, float] = {}
        for cid in messages:
            content = replies.get(cid)
            if content is None or not codec.has_message(content, protocol.REPLY):
                if cid not in missing:
                    missing[cid] = lost.get(cid, "no reply")
                continue
            got[cid] = codec.get_message(content, protocol.REPLY)
            wall[cid] = float(content.metric_records[protocol.META]["compute_wall"])  # type: ignore[arg-type]
        if action != TRAIN:
            missing = {c: f"{action}: {why}" for c, why in missing.items()}
        return Delivered(got, missing, wall)

    def _attach_eval(
        self, items: dict[int, tuple[int, str, RecordDict]], ev: FlowerEvaluation, rnd: int, lr: float
    ) -> None:
        """Every client with a node evaluates round ``ev.round``: on its message, or alone."""
        node_of = self.srv.node_of
        for cid in ev.clients:
            if cid not in node_of:
                continue
            if cid not in items:
                items[cid] = (node_of[cid], protocol.EVALUATE, self._content(cid, rnd, 1.0, lr))
            for key, record in ev.records(cid).items():
                items[cid][2][key] = record

    def evaluate_now(self, ev: FlowerEvaluation) -> None:
        """The evaluation on its own exchange (after the last round, or when nothing came after)."""
        if self.pending is ev:
            self.pending = None
        items: dict[int, tuple[int, str, RecordDict]] = {}
        self._attach_eval(items, ev, ev.round, round_lr(self.srv.cfg, ev.round))
        replies, lost = self.srv.roundtrip(items, f"{ev.round}.eval")
        ev.resolve(replies, {c: lost.get(c, "no node holds this client") for c in ev.clients})

    def evaluate(self, server: dict[str, Any], round: int, clients: list[int]) -> FlowerEvaluation:
        """Eval records per client: the algorithm's ``eval_view`` of the server state (only what
        that client may see), encoded now (the state may change in place in later steps), once per
        distinct view (clients of one task share theirs)."""
        encoded: dict[Any, RecordDict] = {}
        by_client: dict[int, RecordDict] = {}
        alive: list[dict[str, Any]] = []

        def records(cid: int) -> RecordDict:
            if cid in by_client:
                return by_client[cid]
            view = self.algo.eval_view(server, cid)
            alive.append(view)  # identities below stay unique while the views live
            key = _identity(view)
            out = encoded.get(key)
            if out is None:
                out = RecordDict({protocol.EVAL: ConfigRecord({"round": round})})
                codec.put_tree(out, protocol.EVAL_VIEW, view)
                encoded[key] = out
            by_client[cid] = out
            return out

        for cid in clients:
            records(cid)
        if self.pending is not None:  # never two outstanding: the older goes on its own
            self.evaluate_now(self.pending)
        self.pending = FlowerEvaluation(self, round, records, clients)
        return self.pending

    def finish(self, plan: RoundPlan, rejected: set[int]) -> dict[str, Any]:
        """Nothing to keep here (each node holds its client's state); the round's exchange time."""
        facts = {"exchange_time": self.exchange_time, "nodes": len(self.srv.node_of)}
        self.exchange_time = 0.0
        return facts

    def client_states(self) -> None:
        return None


class FlowerServer:
    """Runs one fedmtl config over a Grid: handshake, then the run loop over a ``FlowerTransport``."""

    def __init__(
        self,
        grid: Grid,
        cfg: Config,
        settings: Settings,
        log: Callable[[str], None] | None = None,
        flower_run_id: int | None = None,
    ):
        self.grid = grid
        self.flower_run_id = flower_run_id  # Flower's id of the run this ServerApp serves
        self.cfg = cfg
        self.s = settings
        self.log = log or (lambda text: print(f"[fedmtl] {text}", flush=True))
        self.data, self.algo, flops = build_algorithm(cfg)
        self.planner = Planner(cfg, self.data.train_clients)
        self.runner = RoundRunner(self.algo, cfg, self.planner, flops, self.data)
        self.transport = FlowerTransport(self)
        self.config_json = json.dumps(cfg.to_dict())
        # What a node with only its own files builds the federation from (no samples in it).
        self.federation_json = json.dumps(describe(self.data), default=plain)
        self.node_of: dict[int, int] = {}  # client id -> node id
        self.node_map: dict[str, int] = {}
        self.seen: set[int] = set()  # node ids already asked which client they hold
        self.suspects: set[int] = set()  # node ids that missed their last deadline
        self.rd: RunDir | None = None
        self._events: list[str] = []  # written once the run directory exists
        # the fedmtl run's key on the nodes' disks (kept across a resume); exchanges outside a run
        # get one of their own
        self.run_key = f"adhoc-{uuid.uuid4().hex[:12]}"

    # --- transport ---------------------------------------------------------------------------
    def _event(self, event: str, **fields: Any) -> None:
        self._events.append(dumps({"t": time.time(), "event": event, **fields}) + "\n")
        if self.rd is not None:
            with open(self.rd.path / EVENTS, "a") as fh:
                fh.write("".join(self._events))
            self._events.clear()

    def roundtrip(
        self, items: Mapping[K, tuple[int, str, RecordDict]], group: str, timeout: float | None = None
    ) -> tuple[dict[K, RecordDict], dict[K, str]]:
        """Send ``key -> (node, message type, content)``; return replies and reasons for the missing
        (waiting ``timeout`` seconds at most, else ``round-timeout``)."""
        limit = self.s.round_timeout if timeout is None else timeout
        missing: dict[K, str] = {}
        online = set(self.grid.get_node_ids())
        ttl = max(2 * self.s.round_timeout, 60.0)
        keys: list[K] = []
        msgs: list[FlowerMessage] = []
        for key, (node, kind, content) in items.items():
            if node not in online:
                missing[key] = "node offline"
                continue
            keys.append(key)
            msgs.append(FlowerMessage(content, node, kind, ttl=ttl, group_id=group))
        ids = list(self.grid.push_messages(msgs)) if msgs else []
        pending: dict[str, K] = {}
        for key, mid in zip(keys, ids, strict=True):
            if mid:
                pending[mid] = key
            else:
                missing[key] = "the SuperLink refused the message"
        node_of_key = {key: items[key][0] for key in keys}
        self._event("push", group=group, keys=[str(k) for k in pending.values()])
        replies: dict[K, RecordDict] = {}
        start = time.monotonic()
        healthy_done: float | None = None
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                key = pending.pop(reply.metadata.reply_to_message_id, None)
                if key is None:
                    continue
                if reply.has_error():
                    err = reply.error
                    if err.code in _FATAL:
                        raise FlowerRunError(f"{_who(key, node_of_key[key])} failed: {_reason(err.reason)}")
                    missing[key] = f"error {err.code}: {err.reason}"
                else:
                    replies[key] = reply.content
                    self.suspects.discard(node_of_key[key])
            if not pending:
                break
            now = time.monotonic()
            if now - start > limit:
                break
            if all(node_of_key[k] in self.suspects for k in pending.values()):
                healthy_done = healthy_done or now
                if now - healthy_done > self.s.suspect_grace:
                    break
            time.sleep(self.s.poll_interval)
        for key in pending.values():
            missing[key] = f"no reply within {time.monotonic() - start:.0f} s"
            self.suspects.add(node_of_key[key])
        return replies, missing

    def run_record(self) -> ConfigRecord:
        return ConfigRecord(
            {"config": self.config_json, "federation": self.federation_json, "run_key": self.run_key}
        )

    def _handshake(self, nodes: set[int], first: bool = False) -> None:
        """Ask new nodes which client they hold (their node_config) and to check their files against
        the run; an impossible claim, or (``first``: before the run folder exists) a node that cannot
        run it, stops the run with the node's one-line reason. A node joining later that cannot is
        left out."""
        query = RecordDict({protocol.RUN: self.run_record(), protocol.CHECK: ConfigRecord({"round": 0})})
        items = {n: (n, protocol.QUERY, query) for n in nodes}
        replies, missing = self.roundtrip(items, "handshake")
        self.seen |= nodes
        n = self.data.num_clients
        for node, content in sorted(replies.items()):
            info = content.metric_records.get(protocol.NODE)
            if info is not None:
                cid, num = int(info["cid"]), info.get("num_partitions")  # type: ignore[arg-type]
                if not 0 <= cid < n or (num is not None and int(num) != n):  # type: ignore[arg-type]
                    claim = f"partition-id={cid}" + ("" if num is None else f" num-partitions={num}")
                    raise FlowerRunError(
                        f"node {node} has {claim}, but the config makes {n} clients (0..{n - 1})"
                    )
            if protocol.NODE_ERROR in content.config_records or info is None:
                error = content.config_records.get(protocol.NODE_ERROR)
                why = str(error["reason"]) if error is not None else "no answer to which client it holds"
                who = f"node {node}" + ("" if info is None else f" (client {cid})")
                if first:
                    raise FlowerRunError(f"{who} cannot run this config: {why}")
                self.log(f"{who} cannot run this config ({why}); leaving it out")
                self._event("refused", node=node, reason=why)
                continue
            old = self.node_of.get(cid)
            if old is not None and old != node and old in set(self.grid.get_node_ids()):
                if self._answers(old):
                    raise FlowerRunError(
                        f"nodes {old} and {node} both hold client {cid}; give each its own partition-id"
                    )
                # a restarted SuperNode (a new node id) replaces its dead predecessor
                self.log(f"node {node} takes over client {cid} from node {old}, which does not answer")
                self._event("replaced", client=cid, old=old, new=node)
            self.node_of[cid] = node
        for node, why in missing.items():
            self.log(f"node {node} did not answer the handshake ({why}); ignoring it")
        self.node_map.clear()  # the summary's client -> node map: the nodes that hold them now
        self.node_map.update({str(c): n for c, n in sorted(self.node_of.items())})
        self._event("nodes", clients=dict(self.node_map))

    def _answers(self, node: int) -> bool:
        """Whether ``node`` answers a handshake within ``suspect-grace`` (at least 5 s)."""
        item = {node: (node, protocol.QUERY, RecordDict({protocol.RUN: self.run_record()}))}
        replies, _ = self.roundtrip(item, "probe", timeout=max(self.s.suspect_grace, 5.0))
        return node in replies

    def connect(self) -> None:
        """Wait for the SuperNodes (up to ``node_timeout``), then learn who holds which client."""
        want = self.s.min_nodes or self.data.num_clients
        deadline = time.monotonic() + self.s.node_timeout
        nodes = set(self.grid.get_node_ids())
        while len(nodes) < want and time.monotonic() < deadline:
            time.sleep(max(self.s.poll_interval, 0.5))
            nodes = set(self.grid.get_node_ids())
        if not nodes:
            raise FlowerRunError(f"no SuperNode connected within {self.s.node_timeout:.0f} s")
        self._handshake(nodes, first=True)
        if not self.node_of:
            raise FlowerRunError("no SuperNode answered the handshake")
        absent = sorted(set(range(self.data.num_clients)) - set(self.node_of))
        self.log(
            f"{len(self.node_of)} nodes for {self.data.num_clients} clients"
            + (f"; no node for {absent}" if absent else "")
        )

    def _refresh(self, round: int) -> None:
        new = set(self.grid.get_node_ids()) - self.seen
        if new:
            self._handshake(new)

    def exchange(
        self, action: str, msgs: Mapping[int, Message], rnd: int
    ) -> tuple[dict[int, Message], dict[int, str]]:
        """One exchange outside a run (``train.<action>`` to each client): (replies, missing)."""
        got = self.transport.exchange(action, dict(msgs), self.planner.plan(rnd))
        return got.replies, got.missing

    # --- the run -----------------------------------------------------------------------------
    def _row_logged(self, row: dict[str, Any]) -> None:
        metric, _ = primary_metric(self.data.task)
        key = f"{metric}_mean"
        self.log(
            f"round {row['round']}: "
            + ", ".join(f"{k} {row[k]:.4f}" for k in (key, f"global_{metric}") if k in row)
        )

    def _open(self, out: str | Path | None) -> Progress | None:
        """A new run directory, or (``resume``) the existing one and where its checkpoint stands;
        locked for this process either way."""
        cfg = self.cfg
        target = out or self.s.out or None
        identity = run_identity(cfg, self.data, self.algo)
        if self.s.resume:
            if target is None:
                raise ConfigError("run config: resume = true needs out = the run directory to continue")
            self.rd = RunDir.open(target, lock=True)
            file = self.rd.path / RUN_META
            meta = json.loads(file.read_text()) if file.is_file() else {}
            if "run_key" not in meta:
                raise ConfigError(
                    f"run config: resume: {self.rd.path} has no {RUN_META}; "
                    "it is not a Flower run to continue"
                )
            self.run_key = str(meta["run_key"])
            self._record_flower_run(meta)
            ckpt = self.rd.load_checkpoint()
            self.rd.identity = identity
            accepted = check_resume(
                str(self.rd.path), ckpt and ckpt.get("identity"), identity, self.s.accept_mismatch
            )
            if accepted:
                self.rd.record_resume(accepted)
            if ckpt is None:
                self.rd.truncate_metrics(0)
                return Progress(server=self.algo.init_server())
            self.rd.truncate_metrics(ckpt["round"])
            self.transport.checkpointed(ckpt["round"])
            return Progress(
                server=ckpt["server"],
                start=ckpt["round"] + 1,
                elapsed=ckpt["elapsed"],
                best=ckpt["best"],
                last=ckpt.get("last"),
            )
        self.rd = RunDir.create(cfg.output.dir, cfg.name, cfg.seed, target)
        self.rd.identity = identity
        self.rd.write_config(cfg.to_dict())
        self.run_key = f"{self.rd.path.name}-{uuid.uuid4().hex[:12]}"
        self._record_flower_run({"run_key": self.run_key})
        return None

    def _record_flower_run(self, meta: dict[str, Any]) -> None:
        """Add this ServerApp's Flower run id to ``flower-run.json``: the last one listed is the run
        to stop (``flwr stop ID``) before resubmitting after a crash, so the SuperLink drops its
        queued messages instead of the nodes working them off first."""
        assert self.rd is not None
        ids = [int(i) for i in meta.get("flower_run_ids", [])]
        if self.flower_run_id is not None:
            ids.append(int(self.flower_run_id))
        meta = {**meta, "flower_run_ids": ids}
        atomic_write_bytes(self.rd.path / RUN_META, json.dumps(meta).encode())

    def run(self, out: str | Path | None = None) -> RunResult:
        """Run (or resume) the config; a new run's folder is created only once every node has
        checked its files against it, and is locked while this process writes it."""
        try:
            return self._run(out)
        finally:
            if self.rd is not None:
                self.rd.release()

    def _run(self, out: str | Path | None) -> RunResult:
        t0 = time.perf_counter()
        if not self.s.resume:
            runs_a_round(self.algo)
            self.connect()
        progress = self._open(out)
        assert self.rd is not None
        summary = self.rd.read_summary()
        if summary is not None and summary.get("complete"):
            return self._result(summary)
        self.log(f"run directory {self.rd.path}")
        if progress is not None:
            self.log(f"resuming after round {progress.start - 1}")
        if self.s.resume:
            self.connect()
        self._event("open")  # the handshake's events, now that there is a folder for them
        loop = RunLoop(
            self.cfg,
            self.algo,
            self.data,
            lambda r, server: self.runner.run(r, server, self.transport),
            self.transport,
            self.rd,
            self.log,
            on_row=self._row_logged,
            before_round=self._refresh,
        )
        loop.extra_summary = {
            "engine": "flower",
            "nodes": self.node_map,
        }
        if progress is None:
            progress = Progress(server=self.algo.init_server(), elapsed=time.perf_counter() - t0)
        summary = loop.run(progress)
        write_csv(self.rd.path)  # metrics.csv beside metrics.jsonl, as a simulated run leaves it
        return self._result(summary)

    def _result(self, summary: dict[str, Any]) -> RunResult:
        assert self.rd is not None
        rows = self.rd.read_metrics()
        last = summary["final"]["round"]
        return RunResult(
            run_dir=self.rd.path,
            summary=summary,
            rounds=[r for r in rows if r.get("kind") == "round"],
            clients=[r for r in rows if r.get("kind") == "client" and r.get("round") == last],
        )


def _identity(tree: Any) -> Any:
    """A hashable key equal for two views made of the same objects (arrays by identity)."""
    if isinstance(tree, dict):
        return tuple((k, _identity(v)) for k, v in tree.items())
    if isinstance(tree, list | tuple):
        return tuple(_identity(v) for v in tree)
    return tree if isinstance(tree, int | float | str | bool | None) else ("id", id(tree))


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no", ""):
        return False
    raise ValueError(value)


def _reason(reason: str) -> str:
    """The exception text of Flower's ``"<class 'X'>:<'text'>"`` (a node's one-line error)."""
    found = re.fullmatch(r"<class '[\w.]+'>:<'(.*)'>", reason, flags=re.S)
    return found.group(1) if found else reason


def _who(key: Any, node: int) -> str:
    return f"node {node}" if key == node else f"client {key} (node {node})"


def run_on_grid(
    grid: Grid,
    run_config: Mapping[str, Any],
    app_dir: str | Path | None = None,
    flower_run_id: int | None = None,
) -> RunResult:
    """Run the fedmtl config named in ``run_config`` on the nodes behind ``grid``; with ``resume``,
    continue the run in ``out`` with the config it was started with."""
    settings = Settings.from_run_config(run_config)
    if settings.resume and settings.out:
        from fedmtl.config import parse_config

        cfg = parse_config(RunDir.open(settings.out).read_config())
    else:
        cfg = settings.load(app_dir)
    return FlowerServer(grid, cfg, settings, flower_run_id=flower_run_id).run()


def server_app(app_dir: str | Path | None = None) -> ServerApp:
    """A ServerApp that runs the fedmtl config named in the run config (``config``, ``overrides``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            res = run_on_grid(grid, context.run_config, app_dir, int(context.run_id))
        except FedmtlError as exc:  # the one line ``fedmtl flower run`` shows (Flower logs the rest)
            print(f"[fedmtl] error: {exc}", flush=True)
            raise
        print(f"[fedmtl] finished: {res.run_dir}", flush=True)

    return app
