"""The ServerApp side: drive any fedmtl algorithm's server step over Flower's ``Grid``.

The round is the simulator's round, moved onto the wire: the same client sampling, work fractions,
simulated drops and learning-rate schedule (imported from ``fedmtl.runtime.simulation``), the same
``broadcast``/``server_step`` calls, the same evaluation code (run by each node on its own test
split) and the same run directory (config.yaml, metrics.jsonl, summary.json). So a seed gives the
metrics the in-process simulator gives, and ``fedmtl report``/``compare`` read Flower runs as they are.

Flower's costs shape two choices. Every message starts a fresh ClientApp process on the node, so the
evaluation of round r travels with round r+1's train messages (one exchange per round, not two).
Real nodes fail, so every exchange has a deadline: a node that misses it is recorded as missing for
that round, and until it answers again it only gets a short grace period instead of the full
deadline, so one dead node does not stall every later round."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.app import Message as FlowerMessage
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from fedmtl.algorithms.base import Message
from fedmtl.config import Config, load_config
from fedmtl.errors import ConfigError, FedmtlError
from fedmtl.experiment.evaluate import evaluate_global, release_client_eval
from fedmtl.experiment.records import RunDir, dumps
from fedmtl.experiment.run import RunResult, build
from fedmtl.flower import codec, protocol
from fedmtl.metrics import primary_metric, summarize_clients
from fedmtl.runtime.simulation import round_driver, round_lr
from fedmtl.runtime.validation import merge_rejections, reply_problem

K = TypeVar("K")
EVENTS = "flower.jsonl"
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

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> Settings:
        known = {f.replace("_", "-"): f for f in cls.__dataclass_fields__}
        kwargs: dict[str, Any] = {}
        for key, value in run_config.items():
            if key not in known:
                raise ConfigError(f"run config: unknown key {key!r}; allowed: {', '.join(sorted(known))}")
            default = getattr(cls, known[key])
            try:
                kwargs[known[key]] = type(default)(value)
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


@dataclass
class _Pending:
    """A finished round whose evaluation rides on the next exchange."""

    round: int
    view: Callable[[int], RecordDict]  # eval records for a client id
    train_rows: list[dict[str, Any]]
    row: dict[str, Any]
    server_rows: list[dict[str, Any]] = field(default_factory=list)  # evaluated here (new clients)
    server_metrics: dict[str, float] = field(default_factory=dict)  # new-client summary, global test


class FlowerServer:
    """Runs one fedmtl config over a Grid: handshake, rounds, evaluation, records."""

    def __init__(self, grid: Grid, cfg: Config, settings: Settings, log: Callable[[str], None] | None = None):
        self.grid = grid
        self.cfg = cfg
        self.s = settings
        self.log = log or (lambda text: print(f"[fedmtl] {text}", flush=True))
        self.data, self.algo, self.sim = build(cfg)
        if hasattr(self.algo, "attach_exchange"):  # multi-stage protocols (secure aggregation)
            self.algo.attach_exchange(self.exchange)
        self.config_json = json.dumps(cfg.to_dict())
        self.node_of: dict[int, int] = {}  # client id -> node id
        self.seen: set[int] = set()  # node ids already asked which client they hold
        self.suspects: set[int] = set()  # node ids that missed their last deadline
        self.rd: RunDir | None = None
        self.t0 = time.perf_counter()
        self.best: dict[str, Any] | None = None
        self.last: dict[str, Any] | None = None

    # --- transport ---------------------------------------------------------------------------
    def _event(self, event: str, **fields: Any) -> None:
        if self.rd is not None:
            with open(self.rd.path / EVENTS, "a") as fh:
                fh.write(dumps({"t": time.time(), "event": event, **fields}) + "\n")

    def _roundtrip(
        self, items: Mapping[K, tuple[int, str, RecordDict]], group: str
    ) -> tuple[dict[K, RecordDict], dict[K, str]]:
        """Send ``key -> (node, message type, content)``; return replies and reasons for the missing."""
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
                        raise FlowerRunError(f"{_who(key, node_of_key[key])} failed: {err.reason}")
                    missing[key] = f"error {err.code}: {err.reason}"
                else:
                    replies[key] = reply.content
                    self.suspects.discard(node_of_key[key])
            if not pending:
                break
            now = time.monotonic()
            if now - start > self.s.round_timeout:
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

    def _run_record(self) -> ConfigRecord:
        return ConfigRecord({"config": self.config_json})

    def _handshake(self, nodes: set[int]) -> None:
        """Ask new nodes which client they hold (their node_config); an impossible claim stops the run."""
        items = {n: (n, protocol.QUERY, RecordDict({protocol.RUN: self._run_record()})) for n in nodes}
        replies, missing = self._roundtrip(items, "handshake")
        self.seen |= nodes
        n = self.data.num_clients
        for node, content in replies.items():
            info = content.metric_records[protocol.NODE]
            cid, num = int(info["cid"]), info.get("num_partitions")  # type: ignore[arg-type]
            if not 0 <= cid < n or (num is not None and int(num) != n):  # type: ignore[arg-type]
                claim = f"partition-id={cid}" + ("" if num is None else f" num-partitions={num}")
                raise FlowerRunError(
                    f"node {node} has {claim}, but the config makes {n} clients (0..{n - 1})"
                )
            old = self.node_of.get(cid)
            if old is not None and old != node and old in set(self.grid.get_node_ids()):
                raise FlowerRunError(
                    f"nodes {old} and {node} both hold client {cid}; give each its own partition-id"
                )
            self.node_of[cid] = node
        for node, why in missing.items():
            self.log(f"node {node} did not answer the handshake ({why}); ignoring it")
        self._event("nodes", clients={str(c): n for c, n in sorted(self.node_of.items())})

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
        self._handshake(nodes)
        if not self.node_of:
            raise FlowerRunError("no SuperNode answered the handshake")
        absent = sorted(set(range(self.data.num_clients)) - set(self.node_of))
        self.log(
            f"{len(self.node_of)} nodes for {self.data.num_clients} clients"
            + (f"; no node for {absent}" if absent else "")
        )

    def _refresh(self) -> None:
        new = set(self.grid.get_node_ids()) - self.seen
        if new:
            self._handshake(new)

    # --- messages ----------------------------------------------------------------------------
    def _content(self, cid: int, rnd: int, fraction: float = 1.0) -> RecordDict:
        work = {"cid": cid, "round": rnd, "fraction": float(fraction), "lr": float(round_lr(self.cfg, rnd))}
        return RecordDict({protocol.RUN: self._run_record(), protocol.WORK: ConfigRecord(work)})  # type: ignore[arg-type]

    def _eval_view(self, server: dict[str, Any], rnd: int) -> Callable[[int], RecordDict]:
        """Eval records per client: the server state (or the algorithm's ``eval_view(server, cid)``)."""
        view_fn = getattr(self.algo, "eval_view", None)
        shared: RecordDict | None = None

        def records(cid: int) -> RecordDict:
            nonlocal shared
            if view_fn is None and shared is not None:
                return shared
            out = RecordDict({protocol.EVAL: ConfigRecord({"round": rnd})})
            codec.put_tree(out, protocol.EVAL_VIEW, server if view_fn is None else view_fn(server, cid))
            if view_fn is None:
                shared = out
            return out

        records(0)  # encode now: the server state may change in place in later steps
        return records

    def exchange(
        self, action: str, msgs: Mapping[int, Message], rnd: int
    ) -> tuple[dict[int, Message], dict[int, str]]:
        """One step of a multi-step protocol: ``train.<action>`` to each client, replies back.

        For algorithms that declare ``client_actions`` (e.g. split learning); the client runs the
        named method with the client step's signature and its state from ``context.state``."""
        items = {}
        missing: dict[int, str] = {}
        for cid, msg in msgs.items():
            if cid not in self.node_of:
                missing[cid] = "no node holds this client"
                continue
            content = self._content(cid, rnd, self.sim.systems(rnd, cid)[0])
            codec.put_message(content, protocol.MSG, msg)
            items[cid] = (self.node_of[cid], f"{protocol.TRAIN}.{action}", content)
        replies, lost = self._roundtrip(items, f"{rnd}.{action}")
        return {c: codec.get_message(r, protocol.REPLY) for c, r in replies.items()}, {**missing, **lost}

    # --- rounds ------------------------------------------------------------------------------
    def _attach_eval(self, items: dict[int, tuple[int, str, RecordDict]], p: _Pending, rnd: int) -> None:
        """Every client with a node evaluates round ``p.round``: on its train message, or alone."""
        for cid in self._eval_clients():
            if cid not in self.node_of:
                continue
            if cid not in items:
                items[cid] = (self.node_of[cid], protocol.EVALUATE, self._content(cid, rnd))
            for key, record in p.view(cid).items():
                items[cid][2][key] = record

    def _eval_due(self, rnd: int, server: dict[str, Any]) -> bool:
        """Evaluate on schedule, after the last round, and after a round the run stops behind."""
        every, last = self.cfg.eval.every, self.cfg.train.rounds
        return rnd % every == 0 or rnd == last or self.algo.stop_reason(server, rnd + 1) is not None

    def _eval_clients(self) -> list[int]:
        """The clients evaluated on their own test split (held-out clients are not)."""
        return list(getattr(self.data, "train_clients", range(self.data.num_clients)))

    def _server_side_eval(
        self, server: dict[str, Any], rnd: int
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """What the in-process loop evaluates on the server's data: new clients and the global test."""
        rows: list[dict[str, Any]] = []
        metrics: dict[str, Any] = {}
        if getattr(self.data, "holdout", None):
            from fedmtl.experiment.evaluate import evaluate_new_clients

            ev = self.cfg.eval
            rows = evaluate_new_clients(
                self.algo, server, self.data, rnd, ev.new_client_steps, ev.new_client_lr
            )
            metrics.update({f"new_{k}": v for k, v in summarize_clients(rows).items()})
        if self.cfg.eval.global_test:
            metrics.update(evaluate_global(self.algo, server, self.data))
        return rows, metrics

    def _finish_eval(self, p: _Pending, replies: dict[int, RecordDict], missing: dict[int, str]) -> None:
        client_rows: list[dict[str, Any]] = []
        for cid in self._eval_clients():
            reply = replies.get(cid)
            if reply is not None and codec.has_tree(reply, protocol.EVAL_ROW):
                client_rows += codec.get_tree(reply, protocol.EVAL_ROW)
        row = p.row
        evaluated = {c["client"] for c in client_rows}
        client_rows, summary = release_client_eval(self.algo, client_rows, p.round)
        row.update(summary)
        row.update(p.server_metrics)
        lost = sorted(set(self._eval_clients()) - evaluated)
        if lost:
            row["eval_missing_clients"] = lost
            row["eval_missing_reasons"] = {str(c): missing.get(c, "no node holds this client") for c in lost}
        self._write(p.train_rows + client_rows + p.server_rows + [row])

    def _write(self, rows: list[dict[str, Any]]) -> None:
        row = rows[-1]
        row["wall_time"] = time.perf_counter() - self.t0
        assert self.rd is not None
        self.rd.append(rows)
        metric, higher = primary_metric(self.data.task)
        key = f"{metric}_mean"
        best = self.best
        if key in row and (best is None or (row[key] > best[key] if higher else row[key] < best[key])):
            self.best = row
        self.last = row
        self.log(
            f"round {row['round']}: "
            + ", ".join(f"{k} {row[k]:.4f}" for k in (key, f"global_{metric}") if k in row)
        )

    def _round(
        self, rnd: int, server: dict[str, Any], pending: _Pending | None
    ) -> tuple[dict[str, Any], _Pending | None]:
        if round_driver(self.algo) is not None:
            return self._driven_round(rnd, server, pending)
        algo, sim = self.algo, self.sim
        lr = round_lr(self.cfg, rnd)
        rows: dict[int, dict[str, Any]] = {}
        sent: dict[int, Message] = {}
        items: dict[int, tuple[int, str, RecordDict]] = {}
        for cid in sim.sample(rnd):
            frac, dropped = sim.systems(rnd, cid)
            msg = algo.broadcast(server, cid)
            row: dict[str, Any] = {
                "round": rnd, "kind": "train", "client": cid, "work": frac, "dropped": dropped,
                "bytes_down": msg.nbytes, "bytes_up": 0,
            }  # fmt: skip
            rows[cid] = row
            if dropped:
                row["sim_time"] = sim.comm_seconds(0, msg.nbytes)
                continue
            sent[cid] = msg
            if cid not in self.node_of:
                continue
            content = self._content(cid, rnd, frac)
            codec.put_message(content, protocol.MSG, msg)
            items[cid] = (self.node_of[cid], protocol.TRAIN, content)
        if pending is not None:
            self._attach_eval(items, pending, rnd)
        t = time.perf_counter()
        replies, missing = self._roundtrip(items, str(rnd))
        exchange_time = time.perf_counter() - t
        if pending is not None:
            self._finish_eval(pending, replies, missing)

        got: dict[int, Message] = {}
        rejected: list[int] = []
        losses, weights = [], []
        for cid, msg in sent.items():
            row = rows[cid]
            content = replies.get(cid)
            if content is None or not codec.has_message(content, protocol.REPLY):
                row.update(missing=True, reason=missing.get(cid, "no node holds this client"))
                row["sim_time"] = sim.comm_seconds(0, msg.nbytes)
                continue
            reply = codec.get_message(content, protocol.REPLY)
            samples = float(reply.scalars.get("samples", 0))
            row.update(
                compute_wall=float(content.metric_records[protocol.META]["compute_wall"]),  # type: ignore[arg-type]
                bytes_up=reply.nbytes,
                steps=int(reply.scalars.get("steps", 0)),
                train_loss=float(reply.scalars.get("train_loss", float("nan"))),
                sim_time=samples * sim.flops / (self.cfg.runtime.client_gflops * 1e9)
                + sim.comm_seconds(reply.nbytes, msg.nbytes),
            )
            problem = reply_problem(reply)
            if problem is not None:  # not aggregated; the node keeps its own state (it lives there)
                rejected.append(cid)
                row["rejected"] = problem
                continue
            got[cid] = reply
            if "train_loss" in reply.scalars:
                losses.append(row["train_loss"])
                weights.append(samples)
        server = algo.server_step(server, got, rnd)
        train_rows = list(rows.values())
        info: dict[str, Any] = {
            "sampled": len(train_rows),
            "dropped": sum(r["dropped"] for r in train_rows),
            "dropped_clients": [r["client"] for r in train_rows if r["dropped"]],
            "bytes_up": int(sum(r["bytes_up"] for r in train_rows)),
            "bytes_down": int(sum(r["bytes_down"] for r in train_rows)),
            "sim_time": max((r["sim_time"] for r in train_rows), default=0.0),
            "lr": lr,
            "execution": "flower",
            "rejected_clients": rejected,
        }
        if losses and sum(weights) > 0:
            info["train_loss"] = float(np.average(losses, weights=weights))
        lost = sorted(c for c in sent if c not in got and c not in rejected)
        info.update(missing_clients=lost, exchange_time=exchange_time, nodes=len(self.node_of))
        if lost:
            info["missing_reasons"] = {str(c): rows[c]["reason"] for c in lost}
            self.log(f"round {rnd}: no reply from clients {lost}; aggregated {sorted(got)}")
        round_info = getattr(algo, "round_info", None)
        extra = round_info(server) if round_info else {}
        row = merge_rejections({"round": rnd, "kind": "round", **info, **extra})
        if self._eval_due(rnd, server):
            server_rows, server_metrics = self._server_side_eval(server, rnd)
            return server, _Pending(
                rnd, self._eval_view(server, rnd), train_rows, row, server_rows, server_metrics
            )
        self._write(train_rows + [row])
        return server, None

    def _driven_round(
        self, rnd: int, server: dict[str, Any], pending: _Pending | None
    ) -> tuple[dict[str, Any], _Pending | None]:
        """A round of a multi-step protocol (``drive_round``): the algorithm drives its exchanges
        through ``exchange``. The previous round's evaluation goes first, on its own, so every node
        evaluates the state it ended that round with."""
        sim = self.sim
        if pending is not None:
            items: dict[int, tuple[int, str, RecordDict]] = {}
            self._attach_eval(items, pending, rnd)
            replies, missing = self._roundtrip(items, f"{pending.round}.eval")
            self._finish_eval(pending, replies, missing)
        rows: dict[int, dict[str, Any]] = {}
        for cid in sim.sample(rnd):
            frac, dropped = sim.systems(rnd, cid)
            rows[cid] = {
                "round": rnd, "kind": "train", "client": cid, "work": frac, "dropped": dropped,
                "bytes_down": 0, "bytes_up": 0,
            }  # fmt: skip
        transport = _FlowerTransport(self, [c for c, r in rows.items() if not r["dropped"]], rnd)
        t = time.perf_counter()
        server, driven = self.algo.drive_round(server, transport, rnd) if transport.clients else (server, {})  # type: ignore[attr-defined]
        exchange_time = time.perf_counter() - t
        losses, weights = [], []
        for cid, row in rows.items():
            row["bytes_up"], row["bytes_down"] = transport.up.get(cid, 0), transport.down.get(cid, 0)
            row["sim_time"] = sim.comm_seconds(row["bytes_up"], row["bytes_down"])
            reply = driven.get(cid)
            if reply is None:
                if not row["dropped"]:
                    row.update(missing=True, reason=transport.missing.get(cid, "no reply"))
                continue
            samples = float(reply.scalars.get("samples", 0))
            row.update(
                steps=int(reply.scalars.get("steps", 0)),
                train_loss=float(reply.scalars.get("train_loss", float("nan"))),
            )
            flops = float(reply.scalars.get("client_flops", samples * sim.flops))
            row["sim_time"] = flops / (self.cfg.runtime.client_gflops * 1e9) + row["sim_time"]
            losses.append(row["train_loss"])
            weights.append(samples)
        train_rows = list(rows.values())
        lost = sorted(c for c in transport.clients if c not in driven)
        info: dict[str, Any] = {
            "sampled": len(train_rows),
            "dropped": sum(r["dropped"] for r in train_rows),
            "dropped_clients": [r["client"] for r in train_rows if r["dropped"]],
            "bytes_up": int(sum(r["bytes_up"] for r in train_rows)),
            "bytes_down": int(sum(r["bytes_down"] for r in train_rows)),
            "sim_time": max((r["sim_time"] for r in train_rows), default=0.0),
            "lr": round_lr(self.cfg, rnd),
            "execution": "flower",
            "rejected_clients": [],
            "missing_clients": lost,
            "exchange_time": exchange_time,
            "nodes": len(self.node_of),
        }
        if losses and sum(weights) > 0:
            info["train_loss"] = float(np.average(losses, weights=weights))
        if lost:
            info["missing_reasons"] = {str(c): transport.missing.get(c, "no reply") for c in lost}
        row = merge_rejections({"round": rnd, "kind": "round", **info, **self.algo.round_info(server)})
        if self._eval_due(rnd, server):
            server_rows, server_metrics = self._server_side_eval(server, rnd)
            return server, _Pending(
                rnd, self._eval_view(server, rnd), train_rows, row, server_rows, server_metrics
            )
        self._write(train_rows + [row])
        return server, None

    def run(self, out: str | Path | None = None) -> RunResult:
        cfg = self.cfg
        self.rd = RunDir.create(cfg.output.dir, cfg.name, cfg.seed, out or self.s.out or None)
        self.rd.write_config(cfg.to_dict())
        self.log(f"run directory {self.rd.path}")
        self.t0 = time.perf_counter()
        self.connect()
        server = self.algo.init_server()
        pending: _Pending | None = None
        for rnd in range(1, cfg.train.rounds + 1):
            self.stopped = self.algo.stop_reason(server, rnd)  # e.g. a privacy budget it would exceed
            if self.stopped is not None:
                self.log(f"stopped before round {rnd}: {self.stopped}")
                break
            self._refresh()
            server, pending = self._round(rnd, server, pending)
        if pending is not None:
            items: dict[int, tuple[int, str, RecordDict]] = {}
            self._attach_eval(items, pending, pending.round)
            replies, missing = self._roundtrip(items, f"{pending.round}.eval")
            self._finish_eval(pending, replies, missing)
        return self._summarize()

    def _summarize(self) -> RunResult:
        assert self.rd is not None and self.last is not None
        metric, higher = primary_metric(self.data.task)
        rows = self.rd.read_metrics()
        summary = {
            "name": self.cfg.name,
            "algorithm": self.cfg.algorithm.name,
            "dataset": self.cfg.data.dataset,
            "seed": self.cfg.seed,
            "primary_metric": metric,
            "higher_is_better": higher,
            "rounds_completed": self.last["round"],
            "complete": True,
            "stopped": getattr(self, "stopped", None),
            "final": self.last,
            "best": self.best if self.best is not None else self.last,
            "wall_time": self.last["wall_time"],
            "bytes_total": sum(
                r.get("bytes_up", 0) + r.get("bytes_down", 0) for r in rows if r.get("kind") == "round"
            ),
            "data": self.data.summary(),
            "engine": "flower",
            "nodes": {str(c): n for c, n in sorted(self.node_of.items())},
        }
        self.rd.write_summary(summary)
        last = summary["final"]["round"]
        return RunResult(
            run_dir=self.rd.path,
            summary=summary,
            rounds=[r for r in rows if r.get("kind") == "round"],
            clients=[r for r in rows if r.get("kind") == "client" and r.get("round") == last],
        )


class _FlowerTransport:
    """``drive_round``'s transport on Flower: each exchange is one ``FlowerServer.exchange``; bytes
    counted per client each way; a client that misses an exchange is out for the rest of the round."""

    def __init__(self, srv: FlowerServer, clients: list[int], rnd: int) -> None:
        self.srv = srv
        self.clients = list(clients)
        self.rnd = rnd
        self.up: dict[int, int] = {}
        self.down: dict[int, int] = {}
        self.missing: dict[int, str] = {}

    def exchange(self, action: str, msgs: Mapping[int, Message]) -> dict[int, Message]:
        msgs = {c: m for c, m in msgs.items() if c not in self.missing}
        for c, m in msgs.items():
            self.down[c] = self.down.get(c, 0) + m.nbytes
        replies, missing = self.srv.exchange(action, msgs, self.rnd)
        for c, m in replies.items():
            self.up[c] = self.up.get(c, 0) + m.nbytes
        for c, why in missing.items():
            self.missing.setdefault(c, f"{action}: {why}")
        return replies


def _who(key: Any, node: int) -> str:
    return f"node {node}" if key == node else f"client {key} (node {node})"


def run_on_grid(grid: Grid, run_config: Mapping[str, Any], app_dir: str | Path | None = None) -> RunResult:
    """Run the fedmtl config named in ``run_config`` on the nodes behind ``grid``."""
    settings = Settings.from_run_config(run_config)
    return FlowerServer(grid, settings.load(app_dir), settings).run()


def server_app(app_dir: str | Path | None = None) -> ServerApp:
    """A ServerApp that runs the fedmtl config named in the run config (``config``, ``overrides``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        res = run_on_grid(grid, context.run_config, app_dir)
        print(f"[fedmtl] finished: {res.run_dir}", flush=True)

    return app
