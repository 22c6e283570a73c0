"""Nested states as bytes that hold data and nothing else: what crosses a socket or a run folder.

A checkpoint, a client-state segment, a node's state file and a message to a node's warm worker
are trees an algorithm built: dicts (any hashable keys: int keys stay ints, tuple keys tuples),
lists, tuples, sets, numpy arrays and numpy scalars, and Python ``None``/``bool``/``int``/``float``/
``str``/``bytes``. Pickle stores them exactly but runs code named in the file on reading, so a run
folder or a socket from someone else would be code execution. Here a tree is a JSON skeleton plus
raw array bytes; reading it builds only those types, and every array's dtype must be a plain
numeric, boolean, string or void dtype (never ``object``). It comes back exactly as it went in:
dtypes and byte order, 0-d arrays vs numpy scalars, tuples vs lists, key types, key order.

Layout (version 1): ``MAGIC``, a little-endian u32 format version, a u64 length and that many bytes
of UTF-8 JSON ``{"tree": skeleton, "arrays": [[dtype, shape, offset], ...]}``, zero padding to a
multiple of 64, then each array's C-ordered bytes at ``offset`` from there (each 64-aligned).
In the skeleton, JSON ``null``/``true``/``false``/numbers/strings are themselves; every other value is
a one-key object: ``{"d": [[key, value], ...]}`` dict, ``{"l": [...]}`` list, ``{"t": [...]}`` tuple,
``{"s": [...]}`` set, ``{"f": [...]}`` frozenset, ``{"a": i}`` array, ``{"n": i}`` numpy scalar,
``{"b": i}`` bytes (a uint8 array)."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np

MAGIC = b"\x89fedmtl\n"
VERSION = 1
_HEAD = struct.Struct("<IQ")
_ALIGN = 64


class TreeFormatError(ValueError):
    """Bytes that are not a tree this version writes, or a value a tree cannot hold."""


def is_pickle(data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` looks like a pickle (protocol 2 or later), as older fedmtl wrote its files."""
    return bytes(data[:1]) == b"\x80"


# ------------------------------------------------------------------------------------ encode
def _where(path: tuple[Any, ...]) -> str:
    return "/" + "/".join(str(p) for p in path)


class _Encoder:
    def __init__(self) -> None:
        self.arrays: list[np.ndarray] = []

    def _array(self, a: np.ndarray, path: tuple[Any, ...]) -> int:
        if a.dtype.hasobject or a.dtype.fields is not None or a.dtype.subdtype is not None:
            raise TreeFormatError(
                f"array at '{_where(path)}' has dtype {a.dtype}; only plain dtypes are stored"
            )
        self.arrays.append(a)
        return len(self.arrays) - 1

    def node(self, obj: Any, path: tuple[Any, ...]) -> Any:
        """The skeleton of ``obj``; ``path`` (where it is, for an error) is only formatted on one."""
        t = type(obj)
        if obj is None or t is bool or t is int or t is str:
            return obj
        if t is float:
            return obj if math.isfinite(obj) else {"x": repr(obj)}
        if isinstance(obj, np.ndarray):
            return {"a": self._array(obj, path)}
        if isinstance(obj, np.generic):
            return {"n": self._array(np.asarray(obj), path)}
        if isinstance(obj, dict):  # dict subclasses (a row view) are stored as the dict they are
            return {"d": [[self.node(k, (*path, "(key)")), self.node(v, (*path, k))] for k, v in obj.items()]}
        if t is list or t is tuple:
            return {"l" if t is list else "t": [self.node(v, (*path, i)) for i, v in enumerate(obj)]}
        if t is set or t is frozenset:
            return {"s" if t is set else "f": [self.node(v, (*path, i)) for i, v in enumerate(obj)]}
        if t is bytes:
            return {"b": self._array(np.frombuffer(obj, dtype=np.uint8), path)}
        raise TreeFormatError(
            f"value at '{_where(path)}' has type {t.__name__}; a stored state holds dicts, lists, tuples, "
            "sets, numpy arrays and scalars, None, bool, int, float, str and bytes"
        )


def encode(tree: Any) -> bytes:
    """``tree`` as bytes (``decode`` gives it back exactly)."""
    enc = _Encoder()
    skeleton = enc.node(tree, ())
    specs, chunks, offset = [], [], 0
    for a in enc.arrays:
        data = np.ascontiguousarray(a).tobytes()
        specs.append([a.dtype.str, list(a.shape), offset])
        pad = -len(data) % _ALIGN
        chunks += [data, b"\0" * pad]
        offset += len(data) + pad
    if chunks:
        chunks.pop()  # no padding after the last array: a cut file is always noticed
    header = json.dumps({"tree": skeleton, "arrays": specs}, separators=(",", ":"), allow_nan=False).encode()
    start = len(MAGIC) + _HEAD.size + len(header)
    return b"".join([MAGIC, _HEAD.pack(VERSION, len(header)), header, b"\0" * (-start % _ALIGN), *chunks])


