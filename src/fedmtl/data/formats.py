"""Low-level readers for the on-disk dataset formats (idx-ubyte, MATLAB cells, LEAF JSON).

Every problem becomes one ``DataError`` line of the form ``data file <path>: <problem>`` so the
CLI can show the user which file to fix. Parsed arrays are cached per (path, mtime, size) because
tests and experiments load the same files many times in one process; cached arrays are read-only.
"""

from __future__ import annotations

import gzip
import json
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

from fedmtl.errors import DataError

IDX_MAGIC = {0x801: "idx1 ubyte", 0x803: "idx3 ubyte"}
MAT_KEY_PAIRS = (("X", "Y"), ("feature", "label"))
# LEAF text datasets (Shakespeare) store characters; codes at or above this are clipped.
CHAR_CODES = 256

LeafUser = tuple[str, np.ndarray, np.ndarray]


def file_error(path: str | Path, problem: str) -> DataError:
    return DataError(f"data file {path}: {problem}")


def _stat_key(path: str | Path) -> tuple[str, int, int]:
    """Resolve ``path`` and return the cache key; a missing file is reported here, uncached."""
    p = Path(path).expanduser()
    try:
        st = p.resolve().stat()
    except OSError:
        raise file_error(p, "file not found") from None
    if not p.is_file():
        raise file_error(p, "not a regular file")
    return str(p.resolve()), st.st_mtime_ns, st.st_size


