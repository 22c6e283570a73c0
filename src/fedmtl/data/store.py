"""The client store: a federation packed on disk and memory-mapped back, one client at a time.

``fedmtl pack CONFIG OUT`` builds the federation a config's ``data:`` section describes (any
dataset, partition, LEAF directory or registered reader) and writes it here, already normalised;
``data: {dataset: store, file: OUT}`` runs on it. A run then maps the arrays instead of reading them:
memory follows the clients a round touches, not the population, and loading takes milliseconds.

Layout (``FORMAT``): ``meta.json`` (shape, tasks, names, the normalisation applied, provenance),
``{train,test}_{x,y}.npy`` (every client's rows, client after client), ``{train,test}_offsets.npy``
(client c's rows are ``offsets[c]:offsets[c+1]``), ``task_ids.npy`` (multi-task federations),
``global_{x,y}.npy`` (the server's test set, if any)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from fedmtl.data import new_dir
from fedmtl.data.clients import ClientList, Rows
from fedmtl.data.federated import FederatedData, TaskSpec
from fedmtl.errors import DataError

FORMAT = "fedmtl-client-store/1"
META = "meta.json"


def _open_rows(path: Path, n: int, like: np.ndarray) -> np.ndarray:
    return np.lib.format.open_memmap(path, mode="w+", dtype=like.dtype, shape=(n, *like.shape[1:]))


def write_store(data: FederatedData, out: Path, provenance: dict[str, Any] | None = None) -> Path:
    """Write ``data`` to ``out`` (a new or empty directory), client after client; the directory
    appears complete or not at all (written beside it and renamed)."""
    out = Path(out)
    if data.holdout:
        raise DataError(
            "client store: hold-out clients are chosen at run time; pack without data.holdout_clients"
        )
    tmp = new_dir.begin(out, "client store")
    clients = data.clients
    n = len(clients)
    sizes = {"train": data.train_sizes(), "test": data.test_sizes()}
    first = clients[int(np.argmax(sizes["train"]))]
    likes = (("train", first.x_train, first.y_train), ("test", first.x_test, first.y_test))
    for split, like_x, like_y in likes:
        offsets = np.concatenate([[0], np.cumsum(sizes[split])]).astype(np.int64)
        np.save(tmp / f"{split}_offsets.npy", offsets)
        xs = _open_rows(tmp / f"{split}_x.npy", int(offsets[-1]), like_x)
        ys = _open_rows(tmp / f"{split}_y.npy", int(offsets[-1]), like_y)
        for c in range(n):
            client = clients[c]
            x, y = (client.x_train, client.y_train) if split == "train" else (client.x_test, client.y_test)
            xs[offsets[c] : offsets[c + 1]] = x
            ys[offsets[c] : offsets[c + 1]] = y
        xs.flush()
        ys.flush()
        del xs, ys
    tasks = list(data.tasks.values())
    if len(tasks) > 1:
        order = {t.name: i for i, t in enumerate(tasks)}
        np.save(tmp / "task_ids.npy", np.array([order[t] for t in data.task_names()], dtype=np.int32))
    if data.x_global_test is not None and data.y_global_test is not None:
        np.save(tmp / "global_x.npy", data.x_global_test)
        np.save(tmp / "global_y.npy", data.y_global_test)
    meta = {
        "format": FORMAT,
        "name": data.name,
        "clients": n,
        "input_shape": list(data.input_shape),
        "task": asdict(data.task),
        "tasks": [asdict(t) for t in tasks],
        "names": [
            clients.name_of(c) if isinstance(clients, ClientList) else clients[c].name for c in range(n)
        ],
        "vocab": data.vocab,
        "source": data.source,
        "info": {k: v for k, v in data.info.items() if k != "corrupt"},
        "provenance": provenance or {},
    }
    (tmp / META).write_text(json.dumps(meta, default=_plain))
    return new_dir.commit(tmp, out)


def _name(clients: Any, cid: int) -> str:
    return clients.name_of(cid) if isinstance(clients, ClientList) else clients[cid].name


def _plain(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(type(o).__name__)


def _load(path: Path, mmap: bool) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="c" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"client store {path.parent}: missing {path.name}") from None
    except (ValueError, EOFError, OSError) as exc:  # a cut or empty file (EOFError: zero bytes)
        why = "empty or cut short" if isinstance(exc, EOFError) else str(exc)
        raise DataError(f"data file {path}: not a readable .npy array ({why})") from None


def open_store(path: Path) -> FederatedData:
    """The store at ``path`` as a federation whose clients are memory-mapped views."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        raise DataError(f"client store {path}: no {META} (write one with 'fedmtl pack')") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"data file {path / META}: malformed JSON at line {exc.lineno}") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"client store {path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    splits = {}
    for split in ("train", "test"):
        offsets = _load(path / f"{split}_offsets.npy", mmap=False)
        x, y = _load(path / f"{split}_x.npy", mmap=True), _load(path / f"{split}_y.npy", mmap=True)
        if len(offsets) != meta["clients"] + 1 or offsets[-1] != len(x) or len(x) != len(y):
            raise DataError(f"client store {path}: {split} offsets do not match its {len(x)} rows")
        splits[split] = Rows(x, y, offsets)
    tasks = [TaskSpec(**t) for t in meta["tasks"]]
    task_ids = _load(path / "task_ids.npy", mmap=False) if len(tasks) > 1 else None
    clients = ClientList(splits["train"], splits["test"], tasks, task_ids, names=meta["names"])
    gx = gy = None
    if (path / "global_x.npy").exists():
        gx, gy = _load(path / "global_x.npy", mmap=True), _load(path / "global_y.npy", mmap=True)
    info = dict(meta["info"])
    info["packed_normalize"] = info.get("normalize")
    info["normalize"] = "none"  # the stored rows are already scaled as packed
    return FederatedData(
        meta["name"],
        clients,
        tuple(meta["input_shape"]),
        TaskSpec(**meta["task"]),
        gx,
        gy,
        str(path.resolve()),
        info,
        vocab=meta["vocab"],
    )
