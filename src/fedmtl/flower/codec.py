"""fedmtl values <-> Flower records, losslessly.

Algorithm messages map onto named records (arrays -> ``ArrayRecord``, numbers -> ``MetricRecord``,
strings and booleans -> ``ConfigRecord``) so Flower tooling sees ordinary named tensors. Client and
server *states* are nested dicts of arrays and scalars; they travel as one ``ArrayRecord`` plus a
JSON skeleton in a ``ConfigRecord``, so dtypes, numpy scalars, int dict keys and tuples come back
exactly as they went in (the same seed must give the same metrics as in-process)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedmtl.errors import ProtocolError

if TYPE_CHECKING:  # the algorithm layer imports torch; a handshake needs neither
    from fedmtl.algorithms.base import Message, Scalar

_ARRAYS, _METRICS, _CONFIG = "arrays", "metrics", "config"
_TREE, _TREE_ARRAYS = "tree", "tree.arrays"


# ------------------------------------------------------------------------------------ messages
def _scalar(value: Any) -> Scalar:
    """Plain Python scalars only: Flower records reject numpy scalar types."""
    if isinstance(value, np.generic):
        value = value.item()
    if not isinstance(value, bool | int | float | str):
        raise ProtocolError(f"message scalar of type {type(value).__name__} cannot cross the wire")
    return value


def put_message(content: RecordDict, prefix: str, msg: Message) -> None:
    """Store ``msg`` in ``content`` under ``<prefix>.arrays|metrics|config``."""
    content[f"{prefix}.{_ARRAYS}"] = ArrayRecord(
        {k: Array(np.asarray(v)) for k, v in msg.arrays.items()}  # type: ignore[arg-type]
    )
    metrics: dict[str, int | float] = {}
    config: dict[str, str | bool] = {}
    for key, raw in msg.scalars.items():
        value = _scalar(raw)
        if isinstance(value, bool | str):
            config[key] = value
        else:
            metrics[key] = value
    content[f"{prefix}.{_METRICS}"] = MetricRecord(metrics)  # type: ignore[arg-type]
    content[f"{prefix}.{_CONFIG}"] = ConfigRecord(config)  # type: ignore[arg-type]


def get_message(content: RecordDict, prefix: str) -> Message:
    """Inverse of ``put_message``."""
    try:
        arrays = content.array_records[f"{prefix}.{_ARRAYS}"]
        metrics = content.metric_records[f"{prefix}.{_METRICS}"]
        config = content.config_records[f"{prefix}.{_CONFIG}"]
    except KeyError as exc:
        raise ProtocolError(f"flower message has no {exc.args[0]!r} record") from None
    from fedmtl.algorithms.base import Message

    scalars: dict[str, Scalar] = {**dict(metrics), **dict(config)}  # type: ignore[arg-type]
    return Message(arrays={k: a.numpy() for k, a in arrays.items()}, scalars=scalars)


def has_message(content: RecordDict, prefix: str) -> bool:
    return f"{prefix}.{_ARRAYS}" in content.array_records


def nbytes(content: RecordDict) -> int:
    """A content's payload: its arrays' bytes and its strings' lengths (Flower adds a little framing)."""
    total = 0
    for record in content.array_records.values():
        total += sum(len(array.data) for array in record.values())
    for record in content.config_records.values():
        total += sum(len(v) if isinstance(v, str | bytes) else 8 for v in record.values())
    for record in content.metric_records.values():
        total += 8 * len(record)
    return total


# ------------------------------------------------------------------------------------ states
def _encode(obj: Any, arrays: dict[str, np.ndarray], path: str) -> Any:
    if isinstance(obj, np.ndarray):
        key = str(len(arrays))
        arrays[key] = obj
        return {"a": key}
    if isinstance(obj, np.generic):
        key = str(len(arrays))
        arrays[key] = np.asarray(obj)
        return {"n": key}
    if obj is None or isinstance(obj, bool | int | float | str):
        return {"v": obj}
    if isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            if not (k is None or isinstance(k, bool | int | float | str)):
                raise ProtocolError(f"state key {k!r} at '{path}' must be a str or a number")
            items.append([k, _encode(v, arrays, f"{path}/{k}")])
        return {"d": items}
    if isinstance(obj, list | tuple):
        kind = "l" if isinstance(obj, list) else "t"
        return {kind: [_encode(v, arrays, f"{path}/{i}") for i, v in enumerate(obj)]}
    raise ProtocolError(
        f"state value at '{path or '/'}' has type {type(obj).__name__}; states hold numpy arrays, "
        "scalars, lists and dicts only"
    )


def _decode(node: dict[str, Any], arrays: ArrayRecord) -> Any:
    ((kind, value),) = node.items()
    if kind == "a":
        return arrays[value].numpy()
    if kind == "n":
        return arrays[value].numpy()[()]
    if kind == "v":
        return value
    if kind == "d":
        return {k: _decode(v, arrays) for k, v in value}
    items = [_decode(v, arrays) for v in value]
    return items if kind == "l" else tuple(items)


def put_tree(content: RecordDict, prefix: str, tree: Any) -> None:
    """Store a nested state under ``<prefix>.tree`` (skeleton) and ``<prefix>.tree.arrays``."""
    arrays: dict[str, np.ndarray] = {}
    skeleton = _encode(tree, arrays, "")
    content[f"{prefix}.{_TREE}"] = ConfigRecord({"json": json.dumps(skeleton)})
    content[f"{prefix}.{_TREE_ARRAYS}"] = ArrayRecord(
        {k: Array(v) for k, v in arrays.items()}  # type: ignore[arg-type]
    )


def has_tree(content: RecordDict, prefix: str) -> bool:
    return f"{prefix}.{_TREE}" in content.config_records


def get_tree(content: RecordDict, prefix: str) -> Any:
    """Inverse of ``put_tree``."""
    try:
        skeleton = json.loads(str(content.config_records[f"{prefix}.{_TREE}"]["json"]))
        arrays = content.array_records[f"{prefix}.{_TREE_ARRAYS}"]
    except KeyError as exc:
        raise ProtocolError(f"flower record {exc.args[0]!r} is missing") from None
    return _decode(skeleton, arrays)
