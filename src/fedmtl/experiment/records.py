"""Run directories: resolved config, metrics.jsonl, atomic checkpoints, summary.

Nothing is half-written: files are written to a temporary name, fsynced and renamed; metrics lines
past the last checkpoint (or a partial last line after SIGKILL) are dropped on resume."""

from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path
from typing import Any

import yaml

from fedmtl.errors import RunDirError

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pkl"
SUMMARY = "summary.json"


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

    @classmethod
    def create(cls, base: str | Path, name: str, seed: int, out: str | Path | None = None) -> RunDir:
        """A fresh directory; never reuses one that holds anything."""
        if out is not None:
            path = Path(out)
            if path.exists() and (not path.is_dir() or any(path.iterdir())):
                raise RunDirError(
                    f"run directory {path} already exists and is not empty; choose another --out"
                )
            path.mkdir(parents=True, exist_ok=True)
            return cls(path)
        root = Path(base)
        root.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for i in range(1000):
            path = root / (f"{name}-{stamp}-s{seed}" + (f"-{i}" if i else ""))
            try:
                path.mkdir()
            except FileExistsError:
                continue
            return cls(path)
        raise RunDirError(f"could not create a new run directory under {root}")

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        p = Path(path)
        if not (p / CONFIG).is_file():
            raise RunDirError(f"{p} is not a fedmtl run directory (no {CONFIG})")
        return cls(p)

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
        atomic_write_bytes(self.path / CHECKPOINT, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))

    def load_checkpoint(self) -> dict[str, Any] | None:
        path = self.path / CHECKPOINT
        if not path.exists():
            return None
        try:
            return pickle.loads(path.read_bytes())
        except Exception as exc:  # a checkpoint is only ever replaced atomically, so this is corruption
            raise RunDirError(f"{path}: unreadable checkpoint ({type(exc).__name__})") from None

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_bytes(self.path / SUMMARY, json.dumps(summary, indent=2, default=_json_default).encode())

    def read_summary(self) -> dict[str, Any] | None:
        path = self.path / SUMMARY
        return json.loads(path.read_text()) if path.exists() else None
