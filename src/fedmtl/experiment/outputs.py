"""What a run leaves besides ``metrics.jsonl``: ``metrics.csv`` for spreadsheets and notebooks, an
optional TensorBoard log, and only as many client states as the run asked to keep.

All of it is derived from what the loop already wrote, so a run's numbers never depend on it."""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmtl.errors import ConfigError
from fedmtl.experiment.records import METRICS, RunDir

if TYPE_CHECKING:
    from fedmtl.config import Config

CSV = "metrics.csv"
TENSORBOARD = "tensorboard"
CLIENTS = "clients"
#: identifying columns first; every other key follows in the order rows first show it
LEADING = ("round", "kind", "client")


# --------------------------------------------------------------------------------------------- csv


def _rows(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a partial last line of a killed run
            if isinstance(row, dict):
                yield row


def _cell(value: Any) -> Any:
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    if value is None:
        return ""
    return value


def write_csv(run_dir: str | Path) -> Path:
    """``metrics.csv`` beside ``metrics.jsonl``: the same rows, one column per key any row has
    (lists and mappings as JSON text, absent values empty). Streams the file twice, so a large run
    is never held in memory."""
    run_dir = Path(run_dir)
    source = run_dir / METRICS
    columns: dict[str, None] = dict.fromkeys(LEADING)
    for row in _rows(source):
        columns.update(dict.fromkeys(row))
    out = run_dir / CSV
    tmp = out.with_name(f".{CSV}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), restval="")
        writer.writeheader()
        for row in _rows(source):
            writer.writerow({k: _cell(v) for k, v in row.items()})
    tmp.replace(out)
    return out


# --------------------------------------------------------------------------------------------- tensorboard


def check(cfg: Config) -> None:
    """Refuse, before any folder exists, what this installation cannot write."""
    if cfg.output.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError(
                "config: output.tensorboard = true needs the tensorboard package; install it with "
                "pip install tensorboard (fedmtl's extra 'tensorboard': pip install '.[tensorboard]')"
            ) from None


class Board:
    """Every numeric key of the round rows as a TensorBoard scalar, at step = round."""

    def __init__(self, folder: Path, start: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run drops what an earlier process logged past its checkpoint
        self.writer = SummaryWriter(str(folder), purge_step=start if start > 1 else None)

    def row(self, row: dict[str, Any]) -> None:
        step = int(row["round"])
        for key, value in row.items():
            if key in LEADING or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def board(cfg: Config, run_dir: Path, start: int) -> Board | None:
    return Board(run_dir / TENSORBOARD, start) if cfg.output.tensorboard else None


# --------------------------------------------------------------------------------------------- client states


def keep_client_states(rd: RunDir, states: MutableMapping[int, Any], keep: str) -> None:
    """After a complete run: ``final`` rewrites the client-state folder to one segment holding each
    client's last state (checkpoints leave superseded states behind until a compaction);
    ``none`` removes it. The checkpoint is rewritten to name what is left; a finished run is never
    resumed, so this only changes what ``read_states`` finds."""
    if keep == "all" or not hasattr(states, "commit"):
        return
    from fedmtl.runtime.client_states import ClientStates

    folder = rd.path / CLIENTS
    fresh = rd.path / f".{CLIENTS}.final"
    shutil.rmtree(fresh, ignore_errors=True)
    segments: list[str] = []
    if keep == "final":
        store = ClientStates(fresh, 2**62)
        for cid in states:
            store[cid] = states[cid]
        segments = store.commit()
    else:
        fresh.mkdir()
    old = rd.path / f".{CLIENTS}.old"
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    fresh.rename(folder)
    ckpt = rd.load_checkpoint()
    if ckpt is not None:
        ckpt["clients"] = {"format": "segments", "segments": segments}
        rd.save_checkpoint(ckpt)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------- the end


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def finish(rd: RunDir, cfg: Config, states: MutableMapping[int, Any]) -> None:
    """What a complete run writes after its summary."""
    write_csv(rd.path)
    keep_client_states(rd, states, cfg.output.client_states)


def footprint(run_dir: str | Path) -> str:
    """How much a run folder holds, and how much of it is client state: ``3.2 MB (client states
    2.9 MB)``."""
    path = Path(run_dir)
    total = folder_bytes(path)
    clients = folder_bytes(path / CLIENTS) if (path / CLIENTS).is_dir() else 0
    return f"{_mb(total)}" + (f" (client states {_mb(clients)})" if clients >= 1000 else "")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"
