"""The run: rounds one after another, the evaluation schedule, the records and the summary.

One loop for every runtime. The simulator and the Flower ServerApp differ only in their
``Transport`` (how messages reach the clients, where client state lives) and in how they report
progress; stop reasons, evaluation rounds, the rows of ``metrics.jsonl``, the best row, checkpoints
and the summary are written here once.

Evaluation runs where the client's data and state are. In-process it is immediate; a transport
may also defer it (Flower sends round r's evaluation with round r+1's first messages, one exchange
per round instead of two): the loop then writes round r once its evaluation has come back, and
rows always reach ``metrics.jsonl`` in round order."""

from __future__ import annotations

import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from fedmtl.algorithms.base import Algorithm
from fedmtl.data.federated import FederatedData
from fedmtl.errors import RunDirError
from fedmtl.experiment.evaluate import (
    eval_sample,
    evaluate_global,
    evaluate_new_clients,
    release_client_eval,
    sample_interval,
)
from fedmtl.experiment.records import RunDir
from fedmtl.metrics import primary_metric, summarize_clients
from fedmtl.runtime.round import RoundResult, Transport

if TYPE_CHECKING:
    from fedmtl.config import Config


class Evaluation(Protocol):
    """The clients' evaluation of one round, possibly still under way."""

    def ready(self) -> bool: ...

    def rows(self) -> tuple[list[dict[str, Any]], dict[int, str]]:
        """(client rows, {client: why it sent none}); waits for them if needed."""
        ...


class Evaluating(Transport, Protocol):
    """A transport that can also have the clients evaluate on their own test splits."""

    def evaluate(self, server: dict[str, Any], round: int, clients: list[int]) -> Evaluation: ...

    def client_states(self) -> MutableMapping[int, dict[str, Any]] | None:
        """The client states to checkpoint, or None where the clients keep them (Flower nodes, on
        their own disks, in versions by round)."""
        ...

    def checkpointed(self, round: int) -> None:
        """The run's checkpoint now holds ``round``: clients may forget older state versions."""
        ...


@dataclass
class Done:
    """An evaluation that is already complete."""

    client_rows: list[dict[str, Any]]
    missing: dict[int, str] = field(default_factory=dict)

    def ready(self) -> bool:
        return True

    def rows(self) -> tuple[list[dict[str, Any]], dict[int, str]]:
        return self.client_rows, self.missing


@dataclass
class _Pending:
    round: int
    train_rows: list[dict[str, Any]]
    row: dict[str, Any]
    last: bool
    server: dict[str, Any]
    evaluation: Evaluation | None = None
    eval_clients: list[int] = field(default_factory=list)
    server_rows: list[dict[str, Any]] = field(default_factory=list)
    server_metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Progress:
    """Where a run stands: what a checkpoint restores."""

    server: dict[str, Any]
    start: int = 1
    elapsed: float = 0.0
    best: dict[str, Any] | None = None
    last: dict[str, Any] | None = None


