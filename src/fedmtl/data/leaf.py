"""LEAF data as LEAF distributes it: a data directory with ``train/`` and ``test/`` (JSON shards, or
``train.json``/``test.json``), users matched by id across the two, LEAF's own per-user split used as
given; or one JSON file whose users ``data.test_fraction`` splits. Text (Shakespeare: ``x`` strings,
``y`` next characters) becomes token ids over the characters the data uses (0 is padding)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedmtl.data.formats import LeafUser, file_error, read_leaf_file
from fedmtl.data.raw import Clients, ClientSplits
from fedmtl.errors import DataError

SPLITS = ("train", "test")
SUFFIXES = (".json", ".json.gz")


def _json_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(SUFFIXES))


def leaf_layout(path: Path) -> tuple[list[Path], list[Path]]:
    """(train files, test files) of a LEAF data directory."""
    found = {}
    for split in SPLITS:
        sub = path / split
        files = _json_files(sub) if sub.is_dir() else [path / f"{split}{s}" for s in SUFFIXES]
        files = [f for f in files if f.is_file()]
        if not files:
            raise DataError(
                f"dataset 'leaf': {path} holds no {split} data: a LEAF data directory has {split}/ with "
                f"JSON shards (or {split}.json); for one file of users give its path as data.file"
            )
        found[split] = files
    return found["train"], found["test"]


def _read_split(files: list[Path]) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, Path]], bool]:
    users: dict[str, tuple[np.ndarray, np.ndarray, Path]] = {}
    kinds: dict[bool, Path] = {}
    for f in files:
        rows, text = read_leaf_file(f)
        kinds.setdefault(text, f)
        for user, x, y in rows:
            if user in users:
                also = users[user][2]
                raise file_error(f, f"user '{user}' is also in {also}; a user has one shard per split")
            users[user] = (x, y, f)
    if len(kinds) > 1:
        raise file_error(kinds[False], f"holds numeric samples but {kinds[True]} holds text")
    return users, next(iter(kinds))


def _check_widths(parts: list[tuple[np.ndarray, Path]]) -> None:
    width, first = None, None
    for x, f in parts:
        if len(x) == 0:
            continue
        if width is None:
            width, first = x.shape[1], f
        elif x.shape[1] != width:
            raise file_error(f, f"samples have {x.shape[1]} features but those in {first} have {width}")


def tokenise(
    xs: list[np.ndarray], ys: list[np.ndarray]
) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """Character codes -> token ids 1..V over the characters that occur (0 stays padding), labels ->
    0..V-1 over the same characters, all rows padded to the longest; and the characters."""
    codes = np.unique(
        np.concatenate([x[x > 0].ravel() for x in xs] + [y.ravel() for y in ys]).astype(np.int64)
    )
    width = max(x.shape[1] for x in xs)
    out_x = []
    for x in xs:
        ids = np.zeros((len(x), width), dtype=np.int64)
        c = x.astype(np.int64)
        ids[:, : c.shape[1]] = np.where(c > 0, np.searchsorted(codes, c) + 1, 0)
        out_x.append(ids)
    out_y = [np.searchsorted(codes, y.astype(np.int64)).astype(np.int64) for y in ys]
    return out_x, out_y, [chr(int(c)) for c in codes]


def read_leaf_dir(path: Path) -> ClientSplits:
    """Users of ``train/`` in file order, each with its ``test/`` samples; a user without training
    data, or without test data, is an error naming the user and the file."""
    train_files, test_files = leaf_layout(path)
    train, text = _read_split(train_files)
    test, test_text = _read_split(test_files)
    if text != test_text:
        kind = "text" if text else "numeric samples"
        raise file_error(test_files[0], f"does not hold {kind} like {train_files[0]}")
    for user, (_, _, f) in test.items():
        if user not in train:
            raise file_error(f, f"user '{user}' has test samples but no training data (in no file of train/)")
    for user, (x, _, f) in train.items():
        if len(x) == 0:
            raise file_error(f, f"user '{user}' has no training samples")
        if user not in test or len(test[user][0]) == 0:
            raise file_error(
                f, f"user '{user}' has no test samples in test/ (LEAF's split gives every user both)"
            )
    names = list(train)
    x_tr = [train[u][0] for u in names]
    x_te = [test[u][0] for u in names]
    y_tr = [train[u][1] for u in names]
    y_te = [test[u][1] for u in names]
    if not text:
        _check_widths([(train[u][0], train[u][2]) for u in names] + [(test[u][0], test[u][2]) for u in names])
        return ClientSplits(names, x_tr, y_tr, x_te, y_te)
    _one_label(y_tr, train_files[0])
    xs, ys, vocab = tokenise(x_tr + x_te, y_tr + y_te)
    n = len(names)
    return ClientSplits(names, xs[:n], ys[:n], xs[n:], ys[n:], vocab)


def read_leaf_single(path: Path) -> Clients:
    """One LEAF JSON file: its users, to be split by ``data.test_fraction``."""
    rows: list[LeafUser]
    rows, text = read_leaf_file(path)
    names = [u for u, _, _ in rows]
    xs = [x for _, x, _ in rows]
    ys = [y for _, _, y in rows]
    if not text:
        return Clients(names, xs, ys)
    _one_label(ys, path)
    ids, labels, vocab = tokenise(xs, ys)
    return Clients(names, ids, labels, vocab)


def _one_label(ys: list, path: Path) -> None:
    if any(isinstance(y, dict) for y in ys):
        raise file_error(path, "text samples with several labels per sample are not supported")


def read_leaf(path: Path) -> Clients | ClientSplits:
    return read_leaf_dir(path) if path.is_dir() else read_leaf_single(path)
