"""A node's client state on its own disk, by run and client, in versions by round.

Flower keeps ``context.state`` for one Flower run in the SuperNode's memory: a restarted SuperNode
or a resumed ServerApp (a new Flower run) would find it empty. So a node writes its client's state
after every step to ``<state-dir>/<run>/client-<cid>.tree`` (atomically, data only: reading it runs
no code, ``fedmtl.treefile``), where ``run`` is the fedmtl
run's key (the same across a ServerApp restart) and ``state-dir`` its ``node_config`` key (default
``$FLWR_HOME/fedmtl-state``, else ``~/.fedmtl/node-state``).

A resumed server repeats the rounds after its last checkpoint, which nodes may already have
trained (the checkpoint of round r is written once round r's evaluation is back, with round r+1's
replies). So the state is kept in versions by the round that wrote it: the first exchange of round
r starts from the latest version before r, a further exchange of the same round (multi-step
protocols) from the latest version up to r, and the evaluation of round r sees the latest up to r.
A repeated round therefore starts where it first started. Versions older than the server's last
checkpoint are dropped, except the newest of them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fedmtl import treefile
from fedmtl.errors import ConfigError, RunDirError
from fedmtl.experiment.records import atomic_write_bytes

State = dict[str, Any]
STATE_DIR = "state-dir"


def state_root(node_config: dict[str, Any]) -> Path:
    if STATE_DIR in node_config:
        return Path(str(node_config[STATE_DIR])).expanduser()
    home = os.environ.get("FLWR_HOME")
    return Path(home) / "fedmtl-state" if home else Path.home() / ".fedmtl" / "node-state"


class NodeStates:
    """One client's state versions on this node (a small in-memory copy, the file the truth)."""

    def __init__(self, root: Path, run: str, cid: int) -> None:
        if not run or "/" in run or run.startswith("."):
            raise ConfigError(f"flower message: bad run key {run!r}")
        self.path = root / run / f"client-{cid}.tree"
        self.versions: dict[int, State] = {}
        if self.path.is_file():
            try:
                versions = treefile.decode(self.path.read_bytes())
            except (OSError, treefile.TreeFormatError) as exc:
                raise RunDirError(
                    f"node state {self.path}: unreadable ({exc}); delete it to start over"
                ) from None
            if not (isinstance(versions, dict) and all(type(r) is int for r in versions)):
                raise RunDirError(
                    f"node state {self.path}: not a node's state versions; delete it to start over"
                )
            self.versions = versions

    def before(self, round: int) -> State | None:
        """The state a round's first exchange starts from: the newest written before ``round``."""
        rounds = [r for r in self.versions if r < round]
        return self.versions[max(rounds)] if rounds else None

    def upto(self, round: int) -> State | None:
        """The newest state written in ``round`` or before (evaluation, later exchanges of a round)."""
        rounds = [r for r in self.versions if r <= round]
        return self.versions[max(rounds)] if rounds else None

    def put(self, round: int, state: State, committed: int) -> None:
        """Keep ``state`` as written by ``round``; forget versions the server will never go back to."""
        self.versions = {r: s for r, s in self.versions.items() if r < round}
        self.versions[round] = state
        kept = [r for r in self.versions if r <= committed]
        if len(kept) > 1:
            for r in sorted(kept)[:-1]:
                del self.versions[r]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, treefile.encode(self.versions))