# ------------------------------------------------------------------------------------ decode
def _dtype(text: Any) -> np.dtype:
    if not isinstance(text, str) or len(text) > 16:
        raise TreeFormatError(f"bad dtype {text!r}")
    try:
        dtype = np.dtype(text)
    except TypeError:
        raise TreeFormatError(f"bad dtype {text!r}") from None
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise TreeFormatError(f"dtype {text!r} is not allowed")
    return dtype


def _arrays(specs: Any, buf: bytearray | memoryview, start: int) -> list[np.ndarray]:
    if not isinstance(specs, list):
        raise TreeFormatError("bad array table")
    out = []
    for spec in specs:
        if not (isinstance(spec, list) and len(spec) == 3 and isinstance(spec[1], list)):
            raise TreeFormatError("bad array entry")
        dtype, shape, offset = _dtype(spec[0]), spec[1], spec[2]
        if not all(type(s) is int and s >= 0 for s in shape) or type(offset) is not int or offset < 0:
            raise TreeFormatError("bad array shape or offset")
        count = math.prod(shape)
        end = start + offset + count * dtype.itemsize
        if end > len(buf):
            raise TreeFormatError("truncated (an array runs past the end)")
        out.append(np.frombuffer(buf, dtype=dtype, count=count, offset=start + offset).reshape(shape))
    return out


def _key(obj: Any) -> Any:
    try:
        hash(obj)
    except TypeError:
        raise TreeFormatError("unhashable dict key") from None
    return obj


def _decode(node: Any, arrays: list[np.ndarray]) -> Any:
    if node is None or isinstance(node, bool | int | float | str):
        return node
    if not (isinstance(node, dict) and len(node) == 1):
        raise TreeFormatError("bad skeleton node")
    ((kind, value),) = node.items()
    if kind in ("a", "n", "b"):
        if type(value) is not int or not 0 <= value < len(arrays):
            raise TreeFormatError("bad array reference")
        a = arrays[value]
        if kind == "a":
            return a
        return a[()] if kind == "n" else a.tobytes()
    if kind == "x":
        if value not in ("nan", "inf", "-inf"):
            raise TreeFormatError("bad float")
        return float(value)
    if not isinstance(value, list):
        raise TreeFormatError("bad skeleton node")
    if kind == "d":
        if not all(isinstance(p, list) and len(p) == 2 for p in value):
            raise TreeFormatError("bad dict entry")
        return {_key(_decode(k, arrays)): _decode(v, arrays) for k, v in value}
    items = [_decode(v, arrays) for v in value]
    if kind == "l":
        return items
    if kind == "t":
        return tuple(items)
    if kind in ("s", "f"):
        return (set if kind == "s" else frozenset)(_key(v) for v in items)
    raise TreeFormatError(f"unknown skeleton node {kind!r}")


def decode(data: bytes | bytearray | memoryview) -> Any:
    """The tree ``encode`` wrote (arrays are writable views of a private copy of ``data``).

    Raises ``TreeFormatError`` (one line) for anything else: a pickle, another version, a cut file."""
    buf = bytearray(data) if not isinstance(data, bytearray) else data
    if not buf.startswith(MAGIC):
        what = "a pickle, which fedmtl never loads" if is_pickle(buf) else "not a fedmtl state file"
        raise TreeFormatError(what)
    if len(buf) < len(MAGIC) + _HEAD.size:
        raise TreeFormatError("truncated")
    version, length = _HEAD.unpack_from(buf, len(MAGIC))
    if version != VERSION:
        raise TreeFormatError(f"format version {version}; this fedmtl reads version {VERSION}")
    begin = len(MAGIC) + _HEAD.size
    if begin + length > len(buf):
        raise TreeFormatError("truncated (header)")
    try:
        header = json.loads(bytes(buf[begin : begin + length]).decode())
        if not (isinstance(header, dict) and "tree" in header and "arrays" in header):
            raise TreeFormatError("bad header")
        start = begin + length
        start += -start % _ALIGN
        return _decode(header["tree"], _arrays(header["arrays"], buf, start))
    except (UnicodeDecodeError, RecursionError, ValueError) as exc:
        if isinstance(exc, TreeFormatError):
            raise
        raise TreeFormatError(f"unreadable header ({type(exc).__name__})") from None
