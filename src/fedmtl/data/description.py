"""A federation described, not held: what a server needs when every site keeps its own data.

On a real deployment the server has no samples, yet it builds the model (input shape, each task's
outputs), the algorithm (client ids, their tasks; sample counts where weighting, secure aggregation
or privacy budgets need them) and the sampler. A description is that much, as a small JSON file:
``fedmtl flower split`` writes one beside each node's data folder, and a consortium of sites writes
its own. A server runs it with ``data: {dataset: federation, file: federation.json}``; it sends the
description to the nodes, and each node reads only its own client's rows (``node_client``): a
``.npz`` of ``x_train, y_train, x_test, y_test``, LEAF JSON holding that user, or a client store.

Node files hold rows as the model takes them: the description's ``normalize`` says what was applied
before they were written (``fedmtl flower split`` applies the config's normalisation once, as
``fedmtl pack`` does), and a node applies nothing. LEAF JSON is the exception: it is read as LEAF's
scripts wrote it, so a node applies the normalisation the description records (the clients'
federated mean and standard deviation), exactly as the in-process loader does."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmtl.data import new_dir
from fedmtl.data.federated import ClientData, FederatedData, TaskSpec
from fedmtl.errors import ConfigError, DataError

FORMAT = "fedmtl-federation/1"
FILE = "federation.json"
NODE_FILE = "client.npz"
GLOBAL_FILE = "global_test.npz"
ARRAYS = ("x_train", "y_train", "x_test", "y_test")


@dataclass
class DescribedClient(ClientData):
    """A client the server knows by its description: its task and sample counts, no samples."""

    train_count: int | None = None
    test_count: int | None = None

    @property
    def n_train(self) -> int:  # type: ignore[override]
        if self.train_count is None:
            raise ConfigError(
                "federation description: no train_samples; this run needs each client's sample count "
                "on the server (sample weighting, secure aggregation or a privacy budget): add them"
            )
        return self.train_count

    @property
    def n_test(self) -> int:  # type: ignore[override]
        return 0 if self.test_count is None else self.test_count


def describe(data: FederatedData, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """The description of ``data`` (JSON-ready): what the server and the nodes build from. A
    described federation gives back its own description."""
    if "description" in data.info:
        return dict(data.info["description"])
    tasks = list(data.tasks.values())
    order = {t.name: i for i, t in enumerate(tasks)}
    clients = data.clients
    first = clients[int(np.argmax(data.train_sizes()))]
    return {
        "format": FORMAT,
        "name": data.name,
        "num_clients": data.num_clients,
        "input_shape": list(data.input_shape),
        "x_dtype": str(first.x_train.dtype),
        "task": asdict(data.task),
        "tasks": [asdict(t) for t in tasks],
        "y": {"dtype": str(first.y_train.dtype), "shape": list(first.y_train.shape[1:])},
        "client_tasks": [order[name] for name in data.task_names()] if len(tasks) > 1 else None,
        "names": [_name(clients, c) for c in range(data.num_clients)],
        "train_samples": [int(n) for n in data.train_sizes()],
        "test_samples": [int(n) for n in data.test_sizes()],
        "vocab": data.vocab,
        "info": {k: plain(v) for k, v in data.info.items() if k not in ("corrupt", "description")},
        "global_test": None,
        "provenance": provenance or {},
    }


def _name(clients: Any, cid: int) -> str:
    name_of = getattr(clients, "name_of", None)
    return name_of(cid) if name_of is not None else clients[cid].name


def plain(v: Any) -> Any:
    """JSON for numpy values (arrays, scalars) in a description's info."""
    return v.tolist() if hasattr(v, "tolist") else v


def _field(desc: dict[str, Any], key: str, where: str) -> Any:
    if key not in desc:
        raise DataError(f"federation description {where}: missing '{key}'")
    return desc[key]


