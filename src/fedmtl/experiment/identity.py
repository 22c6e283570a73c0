"""What run a run folder holds: its resolved config, a fingerprint of its data, its model's shapes.

A checkpoint records this identity; ``fedmtl resume`` recomputes it from the folder's config.yaml
and the data it finds now, and refuses to go on where they differ (one line naming what differs),
so a run is never continued under another run's config, checkpoint or data. Keys that change where
and how often a run writes, not what it computes (``output.*``, ``runtime.state_cache_mib``), and
``train.rounds`` (continuing a run for longer) may differ. ``--accept-mismatch`` continues anyway
and the run folder records that it did."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmtl.errors import RunDirError

if TYPE_CHECKING:
    from fedmtl.algorithms.base import Algorithm
    from fedmtl.config import Config
    from fedmtl.data.federated import FederatedData

#: config keys a resumed run may change (dotted; a section name covers its keys)
MAY_CHANGE = ("output", "runtime.state_cache_mib", "train.rounds")
#: arrays up to this size are hashed whole; larger ones by evenly spaced blocks (and their size)
WHOLE_BYTES = 256 * 2**20
_BLOCK = 1 << 16
_BLOCKS = 1024


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def _compared(cfg: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v for k, v in _flat(cfg).items() if not any(k == m or k.startswith(m + ".") for m in MAY_CHANGE)
    }


def config_hash(cfg: dict[str, Any]) -> str:
    text = json.dumps(_compared(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _hash_array(h: Any, a: np.ndarray) -> None:
    a = np.asarray(a)
    h.update(f"{a.dtype.str}{a.shape};".encode())
    if a.nbytes <= WHOLE_BYTES:
        h.update(np.ascontiguousarray(a).tobytes())
        return
    flat = a.reshape(-1).view(np.uint8) if a.flags.c_contiguous else np.ascontiguousarray(a).view(np.uint8)
    flat = flat.reshape(-1)
    step = max(len(flat) // _BLOCKS, _BLOCK)
    for start in range(0, len(flat), step):
        h.update(flat[start : start + _BLOCK].tobytes())


def _data_arrays(data: FederatedData) -> Iterator[np.ndarray]:
    clients = data.clients
    train = getattr(clients, "train", None)
    if train is not None and hasattr(train, "offsets"):  # a ClientList: the shared rows, not each client
        for rows in (clients.train, clients.test):  # type: ignore[attr-defined]
            yield from (a for a in (rows.x, rows.y, rows.offsets, rows.index) if a is not None)
        if clients.task_ids is not None:  # type: ignore[attr-defined]
            yield clients.task_ids  # type: ignore[attr-defined]
    else:
        for c in clients:
            yield from (
                a for a in (c.x_train, c.y_train, c.x_test, c.y_test, c.x_val, c.y_val) if a is not None
            )
    yield from (a for a in (data.x_global_test, data.y_global_test) if a is not None)


def data_fingerprint(data: FederatedData) -> str:
    """A hash of every sample the run sees (a described federation: its description), so a changed
    file under the data directory is noticed on resume."""
    h = hashlib.sha256()
    h.update(f"{data.name};{data.num_clients};{list(data.input_shape)};{sorted(data.holdout)};".encode())
    if "description" in data.info:
        h.update(json.dumps(data.info["description"], sort_keys=True, default=str).encode())
    for a in _data_arrays(data):
        _hash_array(h, a)
    return h.hexdigest()[:32]


def param_shapes(algo: Algorithm) -> dict[str, dict[str, list[int]]]:
    """Each task's model parameters and their shapes."""
    ctx = algo.ctx
    inits = ctx.task_init or {ctx.task.name: ctx.init_arrays}
    return {t: {k: list(np.shape(v)) for k, v in arrays.items()} for t, arrays in inits.items()}


def run_identity(cfg: Config, data: FederatedData, algo: Algorithm) -> dict[str, Any]:
    resolved = cfg.to_dict()
    return {
        "config_hash": config_hash(resolved),
        "config": json.loads(json.dumps(resolved, default=str)),
        "data": data_fingerprint(data),
        "params": param_shapes(algo),
    }


def _short(v: Any) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's identity and the folder's now, for one line."""
    out = []
    if saved.get("config_hash") != now["config_hash"]:
        old, new = _compared(saved.get("config", {})), _compared(now["config"])
        keys = sorted(k for k in set(old) | set(new) if old.get(k, "(unset)") != new.get(k, "(unset)"))
        shown = ", ".join(
            f"{k} {_short(old.get(k, '(unset)'))} -> {_short(new.get(k, '(unset)'))}" for k in keys[:4]
        )
        more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
        out.append(f"config.yaml differs from the checkpoint's config ({shown or 'hash'}{more})")
    if saved.get("data") != now["data"]:
        out.append(f"the data differs (fingerprint {saved.get('data')} at the checkpoint, {now['data']} now)")
    if saved.get("params") != now["params"]:
        old_p, new_p = saved.get("params", {}), now["params"]
        diff = [
            f"{t}.{k} {old_p.get(t, {}).get(k)} -> {new_p.get(t, {}).get(k)}"
            for t in sorted(set(old_p) | set(new_p))
            for k in sorted(set(old_p.get(t, {})) | set(new_p.get(t, {})))
            if old_p.get(t, {}).get(k) != new_p.get(t, {}).get(k)
        ]
        out.append(f"the model's parameter shapes differ ({', '.join(diff[:3])})")
    return out


def check_resume(where: str, saved: dict[str, Any] | None, now: dict[str, Any], accept: bool) -> list[str]:
    """The differences a resume goes on despite (``accept``); raises one line otherwise. Shapes that
    differ are refused even then: the checkpoint's weights cannot fit the model."""
    if saved is None:
        return []
    diff = differences(saved, now)
    if not diff:
        return []
    if saved.get("params") != now["params"]:
        raise RunDirError(f"{where}: cannot resume: {'; '.join(diff)}")
    if not accept:
        raise RunDirError(
            f"{where}: will not resume: {'; '.join(diff)}; restore the run's files, or pass "
            "--accept-mismatch to continue anyway (recorded in the run folder)"
        )
    return diff
