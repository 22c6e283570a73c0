"""Per-client state (personal models, heads, optimizer state, duals, selection state) whose memory
and checkpoint cost follow the clients a run touches, not the population.

``ClientStates`` is a mapping from client id to state with three tiers: a least-recently-used cache
in memory, bounded in bytes (``runtime.state_cache_mib``); spill files for changed states the cache
had to let go before the next checkpoint; and segments, the checkpointed states. A checkpoint
writes one new segment holding only the states changed since the previous one, then the run's
checkpoint file names the segments that make up the state (atomically replaced, as before): a crash
between the two leaves an unnamed segment, which the next open deletes. When superseded entries
outweigh live ones (``COMPACT_RATIO``), a checkpoint writes all live states into one segment and the
old segments go. A resumed run reads back exactly what was written (each state a data-only
``fedmtl.treefile`` record: loading it runs no code), so it continues as an uninterrupted run would."""

from __future__ import annotations

import os
import shutil
from collections import OrderedDict
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import numpy as np

from fedmtl import treefile
from fedmtl.errors import RunDirError
from fedmtl.experiment.records import atomic_write_bytes

State = dict[str, Any]
SPILL = "spill"
#: compact when superseded bytes exceed this many times the live bytes (and MIN_COMPACT_BYTES)
COMPACT_RATIO = 3.0
MIN_COMPACT_BYTES = 64 * 2**20


def state_bytes(state: State) -> int:
    """Approximate memory of a state: its arrays' bytes plus a small overhead per entry."""
    total = 64
    for v in state.values():
        if isinstance(v, np.ndarray):
            total += v.nbytes + 112
        elif isinstance(v, dict):
            total += state_bytes(v)
        else:
            total += 64
    return total


