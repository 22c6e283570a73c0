"""Run directories: resolved config, metrics.jsonl, atomic checkpoints, summary.

Nothing is half-written: files are written to a temporary name, fsynced and renamed; metrics lines
past the last checkpoint (or a partial last line after SIGKILL) are dropped on resume. Checkpoints
hold data only (``fedmtl.treefile``: reading one runs no code) and the run's identity
(``fedmtl.experiment.identity``); a process writing a folder holds its lock (``lock``)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from fedmtl import treefile
from fedmtl.errors import RunDirError
from fedmtl.experiment.lock import LOCK, RunLock

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.tree"
#: the checkpoint of fedmtl before data-only files: a pickle, never read (see ``legacy_message``)
LEGACY_CHECKPOINT = "checkpoint.pkl"
SUMMARY = "summary.json"
RESUMES = "resumes.jsonl"
CONVERT = "python tools/convert_pickle_run.py"


def legacy_message(path: Path) -> str:
    """The one line for a pickle an older fedmtl wrote: how to convert it, never a silent load."""
    return (
        f"{path} is a pickle written by an older fedmtl; fedmtl no longer reads pickles (loading one can "
        f"run code). If you trust this folder, convert it with '{CONVERT} {path.parent}' (fedmtl "
        "repository), else run its config.yaml again"
    )


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def dumps(row: dict[str, Any]) -> str:
    return json.dumps(row, default=_json_default, allow_nan=True)


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        #: what run this is (``identity.run_identity``), written into every checkpoint
        self.identity: dict[str, Any] | None = None
        self._lock: RunLock | None = None

    @classmethod
    def create(cls, base: str | Path, name: str, seed: int, out: str | Path | None = None) -> RunDir:
        """A fresh directory, locked for this process; never reuses one that holds anything."""
        if out is not None:
            path = Path(out)
            if path.exists() and (not path.is_dir() or any(p.name != LOCK for p in path.iterdir())):
                raise RunDirError(
                    f"run directory {path} already exists and is not empty; choose another --out"
                )
            path.mkdir(parents=True, exist_ok=True)
            return cls(path).lock()
        root = Path(base)
        root.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for i in range(1000):
            path = root / (f"{name}-{stamp}-s{seed}" + (f"-{i}" if i else ""))
            try:
                path.mkdir()
            except FileExistsError:
                continue
            return cls(path).lock()
        raise RunDirError(f"could not create a new run directory under {root}")

    @classmethod
    def open(cls, path: str | Path, lock: bool = False) -> RunDir:
        """An existing run directory; ``lock``: to write it (resume), refused while another process does."""
        p = Path(path)
        if not (p / CONFIG).is_file():
            raise RunDirError(f"{p} is not a fedmtl run directory (no {CONFIG})")
        rd = cls(p)
        return rd.lock() if lock else rd

    # --- one writer ------------------------------------------------------------------------------
    def lock(self) -> RunDir:
        if self._lock is None:
            self._lock = RunLock(self.path).acquire()
        return self

    def release(self) -> None:
        """Let go of the folder (also done by the process's exit, however it exits)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def record_resume(self, accepted: list[str]) -> None:
        """A resume that went on despite differences from the checkpoint (``--accept-mismatch``)."""
        line = {"t": time.time(), "accepted_mismatch": accepted, "command": " ".join(sys.argv)}
        with open(self.path / RESUMES, "a") as fh:
            fh.write(dumps(line) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    # --- files -------------------------------------------------------------------------------
    def write_config(self, cfg: dict[str, Any]) -> None:
        atomic_write_bytes(self.path / CONFIG, yaml.safe_dump(cfg, sort_keys=False).encode())

    def read_config(self) -> dict[str, Any]:
        try:
            return yaml.safe_load((self.path / CONFIG).read_text()) or {}
        except yaml.YAMLError:
            raise RunDirError(f"{self.path / CONFIG}: invalid YAML") from None

    def append(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        with open(self.path / METRICS, "a") as fh:
            fh.write("".join(dumps(r) + "\n" for r in rows))
            fh.flush()
            os.fsync(fh.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.path / METRICS
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows

    def truncate_metrics(self, last_round: int) -> None:
        """Keep complete lines of rounds <= last_round (atomically)."""
        kept = [r for r in self.read_metrics() if int(r.get("round", 0)) <= last_round]
        atomic_write_bytes(self.path / METRICS, "".join(dumps(r) + "\n" for r in kept).encode())

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        if self.identity is not None:
            state = {**state, "identity": self.identity}
        try:
            data = treefile.encode(state)
        except treefile.TreeFormatError as exc:
            raise RunDirError(f"{self.path / CHECKPOINT}: cannot store the run's state: {exc}") from None
        atomic_write_bytes(self.path / CHECKPOINT, data)

    def load_checkpoint(self) -> dict[str, Any] | None:
        path = self.path / CHECKPOINT
        if not path.exists():
            legacy = self.path / LEGACY_CHECKPOINT
            if legacy.exists():
                raise RunDirError(legacy_message(legacy))
            return None
        try:
            ckpt = treefile.decode(path.read_bytes())
        except OSError as exc:
            raise RunDirError(f"{path}: unreadable checkpoint ({exc.strerror})") from None
        except treefile.TreeFormatError as exc:  # replaced atomically only, so this is not our file
            raise RunDirError(f"{path}: not a fedmtl checkpoint ({exc})") from None
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("round"), int):
            raise RunDirError(f"{path}: not a fedmtl checkpoint (no round)")
        return ckpt

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_bytes(self.path / SUMMARY, json.dumps(summary, indent=2, default=_json_default).encode())

    def read_summary(self) -> dict[str, Any] | None:
        path = self.path / SUMMARY
        return json.loads(path.read_text()) if path.exists() else None