class RunLoop:
    """Rounds ``progress.start .. train.rounds``, each ``run_round(round, server)`` (a
    ``RoundRunner`` over ``transport``), recorded in ``rd``."""

    def __init__(
        self,
        cfg: Config,
        algo: Algorithm,
        data: FederatedData,
        run_round: Callable[[int, dict[str, Any]], RoundResult],
        transport: Evaluating,
        rd: RunDir,
        log: Callable[[str], None],
        on_row: Callable[[dict[str, Any]], None] | None = None,
        before_round: Callable[[int], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.algo = algo
        self.data = data
        self.run_round = run_round
        self.transport = transport
        self.rd = rd
        self.log = log
        self.on_row = on_row
        self.before_round = before_round
        metric, self.higher = primary_metric(data.task)
        self.metric = metric
        self.key = f"{metric}_mean"
        self.pending: list[_Pending] = []
        self.stopped: str | None = None
        #: what the runtime adds to the summary (Flower: the engine and which node holds which client)
        self.extra_summary: dict[str, Any] = {}

    def run(self, progress: Progress) -> dict[str, Any]:
        """Run to the end (or a stop reason); returns the summary, also written to the run dir."""
        self.progress = progress
        self.t0 = time.perf_counter() - progress.elapsed
        server = progress.server
        total = self.cfg.train.rounds
        algo = self.algo
        stopped: str | None = None
        for r in range(progress.start, total + 1):
            if stopped is None:
                stopped = algo.stop_reason(server, r)
            if stopped is not None:
                # Deterministic in the server state, so a resumed run stops at the same round.
                self.log(f"stopped before round {r}: {stopped}")
                break
            if self.before_round is not None:
                self.before_round(r)
            res = self.run_round(r, server)
            server = res.server
            self._flush(force=False)  # a deferred evaluation may have come back with this round
            # A run that stops behind this round evaluates and checkpoints it like a last round.
            last = r == total or (stopped := algo.stop_reason(server, r + 1)) is not None
            row = {"round": r, "kind": "round", **res.info, **algo.round_info(server)}
            entry = _Pending(r, list(res.train_rows), row, last, server)
            if r % self.cfg.eval.every == 0 or last:
                if algo.evaluates_clients():
                    entry.eval_clients = eval_sample(
                        self.data.train_clients, self.cfg.eval.clients, self.cfg.seed, r
                    )
                entry.evaluation = self.transport.evaluate(server, r, entry.eval_clients)
                entry.server_rows, entry.server_metrics = self._server_side(server, r)
            self.pending.append(entry)
            self._flush(force=False)
        self._flush(force=True)
        self.stopped = stopped
        return self._summary()

    def _server_side(self, server: dict[str, Any], r: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """What is evaluated on the server's data: held-out (new) clients and the global test set."""
        rows: list[dict[str, Any]] = []
        metrics: dict[str, Any] = {}
        if self.data.holdout:
            ev = self.cfg.eval
            rows = evaluate_new_clients(
                self.algo, server, self.data, r, ev.new_client_steps, ev.new_client_lr
            )
            metrics.update({f"new_{k}": v for k, v in summarize_clients(rows).items()})
        if self.cfg.eval.global_test:
            metrics.update(evaluate_global(self.algo, server, self.data))
        return rows, metrics

    def _flush(self, force: bool) -> None:
        """Write every finished round, in order (one whose evaluation is still out waits, and so do
        the rounds after it, unless ``force``)."""
        while self.pending:
            entry = self.pending[0]
            if not force and entry.evaluation is not None and not entry.evaluation.ready():
                return
            self.pending.pop(0)
            self._write(entry)

    def _write(self, entry: _Pending) -> None:
        rows, row = entry.train_rows, entry.row
        if entry.evaluation is not None:
            client_rows, missing = entry.evaluation.rows()
            evaluated = {c["client"] for c in client_rows}
            released, summary = release_client_eval(self.algo, client_rows, entry.round)
            rows += released + entry.server_rows
            row.update(summary)
            population = len(self.data.train_clients)
            if self.cfg.eval.clients is not None:  # a sample: how far its means may be from all clients'
                row["eval_clients"] = len(entry.eval_clients)
                row["eval_population"] = population
                if released:
                    row.update(sample_interval(client_rows, population))
            row.update(entry.server_metrics)
            lost = sorted(set(entry.eval_clients) - evaluated)
            if lost:
                row["eval_missing_clients"] = lost
                row["eval_missing_reasons"] = {str(c): missing.get(c, "no reply") for c in lost}
        row["wall_time"] = time.perf_counter() - self.t0
        rows.append(row)
        self.rd.append(rows)
        p = self.progress
        # The best round is chosen on validation rows (data.val_fraction), never on test rows; without
        # a validation split it is the last evaluated round.
        key, best = f"val_{self.key}", p.best
        if key in row:
            if (
                best is None
                or key not in best
                or (row[key] > best[key] if self.higher else row[key] < best[key])
            ):
                p.best = row
        elif self.key in row:
            p.best = row
        p.last = row
        r = entry.round
        states = self.transport.client_states()
        if r % self.cfg.output.checkpoint_every == 0 or entry.last:
            # a client-state store writes what changed as a segment; the checkpoint names them
            commit = getattr(states, "commit", None)
            segments = commit() if commit is not None else None
            if states is None:  # the clients keep them
                clients: Any = {"format": "nodes"}
            else:
                clients = states if segments is None else {"format": "segments", "segments": segments}
            self.rd.save_checkpoint(
                {
                    "round": r,
                    "server": entry.server,
                    "clients": clients,
                    "best": p.best,
                    "elapsed": row["wall_time"],
                    "last": p.last,
                }
            )
            if segments is not None:
                states.committed(segments)  # type: ignore[union-attr]
            self.transport.checkpointed(r)
        if self.on_row is not None:
            self.on_row(row)

    def _summary(self) -> dict[str, Any]:
        last = self.progress.last
        if last is None:
            raise RunDirError(f"{self.rd.path}: nothing to run (train.rounds = {self.cfg.train.rounds})")
        cfg = self.cfg
        summary = {
            "name": cfg.name,
            "algorithm": cfg.algorithm.name,
            "dataset": cfg.data.dataset,
            "seed": cfg.seed,
            "primary_metric": self.metric,
            "higher_is_better": self.higher,
            "rounds_completed": last["round"],
            "complete": True,
            "stopped": self.stopped,
            "final": last,
            "best": self.progress.best if self.progress.best is not None else last,
            "best_by": "validation"
            if f"val_{self.key}" in (self.progress.best or {})
            else "last evaluated round",
            "wall_time": last["wall_time"],
            "bytes_total": sum(
                r.get("bytes_up", 0) + r.get("bytes_down", 0)
                for r in self.rd.read_metrics()
                if r.get("kind") == "round"
            ),
            "data": self.data.summary(),
            **self.extra_summary,
        }
        self.rd.write_summary(summary)
        return summary