class ClientStates(MutableMapping[int, State]):
    def __init__(self, root: Path, cache_bytes: int, segments: list[str] | None = None) -> None:
        self.root = Path(root)
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[int, tuple[State, int]] = OrderedDict()
        self._cached_bytes = 0
        self._dirty: set[int] = set()
        self._spilled: set[int] = set()
        #: committed states: client -> (segment, offset, length)
        self._where: dict[int, tuple[str, int, int]] = {}
        self._segments: list[str] = []
        self._segment_bytes: dict[str, int] = {}
        self._next = 0
        #: bytes written by the last commit (segment and index), for benchmarks
        self.last_commit_bytes = 0
        self._open(segments or [])

    # --- opening ------------------------------------------------------------------------------
    def _open(self, segments: list[str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.root / SPILL, ignore_errors=True)  # changes after the last checkpoint
        keep = set(segments)
        for p in self.root.glob("seg-*"):
            if p.name.split(".")[0] not in keep:
                p.unlink()  # written by a checkpoint that never committed, or compacted away
        for p in self.root.glob(".seg-*"):
            p.unlink()  # a write cut short
        for name in segments:
            index = self._read_index(name)
            for cid, offset, length in index.tolist():
                self._where[int(cid)] = (name, int(offset), int(length))
            self._segments.append(name)
            self._segment_bytes[name] = int(index[:, 2].sum()) if len(index) else 0
        self._next = 1 + max((int(n.split("-")[1]) for n in segments), default=-1)

    def _read_index(self, name: str) -> np.ndarray:
        path = self.root / f"{name}.idx.npy"
        try:
            return np.load(path, allow_pickle=False).reshape(-1, 3)
        except (OSError, ValueError) as exc:
            raise RunDirError(f"{path}: unreadable client-state index ({type(exc).__name__})") from None

    # --- mapping ------------------------------------------------------------------------------
    def __getitem__(self, cid: int) -> State:
        hit = self._cache.get(cid)
        if hit is not None:
            self._cache.move_to_end(cid)
            return hit[0]
        if cid in self._spilled:
            state = self._load(self.root / SPILL / f"{cid}.tree", 0, -1)
        elif cid in self._where:
            name, offset, length = self._where[cid]
            state = self._load(self.root / f"{name}.bin", offset, length)
        else:
            raise KeyError(cid)
        self._keep(cid, state)
        return state

    def __setitem__(self, cid: int, state: State) -> None:
        cid = int(cid)
        self._drop_cached(cid)
        self._dirty.add(cid)
        self._keep(cid, state)

    def __delitem__(self, cid: int) -> None:  # states are never removed by a run
        raise TypeError("client states are kept for the whole run")

    def __contains__(self, cid: object) -> bool:
        return cid in self._cache or cid in self._spilled or cid in self._where

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(set(self._cache) | self._spilled | set(self._where)))

    def __len__(self) -> int:
        return len(set(self._cache) | self._spilled | set(self._where))

    @property
    def cached(self) -> int:
        """States held in memory now."""
        return len(self._cache)

    # --- cache --------------------------------------------------------------------------------
    def _keep(self, cid: int, state: State) -> None:
        size = state_bytes(state)
        self._cache[cid] = (state, size)
        self._cached_bytes += size
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            old, (old_state, old_size) = self._cache.popitem(last=False)
            self._cached_bytes -= old_size
            if old in self._dirty:  # changed since the checkpoint: keep it on disk until then
                spill = self.root / SPILL
                spill.mkdir(exist_ok=True)
                (spill / f"{old}.tree").write_bytes(_encode(old, old_state))
                self._spilled.add(old)

    def _drop_cached(self, cid: int) -> None:
        hit = self._cache.pop(cid, None)
        if hit is not None:
            self._cached_bytes -= hit[1]

    def _load(self, path: Path, offset: int, length: int) -> State:
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                raw = bytearray(fh.read() if length < 0 else fh.read(length))
            return treefile.decode(raw)
        except OSError as exc:
            raise RunDirError(f"{path}: unreadable client state ({exc.strerror})") from None
        except treefile.TreeFormatError as exc:
            raise RunDirError(f"{path}: unreadable client state ({exc})") from None

    # --- checkpoints --------------------------------------------------------------------------
    def commit(self) -> list[str]:
        """Write the states changed since the last commit as a new segment (or compact) and return
        the segment names a checkpoint must record; nothing is visible until it does."""
        live = {cid: loc[2] for cid, loc in self._where.items()}
        dead = sum(self._segment_bytes.values()) - sum(live.values())
        compact = dead > max(MIN_COMPACT_BYTES, COMPACT_RATIO * sum(live.values()))
        ids = sorted(self) if compact else sorted(self._dirty)
        if not ids and not compact:
            self.last_commit_bytes = 0
            return list(self._segments)
        name = f"seg-{self._next:06d}"
        self._next += 1
        blob = bytearray()
        index = np.empty((len(ids), 3), dtype=np.int64)
        for i, cid in enumerate(ids):
            raw = _encode(cid, self[cid])
            index[i] = (cid, len(blob), len(raw))
            blob += raw
        atomic_write_bytes(self.root / f"{name}.bin", bytes(blob))
        index_path = self.root / f"{name}.idx.npy"
        tmp = index_path.with_name(f".{index_path.name}.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, index)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, index_path)
        self.last_commit_bytes = len(blob) + index.nbytes
        if compact:
            self._segments, self._segment_bytes, self._where = [], {}, {}
        for cid, offset, length in index.tolist():
            self._where[cid] = (name, offset, length)
        self._segments.append(name)
        self._segment_bytes[name] = len(blob)
        self._dirty.clear()
        shutil.rmtree(self.root / SPILL, ignore_errors=True)
        self._spilled.clear()
        return list(self._segments)

    def committed(self, segments: list[str]) -> None:
        """The checkpoint naming ``segments`` is on disk: segments it no longer names can go."""
        keep = set(segments)
        for p in self.root.glob("seg-*"):
            if p.name.split(".")[0] not in keep:
                p.unlink()


def _encode(cid: int, state: State) -> bytes:
    try:
        return treefile.encode(state)
    except treefile.TreeFormatError as exc:
        raise RunDirError(f"client {cid}'s state cannot be stored: {exc}") from None


def open_states(root: Path, cache_bytes: int, saved: Any) -> MutableMapping[int, State]:
    """The client states a checkpoint recorded: a segment list (this module) or, from checkpoints
    written before it, a plain dict (carried into the store, to be written by the next commit)."""
    if isinstance(saved, dict) and saved.get("format") == "segments":
        return ClientStates(root, cache_bytes, list(saved["segments"]))
    states = ClientStates(root, cache_bytes)
    for cid, state in (saved or {}).items():
        states[cid] = state
    return states


def read_states(run_dir: str | Path) -> dict[int, State]:
    """Every client state of a run directory's last checkpoint, as a plain dict (for inspection)."""
    from fedmtl.experiment.records import RunDir

    ckpt = RunDir.open(run_dir).load_checkpoint()
    if ckpt is None:
        raise RunDirError(f"{run_dir}: no checkpoint")
    saved = ckpt["clients"]
    if not (isinstance(saved, dict) and saved.get("format") == "segments"):
        return dict(saved)
    states = ClientStates(Path(run_dir) / "clients", 2**62, list(saved["segments"]))
    return {cid: states[cid] for cid in states}
