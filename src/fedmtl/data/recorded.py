"""Reading back what fedmtl wrote: a ``fedmtl pack`` store or LEAF export, read with the config
that made it.

Both record the ``data:`` section they were written from. Keys that say how the federation was made
(partition, tasks, corruption, ...) are accepted when they say what was recorded, since the clients
already are that way, and refused in one line naming the recorded value when they differ. A LEAF
export also records its sample shape and that its values are already normalised, so reading it
back without ``input_shape`` gives the same samples, not re-scaled vectors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedmtl.data.config import DataConfig
from fedmtl.errors import ConfigError

#: beside LEAF's train/ and test/ in an export: what wrote it (LEAF's readers ignore it)
SIDECAR = "fedmtl.json"
LEAF_FORMAT = "fedmtl-leaf-export/1"
#: data keys that describe how the clients were made
MADE_BY = (
    "partition",
    "tasks",
    "corrupt",
    "concepts",
    "missing_modalities",
    "max_clients",
    "input_shape",
    "normalize",
    "test_fraction",
    "global_test_fraction",
)


_UNKNOWN = object()


def _neutral(key: str) -> Any:
    """The key's default, as ``model_dump(mode="json")`` writes it."""
    return DataConfig().model_dump(mode="json")[key]


def sidecar(data: Any, provenance: dict[str, Any]) -> dict[str, Any]:
    """What a LEAF export records about itself."""
    return {
        "format": LEAF_FORMAT,
        "input_shape": list(data.input_shape),
        "normalized": data.info.get("normalize"),
        **provenance,
    }


def recorded(dataset: str, file: str | None) -> tuple[dict[str, Any], Path] | None:
    """The record a store or LEAF export holds, with where it is; None for anything else (LEAF data
    from LEAF's own scripts, a missing path: the readers report those)."""
    if file is None or dataset not in ("store", "leaf"):
        return None
    root = Path(file).expanduser()
    path = root / ("meta.json" if dataset == "store" else SIDECAR)
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # the reader says what is wrong with a store; a LEAF sidecar is optional
    if dataset == "store":
        doc = {**doc.get("provenance", {}), "input_shape": doc.get("input_shape")}
    elif doc.get("format") != LEAF_FORMAT:
        return None
    return doc, root


def as_written(cfg: DataConfig) -> DataConfig:
    """``cfg`` with the keys that repeat what the store or export recorded set back to their
    defaults (they are already applied), a LEAF export's shape and normalisation filled in; a key
    that contradicts the record is a one-line error."""
    found = recorded(cfg.dataset, cfg.file)
    if found is None:
        return cfg
    doc, root = found
    made = doc.get("data") or {}
    given = cfg.model_dump(mode="json")
    update: dict[str, Any] = {}
    for key in MADE_BY:
        value = given[key]
        if key == "partition" and value.get("kind") in (None, "natural"):
            continue
        if key != "partition" and value == _neutral(key):
            continue
        if key == "normalize" and value == "none":
            continue  # as written: always right for what fedmtl wrote
        # the shape is recorded as the samples have it, whatever the config said
        was = doc.get("input_shape") if key == "input_shape" else made.get(key, _UNKNOWN)
        if was is _UNKNOWN:
            continue  # nothing recorded: the reader's own checks decide
        if value == was:  # already applied when it was written
            natural = cfg.partition.model_copy(update={"kind": "natural"})
            update[key] = (
                natural
                if key == "partition"
                else DataConfig.model_fields[key].get_default(call_default_factory=True)
            )
            continue
        what = "packed" if cfg.dataset == "store" else "exported"
        raise ConfigError(
            f"config: data.{key} = {_short(value)}: {root} was {what} with data.{key} = "
            f"{_short(was)} and holds its clients that way; leave data.{key} out or give the "
            "recorded value"
        )
    out = cfg.model_copy(update=update) if update else cfg
    if cfg.dataset == "leaf":
        fill: dict[str, Any] = {}
        if out.input_shape is None and doc.get("input_shape"):
            fill["input_shape"] = list(doc["input_shape"])
        if out.normalize == "auto" and doc.get("normalized") not in (None, "none"):
            fill["normalize"] = "none"  # exported as the model took them
        out = out.model_copy(update=fill) if fill else out
    return out


def _short(value: Any) -> str:
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if v not in (None, [], {})}
    return json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