def _frozen(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False
    return arr


def _read_gzip(path: str) -> bytes:
    try:
        with gzip.open(path, "rb") as fh:
            return fh.read()
    except EOFError:
        raise file_error(path, "truncated gzip stream") from None
    except (OSError, zlib.error) as exc:
        raise file_error(path, f"corrupt gzip stream ({exc})") from None


# ---------------------------------------------------------------------------------------- idx


def _expected_magic(path: str) -> tuple[int, ...]:
    """The official file names say which idx variant they hold; unknown names accept both."""
    name = Path(path).name
    if "idx1" in name:
        return (0x801,)
    if "idx3" in name:
        return (0x803,)
    return tuple(IDX_MAGIC)


@lru_cache(maxsize=16)
def _idx_cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
    del mtime_ns, size  # part of the cache key only
    raw = _read_gzip(path)
    if len(raw) < 4:
        raise file_error(path, f"too short for an idx header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    expected = _expected_magic(path)
    if magic not in expected:
        want = " or ".join(f"0x{m:08X} ({IDX_MAGIC[m]})" for m in expected)
        raise file_error(path, f"bad magic number 0x{magic:08X}, expected {want}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise file_error(path, f"truncated idx header ({len(raw)} bytes, need {header})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    need = int(np.prod(dims))
    have = len(raw) - header
    if have != need:
        shape = "x".join(str(d) for d in dims)
        raise file_error(path, f"header says {shape} = {need} bytes of data but {have} follow")
    return _frozen(np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims))


def read_idx_gz(path: str | Path) -> np.ndarray:
    """Read a gzipped idx-ubyte file (MNIST layout) into a read-only uint8 array."""
    return _idx_cached(*_stat_key(path))


# ---------------------------------------------------------------------------------------- .mat


def _cells(path: str, name: str, value: Any) -> list[Any]:
    if not isinstance(value, np.ndarray) or value.dtype != object:
        raise file_error(path, f"'{name}' is not a cell array")
    return list(value.ravel(order="F"))


def _task_arrays(path: str, t: int, x: Any, y: Any, width: int | None) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 2:
        raise file_error(path, f"task {t}: X has {x.ndim} dimensions, expected rows x features")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise file_error(path, f"task {t}: X is not numeric ({x.dtype})")
    if y.ndim == 2 and 1 in y.shape:
        y = y.ravel()
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.number):
        raise file_error(path, f"task {t}: Y must be a numeric column vector, got shape {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise file_error(path, f"task {t} has {x.shape[0]} rows in X but {y.shape[0]} in Y")
    if width is not None and x.shape[1] != width:
        raise file_error(path, f"task {t} has {x.shape[1]} features but task 0 has {width}")
    return _frozen(x.astype(np.float64)), _frozen(y.copy())


@lru_cache(maxsize=16)
def _mat_cached(path: str, mtime_ns: int, size: int) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    del mtime_ns, size
    try:
        mat = scipy.io.loadmat(path)
    except Exception as exc:  # scipy raises many unrelated types for bad files
        raise file_error(path, f"not a readable MATLAB file ({type(exc).__name__}: {exc})") from None
    keys = next(((kx, ky) for kx, ky in MAT_KEY_PAIRS if kx in mat and ky in mat), None)
    if keys is None:
        raise file_error(path, "expected cell arrays 'X'/'Y' or 'feature'/'label'")
    xs = _cells(path, keys[0], mat[keys[0]])
    ys = _cells(path, keys[1], mat[keys[1]])
    if len(xs) != len(ys):
        raise file_error(path, f"'{keys[0]}' has {len(xs)} tasks but '{keys[1]}' has {len(ys)}")
    if not xs:
        raise file_error(path, "no tasks in the cell arrays")
    out_x: list[np.ndarray] = []
    out_y: list[np.ndarray] = []
    for t, (x, y) in enumerate(zip(xs, ys, strict=True)):
        ax, ay = _task_arrays(path, t, x, y, out_x[0].shape[1] if out_x else None)
        out_x.append(ax)
        out_y.append(ay)
    return tuple(out_x), tuple(out_y)


def read_mat_tasks(path: str | Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Read a MATLAB file of 1xT cells (``X``/``Y`` or ``feature``/``label``); tasks numbered from 0.

    Returns per-task float64 feature matrices and 1-D label/target vectors (original dtype).
    """
    xs, ys = _mat_cached(*_stat_key(path))
    return list(xs), list(ys)


# ---------------------------------------------------------------------------------------- LEAF


def _load_json(path: str) -> Any:
    raw = _read_gzip(path) if path.endswith(".gz") else Path(path).read_bytes()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise file_error(path, "not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise file_error(path, f"malformed JSON at line {exc.lineno} column {exc.colno}") from None


def _encode_chars(text: str) -> list[int]:
    return [min(ord(c), CHAR_CODES - 1) for c in text]


def _leaf_x(path: str, user: str, x: Any) -> tuple[np.ndarray, bool]:
    """Return the user's feature matrix and whether it came from text."""
    if not isinstance(x, list):
        raise file_error(path, f"user '{user}': x must be a list of samples")
    if x and all(isinstance(s, str) for s in x):
        out = np.zeros((len(x), max(len(s) for s in x)), dtype=np.float64)
        for i, s in enumerate(x):
            out[i, : len(s)] = _encode_chars(s)
        return out, True
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (ValueError, TypeError):
        raise file_error(path, f"user '{user}': x is not a numeric matrix of consistent width") from None
    if len(x) == 0:
        return arr.reshape(0, 0), False
    if arr.ndim < 2:
        raise file_error(path, f"user '{user}': x must hold one feature vector per sample")
    return arr.reshape(len(arr), -1), False


def _leaf_y(path: str, user: str, y: Any) -> np.ndarray | dict[str, np.ndarray]:
    if isinstance(y, dict):  # several labels on the same samples: one list per task
        out = {}
        for name, labels in y.items():
            if isinstance(labels, list) and labels and all(isinstance(v, list) for v in labels):
                try:  # a multi-label task: one 0/1 row per sample
                    out[str(name)] = np.asarray(labels, dtype=np.float64)
                except (ValueError, TypeError):
                    raise file_error(path, f"user '{user}': y[{name!r}] is not numeric") from None
                continue
            out[str(name)] = _leaf_y(path, f"{user}' label '{name}", labels)  # type: ignore[assignment]
        if not out:
            raise file_error(path, f"user '{user}': y is an empty dict")
        return out
    if not isinstance(y, list):
        raise file_error(path, f"user '{user}': y must be a list of labels, or a dict of them by task")
    if y and all(isinstance(s, str) for s in y):
        if any(len(s) != 1 for s in y):
            raise file_error(path, f"user '{user}': text labels in y must be single characters")
        return np.asarray([_encode_chars(s)[0] for s in y], dtype=np.int64)
    try:
        arr = np.asarray(y, dtype=np.float64)
    except (ValueError, TypeError):
        raise file_error(path, f"user '{user}': y is not numeric") from None
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr.ravel()  # Vehicle-style [[-1], [1]]
    if arr.ndim != 1:
        raise file_error(path, f"user '{user}': y must hold one label per sample, got shape {arr.shape}")
    if np.all(arr == np.round(arr)):
        return arr.astype(np.int64)
    return arr


def _check_leaf_header(path: str, doc: Any) -> tuple[list[Any], list[Any], dict[str, Any]]:
    if not isinstance(doc, dict):
        raise file_error(path, "expected a JSON object with 'users', 'num_samples', 'user_data'")
    for key in ("users", "num_samples", "user_data"):
        if key not in doc:
            raise file_error(path, f"missing key '{key}'")
    users, counts, data = doc["users"], doc["num_samples"], doc["user_data"]
    if not isinstance(users, list) or not isinstance(counts, list) or not isinstance(data, dict):
        raise file_error(path, "'users' and 'num_samples' must be lists and 'user_data' an object")
    if len(users) != len(counts):
        raise file_error(path, f"'users' has {len(users)} entries but 'num_samples' has {len(counts)}")
    return users, counts, data


def _pad_to(x: np.ndarray, width: int) -> np.ndarray:
    return np.pad(x, ((0, 0), (0, width - x.shape[1]))) if x.shape[1] < width else x


@lru_cache(maxsize=64)
def _leaf_cached(path: str, mtime_ns: int, size: int) -> tuple[tuple[LeafUser, ...], bool]:
    del mtime_ns, size
    users, counts, data = _check_leaf_header(path, _load_json(path))
    out: list[LeafUser] = []
    kinds: set[bool] = set()
    width: int | None = None
    for user, count in zip(users, counts, strict=True):
        entry = data.get(str(user))
        if not isinstance(entry, dict) or "x" not in entry or "y" not in entry:
            raise file_error(path, f"user '{user}' has no x/y entry in 'user_data'")
        x, text = _leaf_x(path, str(user), entry["x"])
        y = _leaf_y(path, str(user), entry["y"])
        for name, labels in y.items() if isinstance(y, dict) else [("y", y)]:
            if not (len(x) == len(labels) == count):
                raise file_error(
                    path,
                    f"user '{user}': num_samples says {count} but x has {len(x)} and {name} {len(labels)}",
                )
        if len(x):
            kinds.add(text)
            if not text and width is not None and x.shape[1] != width:
                raise file_error(
                    path, f"user '{user}' has {x.shape[1]} features but earlier users have {width}"
                )
            width = x.shape[1] if not text else width
        out.append((str(user), x, y))
    if not kinds:
        raise file_error(path, "no samples in any user")
    if len(kinds) > 1:
        raise file_error(path, "x mixes text and numeric samples")
    # Text rows are padded to the longest string in the whole file; empty users get that width too.
    widest = max(x.shape[1] for _, x, _ in out)
    return tuple((u, _frozen(_pad_to(x, widest)), _frozen_labels(y)) for u, x, y in out), kinds.pop()


def _frozen_labels(y: np.ndarray | dict[str, np.ndarray]) -> Any:
    return {k: _frozen(v) for k, v in y.items()} if isinstance(y, dict) else _frozen(y)


def read_leaf_json(path: str | Path) -> list[LeafUser]:
    """Read a LEAF-style JSON (``.json`` or ``.json.gz``) into ``(user, x, y)`` per user, file order.

    ``x`` is float64 (n, features). Text samples (LEAF Shakespeare) become character codes
    ``min(ord(c), 255)`` right-padded with 0 to the longest string in the file; single-character
    labels become their code. Integer-valued labels are int64; nested labels like ``[[-1], [1]]``
    are flattened.
    """
    return list(read_leaf_file(path)[0])


def read_leaf_file(path: str | Path) -> tuple[list[LeafUser], bool]:
    """``read_leaf_json``'s users and whether the file holds text (character codes)."""
    users, text = _leaf_cached(*_stat_key(path))
    return list(users), text