def federation(desc: dict[str, Any], where: str, base: Path | None = None) -> FederatedData:
    """The federation a description names, every client without samples (the server's view);
    ``base``: the folder relative to which ``global_test`` is read."""
    if desc.get("format") != FORMAT:
        raise DataError(f"federation description {where}: format {desc.get('format')!r}, expected {FORMAT!r}")
    n = int(_field(desc, "num_clients", where))
    shape = tuple(int(s) for s in _field(desc, "input_shape", where))
    try:
        tasks = [TaskSpec(**t) for t in _field(desc, "tasks", where)]
        task = TaskSpec(**_field(desc, "task", where))
    except TypeError as exc:
        raise DataError(f"federation description {where}: a task is malformed ({exc})") from None
    which = desc.get("client_tasks") or [0] * n
    names = desc.get("names") or [str(c) for c in range(n)]
    counts = {k: desc.get(k) for k in ("train_samples", "test_samples")}
    for key, values in [("client_tasks", which), ("names", names), *counts.items()]:
        if values is not None and len(values) != n:
            raise DataError(
                f"federation description {where}: {key} has {len(values)} entries for {n} clients"
            )
    if any(not 0 <= int(t) < len(tasks) for t in which):
        raise DataError(
            f"federation description {where}: client_tasks must index tasks (0..{len(tasks) - 1})"
        )
    x_dtype = np.dtype(desc.get("x_dtype", "float32"))
    y = desc.get("y") or {}
    y_dtype = np.dtype(y.get("dtype", "int64" if task.is_classification else "float32"))
    y_shape = tuple(y.get("shape", ()))
    clients = [
        DescribedClient(
            c,
            np.empty((0, *shape), x_dtype),
            np.empty((0, *y_shape), y_dtype),
            np.empty((0, *shape), x_dtype),
            np.empty((0, *y_shape), y_dtype),
            tasks[int(which[c])],
            str(names[c]),
            train_count=None if counts["train_samples"] is None else int(counts["train_samples"][c]),
            test_count=None if counts["test_samples"] is None else int(counts["test_samples"][c]),
        )
        for c in range(n)
    ]
    gx = gy = None
    if desc.get("global_test"):
        gpath = Path(desc["global_test"])
        gpath = gpath if gpath.is_absolute() or base is None else base / gpath
        arrays = _npz(gpath, ("x", "y"))
        gx, gy = arrays["x"], arrays["y"]
    info = dict(desc.get("info") or {})
    info["described"] = True
    info["description"] = desc
    return FederatedData(
        str(desc.get("name", "federation")),
        clients,
        shape,
        task,
        gx,
        gy,
        where,
        info,
        vocab=desc.get("vocab"),
    )


def read_description(path: Path) -> dict[str, Any]:
    """A description file, or a folder holding ``federation.json``."""
    path = Path(path)
    file = path / FILE if path.is_dir() else path
    try:
        desc = json.loads(file.read_text())
    except FileNotFoundError:
        raise DataError(
            f"federation description {file}: not found (write one with 'fedmtl flower split')"
        ) from None
    except json.JSONDecodeError as exc:
        raise DataError(f"data file {file}: malformed JSON at line {exc.lineno}") from None
    if not isinstance(desc, dict):
        raise DataError(f"data file {file}: expected a JSON object")
    return desc


def load_described(path: Path) -> FederatedData:
    """``dataset: federation``: the server's view of the federation described at ``path``."""
    file = Path(path) / FILE if Path(path).is_dir() else Path(path)
    return federation(read_description(file), str(file), file.parent)


# ------------------------------------------------------------------------------------ nodes
def _npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise DataError(
                    f"data file {path}: no array {missing[0]!r} (a node's .npz holds {', '.join(keys)})"
                )
            return {k: z[k] for k in keys}
    except FileNotFoundError:
        raise DataError(f"data file {path}: not found") from None
    except (ValueError, OSError) as exc:
        raise DataError(f"data file {path}: not a readable .npz ({exc})") from None


def _leaf_user(path: Path, desc: FederatedData, cid: int) -> dict[str, np.ndarray]:
    """This node's user from LEAF JSON (a directory with train/ and test/): the one user there, or
    the one the description names for this client; text through the federation's vocabulary."""
    from fedmtl.data.formats import read_leaf_file
    from fedmtl.data.leaf import leaf_layout

    train_files, test_files = leaf_layout(path)
    want = desc.clients[cid].name
    found: dict[str, dict[str, np.ndarray]] = {}
    text = False
    for split, files in (("train", train_files), ("test", test_files)):
        for f in files:
            rows, text = read_leaf_file(f)
            for user, x, y in rows:
                found.setdefault(user, {})[f"x_{split}"] = x
                found[user][f"y_{split}"] = y
    user = want if want in found else (next(iter(found)) if len(found) == 1 else None)
    if user is None:
        raise DataError(
            f"data path {path}: holds {len(found)} LEAF users and none is {want!r}, the user of client {cid}"
        )
    arrays = found[user]
    for key in ARRAYS:
        if key not in arrays:
            raise DataError(f"data path {path}: user {user!r} has no {key.split('_')[1]} samples")
    if text:
        if desc.vocab is None:
            raise DataError(f"data path {path}: holds text but the federation has no vocabulary")
        ids = {ch: i for i, ch in enumerate(desc.vocab)}
        width = desc.input_shape[0] if desc.input_shape else 0
        for split in ("train", "test"):
            x = arrays[f"x_{split}"].astype(np.int64)
            tok = np.zeros((len(x), max(width, x.shape[1])), dtype=np.int64)
            tok[:, : x.shape[1]] = np.vectorize(lambda c: ids.get(chr(c), -1) + 1 if c > 0 else 0)(x)
            arrays[f"x_{split}"] = tok[:, :width] if width else tok
            arrays[f"y_{split}"] = np.vectorize(lambda c: ids.get(chr(int(c)), 0))(arrays[f"y_{split}"])
    return arrays


