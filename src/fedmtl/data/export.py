"""Write a federation as LEAF data: ``train/`` and ``test/`` JSON shards, one user per client, each
with its own train and test samples (``fedmtl pack --format leaf``). ``data: {dataset: leaf, file:
OUT}`` reads it back with the same split; images are written flattened (``fedmtl.json`` beside them
gives their shape back), text as the strings its token ids stand for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedmtl.data import new_dir
from fedmtl.data.federated import ClientData, FederatedData
from fedmtl.data.recorded import SIDECAR, sidecar
from fedmtl.errors import DataError

DIGITS = 6  # significant digits of exported features


def _x(c: ClientData, split: str, vocab: list[str] | None) -> list:
    x = c.x_train if split == "train" else c.x_test
    if vocab is not None:
        return ["".join(vocab[int(i) - 1] for i in row if i > 0) for row in np.asarray(x)]
    flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return [[float(f"{v:.{DIGITS}g}") for v in row] for row in flat]


def _y(c: ClientData, split: str, vocab: list[str] | None) -> list:
    y = np.asarray(c.y_train if split == "train" else c.y_test)
    if vocab is not None:
        return [vocab[int(i)] for i in y]
    if c.task.is_classification:
        return [int(v) for v in y]
    return [float(v) * c.task.target_std + c.task.target_mean for v in y]  # original units


def write_leaf(
    data: FederatedData, out: Path, shards: int = 1, provenance: dict[str, Any] | None = None
) -> Path:
    """LEAF's layout under ``out`` (new or empty); users named after the clients. Beside it,
    ``fedmtl.json`` records the sample shape, the normalisation already applied and ``provenance``
    (the data config it was made from), so reading it back with that config gives these samples."""
    out = Path(out)
    if len(data.tasks) > 1:
        raise DataError("LEAF export: LEAF holds one task; this federation has several (data.tasks)")
    tmp = new_dir.begin(out, "LEAF directory")
    ids = data.train_clients
    for split in ("train", "test"):
        (tmp / split).mkdir()
        for s, part in enumerate(np.array_split(np.asarray(ids, dtype=np.int64), max(1, shards))):
            doc: dict = {"users": [], "num_samples": [], "user_data": {}}
            for cid in part.tolist():
                c = data.clients[cid]
                ys = _y(c, split, data.vocab)
                doc["users"].append(c.name)
                doc["num_samples"].append(len(ys))
                doc["user_data"][c.name] = {"x": _x(c, split, data.vocab), "y": ys}
            (tmp / split / f"{data.name}_{s}_{split}.json").write_text(json.dumps(doc))
    (tmp / SIDECAR).write_text(json.dumps(sidecar(data, provenance or {}), default=str))
    return new_dir.commit(tmp, out)