def node_client(path: Path, desc: FederatedData, cid: int) -> ClientData:
    """Client ``cid``'s rows from this node's own files at ``path`` (checked against the description)."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / NODE_FILE).is_file():
        path = path / NODE_FILE
    if path.is_file() and path.suffix == ".npz":
        arrays = _npz(path, ARRAYS)
    elif path.is_dir() and (path / "meta.json").is_file():
        from fedmtl.data.store import open_store

        stored = open_store(path)
        if stored.num_clients != 1:
            raise DataError(
                f"data path {path}: a node's store holds one client, this one {stored.num_clients}"
            )
        c = stored.clients[0]
        arrays = dict(zip(ARRAYS, (c.x_train, c.y_train, c.x_test, c.y_test), strict=True))
    elif path.is_dir():
        arrays = _leaf_user(path, desc, cid)
        stats = desc.info.get("normalization")
        if stats is not None:  # raw as LEAF stores it: the federation's map, as loading applies it
            from fedmtl.data.moments import normalise

            for key in ("x_train", "x_test"):
                arrays[key] = normalise(arrays[key], stats, desc.input_shape)
    else:
        raise DataError(
            f"data path {path}: not found, or not a {NODE_FILE}, a .npz, a client store or a LEAF directory"
        )
    expected = desc.clients[cid]
    out: dict[str, np.ndarray] = {}
    for key in ARRAYS:
        a = np.asarray(arrays[key])
        like = getattr(expected, key)
        if key.startswith("x") and a.shape[1:] != like.shape[1:]:
            if a.ndim == 2 and int(np.prod(like.shape[1:])) == a.shape[1]:
                a = a.reshape(len(a), *like.shape[1:])  # flattened images, as LEAF stores them
            else:
                raise DataError(
                    f"data path {path}: {key} rows have shape {list(a.shape[1:])}, the federation's "
                    f"input shape is {list(like.shape[1:])}"
                )
        out[key] = np.array(a, dtype=like.dtype)  # a writable copy (readers may cache theirs read-only)
    for key, n in (("y_train", expected.train_count), ("y_test", expected.test_count)):
        if n is not None and len(out[key]) != n:
            split = key.split("_")[1]
            raise DataError(
                f"data path {path}: client {cid} has {len(out[key])} {split} samples, the federation "
                f"description says {n}"
            )
    return ClientData(
        cid, out["x_train"], out["y_train"], out["x_test"], out["y_test"], expected.task, expected.name
    )


def node_federation(desc_json: str, path: Path, cid: int) -> tuple[FederatedData, ClientData]:
    """What a node builds: the described federation, with its own client's rows read from ``path``."""
    desc = json.loads(desc_json)
    desc["global_test"] = None  # the server's file, if any; nodes evaluate on their own test rows
    data = federation(desc, "(from the server)")
    if not 0 <= cid < data.num_clients:
        raise ConfigError(
            f"node_config: partition-id = {cid}: the federation has {data.num_clients} clients "
            f"(0..{data.num_clients - 1})"
        )
    client = node_client(path, data, cid)
    clients = list(data.clients)
    clients[cid] = client
    data.clients = clients
    return data, client


# ------------------------------------------------------------------------------------ split
def write_node_folders(data: FederatedData, out: Path, provenance: dict[str, Any] | None = None) -> Path:
    """``out/federation.json`` (the server's part: no samples), ``out/global_test.npz`` when the data
    has a global test set, and ``out/node-<cid>/client.npz`` for each client (each site's part).
    Written beside ``out`` and renamed: complete or absent."""
    out = Path(out)
    if data.holdout:
        raise DataError(
            "fedmtl flower split: hold-out clients need their data on the server; drop data.holdout_clients"
        )
    tmp = new_dir.begin(out, "node folders")
    desc = describe(data, provenance)
    for cid in range(data.num_clients):
        c = data.clients[cid]
        node = tmp / f"node-{cid}"
        node.mkdir()
        np.savez(node / NODE_FILE, x_train=c.x_train, y_train=c.y_train, x_test=c.x_test, y_test=c.y_test)
    if data.x_global_test is not None and data.y_global_test is not None:
        np.savez(tmp / GLOBAL_FILE, x=data.x_global_test, y=data.y_global_test)
        desc["global_test"] = GLOBAL_FILE
    (tmp / FILE).write_text(json.dumps(desc, indent=1, default=plain))
    return new_dir.commit(tmp, out)
