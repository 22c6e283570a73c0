"""Dataset registry and ``load_federated``: raw files -> per-client train/test splits.

Pooled datasets (digits, diabetes, mnist) are partitioned by ``data.partition``; natural
multi-task datasets (landmine, school, vehicle, LEAF files) give one client per task. Randomness
comes from ``np.random.default_rng([seed, purpose, ...])`` streams so a seed reproduces everything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedmtl.data import partition
from fedmtl.data.clients import ClientList, Rows
from fedmtl.data.concepts import apply_concepts
from fedmtl.data.config import DataConfig, PartitionConfig
from fedmtl.data.corrupt import corrupt_clients
from fedmtl.data.federated import ClientData, FederatedData, TaskSpec
from fedmtl.data.formats import file_error, read_idx_gz, read_mat_tasks
from fedmtl.data.leaf import read_leaf
from fedmtl.data.moments import normalise, standardiser, statistics
from fedmtl.data.paths import HOW_TO_SET, resolve_data_dir
from fedmtl.data.raw import Clients, ClientSplits, Pooled, Raw
from fedmtl.data.recorded import as_written
from fedmtl.data.resample import resample as resample_clients
from fedmtl.data.tasks import assign_tasks
from fedmtl.data.validation import carve_all
from fedmtl.errors import ConfigError, DataError
from fedmtl.registration import described, same_definition

EMBEDDED = "embedded (scikit-learn)"
POOLED_KINDS = ("iid", "dirichlet", "shards", "quantity", "target", "covariate", "resample")
REGRESSION_BINS = 10  # label-skew partitions of regression data use target quantile bins
# Purposes for np.random.default_rng([seed, purpose, ...]); fixed so old seeds stay valid.
RNG_HOLDOUT, RNG_PARTITION, RNG_SPLIT, RNG_HOLDOUT_CLIENTS = 1, 2, 3, 4


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the loader and ``fedmtl datasets`` need to know about one registered dataset."""

    name: str
    kind: Literal["pooled", "natural"]
    task: Literal["classification", "regression"]
    files: tuple[str, ...]  # relative to the data dir; empty for embedded data
    input_shape: tuple[int, ...] | None  # None: (features,) taken from the data
    read: Callable[[list[Path]], Raw]
    description: str
    num_classes: int | None = None  # None: max label + 1 (classification)
    pixel_max: float = 1.0  # images are divided by this to land in [0, 1] (normalize: scale)
    #: a reader registered with ``register_dataset``: called with the data section, not file paths
    load: Callable[[DataConfig], Raw] | None = None
    #: Per-client task derivation after scaling (``data.tasks`` passed through): returns the new
    #: clients and facts for ``info``. Datasets whose clients learn different derived tasks use it.
    derive: Callable[[list[ClientData], list[str] | None, int], tuple[list[ClientData], dict]] | None = None
    #: what ``data.normalize: auto`` means for this dataset when its tasks fix it (None: by layout)
    auto: str | None = None

    @property
    def image(self) -> bool:
        return self.input_shape is not None and len(self.input_shape) > 1


# ------------------------------------------------------------------------------------ readers


def _class_labels(y: np.ndarray, where: str) -> np.ndarray:
    """Map -1/+1 labels to 0/1 and check the rest are non-negative integers."""
    y = np.asarray(y)
    if y.size and not np.all(y == np.round(y)):
        raise file_error(where, "classification labels must be integers")
    y = y.astype(np.int64)
    if y.size and set(np.unique(y).tolist()) <= {-1, 1} and y.min() == -1:
        y = (y > 0).astype(np.int64)
    if y.size and y.min() < 0:
        raise file_error(where, f"classification labels must be non-negative or -1/+1, found {y.min()}")
    return y


def _joint_labels(ys: list[np.ndarray], where: str) -> list[np.ndarray]:
    """Map labels jointly over all clients so a client holding only -1 still maps to class 0."""
    if not ys:
        return ys
    sizes = [len(y) for y in ys]
    return np.split(_class_labels(np.concatenate(ys), where), np.cumsum(sizes)[:-1])


def _tasks_labels(names: list[str], xs: list[np.ndarray], ys: list[np.ndarray], where: str) -> Clients:
    return Clients(names, xs, _joint_labels(ys, where))


@lru_cache(maxsize=2)
def _sklearn(name: str) -> Pooled:
    from sklearn import datasets as skd

    if name == "digits":
        d = skd.load_digits()
        x, y = _channel(d.images), d.target.astype(np.int64)
    else:
        d = skd.load_diabetes(scaled=False)
        x, y = d.data.astype(np.float64), d.target.astype(np.float64)
    x.flags.writeable = y.flags.writeable = False  # shared by every load through the cache
    return Pooled(x, y)


def _read_mnist(paths: list[Path]) -> Raw:
    arrays = [read_idx_gz(p) for p in paths]
    for i in (0, 2):
        if len(arrays[i]) != len(arrays[i + 1]):
            raise file_error(paths[i + 1], f"{len(arrays[i + 1])} labels but {len(arrays[i])} images")
        if arrays[i].ndim != 3 or arrays[i + 1].ndim != 1:
            raise file_error(
                paths[i], f"unexpected image/label shapes {arrays[i].shape}/{arrays[i + 1].shape}"
            )

    # Pixels stay uint8 here; _finalise scales each client's slice, which is cheaper than the pool.
    labels = [a.astype(np.int64) for a in arrays[1::2]]
    return Pooled(_channel(arrays[0]), labels[0], _channel(arrays[2]), labels[1])


def _channel(images: np.ndarray) -> np.ndarray:
    """Add the single channel axis: (n, h, w) -> (n, 1, h, w)."""
    return images.reshape(len(images), 1, *images.shape[1:])


def _read_mat_classes(paths: list[Path]) -> Raw:
    xs, ys = read_mat_tasks(paths[0])
    return _tasks_labels([f"task_{t:03d}" for t in range(len(xs))], xs, ys, str(paths[0]))


def _read_mat_regression(paths: list[Path]) -> Raw:
    xs, ys = read_mat_tasks(paths[0])
    return Clients([f"task_{t:03d}" for t in range(len(xs))], xs, [y.astype(np.float64) for y in ys])


def _read_leaf(paths: list[Path]) -> Raw:
    return read_leaf(paths[0])


def _dense_tasks(
    clients: list[ClientData], names: list[str] | None, seed: int
) -> tuple[list[ClientData], dict]:
    from fedmtl.fedbone.tasks import assign_dense_tasks  # FedBone's tasks; imported on use

    return assign_dense_tasks(clients, names, seed)


def _multimodal(name: str) -> Callable[[list[Path]], Raw]:
    """Multi-modal rows (modalities + mask columns; layout in ``fedmtl.fdrmfl.data``)."""

    def read(_: list[Path]) -> Raw:
        from fedmtl.fdrmfl.data import pooled

        return Pooled(*pooled(name))

    return read


def _reads_through_load(_: list[Path]) -> Raw:
    raise AssertionError("this dataset is read by its own loader, not from file paths")


MNIST_FILES = tuple(
    f"mnist/{n}"
    for n in (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    )
)

REGISTRY: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        DatasetSpec(
            "digits",
            "pooled",
            "classification",
            (),
            (1, 8, 8),
            lambda _: _sklearn("digits"),
            "8x8 handwritten digits, 1797 images, 10 classes",
            10,
            16.0,
        ),
        DatasetSpec(
            "diabetes",
            "pooled",
            "regression",
            (),
            None,
            lambda _: _sklearn("diabetes"),
            "diabetes progression, 442 patients, 10 features",
        ),
        DatasetSpec(
            "mnist",
            "pooled",
            "classification",
            MNIST_FILES,
            (1, 28, 28),
            _read_mnist,
            "MNIST digits, 60000 train + 10000 test, 10 classes",
            10,
            255.0,
        ),
        DatasetSpec(
            "mnist_dense",
            "pooled",
            "classification",
            MNIST_FILES,
            (1, 28, 28),
            _read_mnist,
            "MNIST with per-client dense tasks: digit, segment (mIoU), edge (RMSE), denoise (PSNR)",
            10,
            255.0,
            derive=_dense_tasks,
            auto="scale",  # its derived targets (foreground, edges, clean image) are defined on [0, 1]
        ),
        DatasetSpec(
            "landmine",
            "natural",
            "classification",
            ("landmine/LandmineData.mat",),
            None,
            _read_mat_classes,
            "Land Mine: 29 mine fields, 9 features, binary",
            2,
        ),
        DatasetSpec(
            "landmine_small",
            "natural",
            "classification",
            ("mocha/landmine_small.mat",),
            None,
            _read_mat_classes,
            "MOCHA toy subsample of Land Mine, 29 tasks",
            2,
        ),
        DatasetSpec(
            "school",
            "natural",
            "regression",
            ("mocha/school.mat",),
            None,
            _read_mat_regression,
            "ILEA school exam scores: 139 schools, 28 features",
        ),
        DatasetSpec(
            "vehicle",
            "natural",
            "classification",
            ("mocha/vehicle_train_subset.json.gz",),
            None,
            _read_leaf,
            "Vehicle Sensor: 23 sensors, 100 features, binary",
            2,
        ),
        *(
            DatasetSpec(n, "pooled", "regression", (), None, _multimodal(n), d)
            for n, d in (
                ("diabetes_mm", "diabetes as 2 modalities: clinical {age,sex,bmi,bp} + serum {s1..s6}"),
                ("fdrmfl_sim1", "FDRMFL simulation f1: image 3x32x32 + sequence 10x50 + vector 32"),
                ("fdrmfl_sim2", "FDRMFL simulation f2: image 3x32x32 + sequence 10x50 + vector 32"),
                ("fdrmfl_sim3", "FDRMFL simulation f3: image 3x32x32 + sequence 10x50 + vector 32"),
            )
        ),
        DatasetSpec(
            "store",
            "natural",
            "classification",
            (),
            None,
            _reads_through_load,
            "a federation packed by 'fedmtl pack' (data.file: its directory), memory-mapped",
        ),
        DatasetSpec(
            "federation",
            "natural",
            "classification",
            (),
            None,
            _reads_through_load,
            "a federation whose data stays on the Flower nodes (data.file: its federation.json, "
            "written by 'fedmtl flower split'); the server's view, no samples",
        ),
        DatasetSpec(
            "leaf",
            "natural",
            "classification",
            (),
            None,
            _read_leaf,
            "LEAF data given by data.file: a directory with train/ and test/ (LEAF's own split) "
            "or one JSON file; one client per user",
        ),
    )
}


# ------------------------------------------------------------------------------------ lookup


def get_spec(name: str) -> DatasetSpec:
    """The registry entry for ``name``; unknown names are a config error listing the known ones."""
    if name not in REGISTRY:
        raise ConfigError(
            f"config: data.dataset = {name!r}: unknown dataset; available: {', '.join(REGISTRY)}"
        )
    return REGISTRY[name]


def _check_partition(spec: DatasetSpec, kind: str) -> None:
    if spec.kind == "natural" and kind != "natural":
        raise ConfigError(
            f"config: data.partition.kind = {kind!r}: dataset {spec.name!r} has one task per client; "
            "use 'natural'"
        )
    if spec.kind == "pooled" and kind == "natural":
        raise ConfigError(
            f"config: data.partition.kind = 'natural': dataset {spec.name!r} has no natural clients; "
            f"use one of {', '.join(POOLED_KINDS)}"
        )


_FILE_NEEDS = {
    "leaf": "a LEAF data directory with train/ and test/, or one LEAF-style .json or .json.gz",
    "store": "a client store directory written by 'fedmtl pack'",
    "federation": "a federation.json, or the folder 'fedmtl flower split' wrote",
}


def _leaf_file(cfg: DataConfig, dataset: str = "leaf") -> Path:
    if not cfg.file:
        raise ConfigError(f"config: data.file is required for dataset {dataset!r} ({_FILE_NEEDS[dataset]})")
    p = Path(cfg.file).expanduser()
    if p.is_absolute() or p.exists():
        candidates = [p]
    else:
        root = resolve_data_dir(cfg.dir)
        candidates = [p] + ([root / p] if root is not None else [])
    for cand in candidates:
        if cand.is_file() or cand.is_dir():
            return cand
    looked = " or ".join(str(c) for c in candidates)
    raise DataError(f"dataset {dataset!r}: file not found: {looked} (data.file)")


def locate_files(spec: DatasetSpec, data_dir: str | None) -> list[Path]:
    """Absolute paths of a file dataset's files; one-line DataError naming the first missing one."""
    root = resolve_data_dir(data_dir)
    if root is None:
        raise DataError(
            f"dataset {spec.name!r}: no data directory found ({HOW_TO_SET}, or put the files "
            f"in ../shared/data)"
        )
    paths = [root / f for f in spec.files]
    for p in paths:
        if not p.is_file():
            raise DataError(f"dataset {spec.name!r}: file not found: {p} ({HOW_TO_SET})")
    return paths


def _load_raw(spec: DatasetSpec, cfg: DataConfig) -> tuple[Raw, str]:
    if spec.load is not None:
        raw = spec.load(cfg)
        if not isinstance(raw, Pooled | Clients | ClientSplits):
            raise DataError(
                f"dataset {spec.name!r}: its registered reader returned {type(raw).__name__}; expected "
                "fedmtl.data.Pooled, Clients or ClientSplits"
            )
        return raw, f"registered ({cfg.file or cfg.dir or spec.name})"
    if spec.name == "leaf":
        path = _leaf_file(cfg)
        return spec.read([path]), str(path.resolve())
    if cfg.file is not None:
        raise ConfigError(
            f"config: data.file = {cfg.file!r}: only used by datasets 'leaf', 'store' and 'federation', "
            f"not {spec.name!r}"
        )
    if not spec.files:
        return spec.read([]), EMBEDDED
    paths = locate_files(spec, cfg.dir)
    source = paths[0] if len(paths) == 1 else paths[0].parent
    return spec.read(paths), str(source)


# ------------------------------------------------------------------------------------ building


Split = tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # name, x_tr, y_tr, x_te, y_te


def _rng(seed: int, *purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, *purpose])


def _partition_labels(y: np.ndarray, classification: bool) -> np.ndarray:
    if classification:
        return y
    edges = np.quantile(y, np.linspace(0, 1, REGRESSION_BINS + 1)[1:-1])
    return np.digitize(y, edges)


def partition_indices(
    pcfg: PartitionConfig,
    labels: np.ndarray,
    rng: np.random.Generator,
    y: np.ndarray | None = None,
    x: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Dispatch ``data.partition`` to the pooled partition functions (``y``: raw targets for
    'target', ``x``: inputs for 'covariate'; the labels stand in when absent)."""
    n, k = len(labels), pcfg.num_clients
    if pcfg.kind == "target":
        return partition.sorted_groups(labels if y is None else y, k, pcfg.jitter, rng)
    if pcfg.kind == "covariate":
        if x is None:
            raise ConfigError("config: data.partition.kind = 'covariate': needs the inputs")
        return partition.sorted_groups(partition.first_component(x), k, pcfg.jitter, rng)
    if pcfg.kind == "iid":
        return partition.iid(n, k, rng)
    if pcfg.kind == "dirichlet":
        return partition.dirichlet(labels, k, pcfg.alpha, pcfg.min_samples, rng)
    if pcfg.kind == "shards":
        return partition.shards(labels, k, pcfg.classes_per_client, rng)
    if pcfg.kind == "quantity":
        return partition.quantity_skew(n, k, pcfg.sigma, pcfg.min_samples, rng)
    raise ConfigError(f"config: data.partition.kind = {pcfg.kind!r}: not a pooled partition")


def _split_clients(
    groups: list[tuple[str, np.ndarray, np.ndarray]], cfg: DataConfig, seed: int, classification: bool
) -> list[Split]:
    out: list[Split] = []
    for cid, (name, x, y) in enumerate(groups):
        tr, te = partition.split_train_test(
            y, cfg.test_fraction, _rng(seed, RNG_SPLIT, cid), stratify=classification
        )
        out.append((name, x[tr], y[tr], x[te], y[te]))
    return out


def _pooled_groups(
    raw: Pooled, cfg: DataConfig, seed: int, classification: bool
) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], np.ndarray, np.ndarray]:
    if raw.x_test is None or raw.y_test is None:
        tr, te = partition.split_train_test(
            raw.y, cfg.global_test_fraction, _rng(seed, RNG_HOLDOUT), classification
        )
        x, y, gx, gy = raw.x[tr], raw.y[tr], raw.x[te], raw.y[te]
    else:
        x, y, gx, gy = raw.x, raw.y, raw.x_test, raw.y_test
    labels = _partition_labels(y, classification)
    parts = partition_indices(cfg.partition, labels, _rng(seed, RNG_PARTITION), y=y, x=x)
    parts = parts[: cfg.max_clients]  # a cap keeps the first clients; the rest of the pool is unused
    return [(f"client_{i:03d}", x[idx], y[idx]) for i, idx in enumerate(parts)], gx, gy


@dataclass(frozen=True)
class Layout:
    """How samples look once loaded: their shape, whether they are images or token ids, and the
    normalisation ``data.normalize`` resolved to for them."""

    shape: tuple[int, ...]
    text: bool
    normalize: str

    @property
    def image(self) -> bool:
        return not self.text and len(self.shape) > 1


def auto_normalize(image: bool, text: bool) -> str:
    """What ``data.normalize: auto`` means: images standardised per channel (dark or light
    background alike: the background lands near zero either way), token ids as they are, vector
    features standardised per feature."""
    if text:
        return "none"
    return "channel" if image else "standardize"


NORMALIZE_NOTES = {
    "standardize": "per-feature (x - mean) / std from the clients' federated mean and variance",
    "channel": "per-channel (x - mean) / std from the clients' federated mean and variance",
    "scale": "images divided by their pixel maximum, to [0, 1]",
    "none": "values as stored",
}


def _layout(spec: DatasetSpec, cfg: DataConfig, features: tuple[int, ...], text: bool) -> Layout:
    """The sample shape (``data.input_shape`` if given, else the dataset's) and the normalisation."""
    shape = tuple(cfg.input_shape) if cfg.input_shape else spec.input_shape or features
    size, have = int(np.prod(shape)), int(np.prod(features))
    if size != have:
        raise ConfigError(
            f"config: data.input_shape = {list(shape)}: {size} values per sample, but dataset "
            f"{spec.name!r} has {have}"
        )
    image = not text and len(shape) > 1
    norm = cfg.normalize
    if norm == "auto":
        norm = spec.auto or auto_normalize(image, text)
    elif text and norm != "none":
        raise ConfigError(
            f"config: data.normalize = {norm!r}: dataset {spec.name!r} holds text as token ids; "
            "use 'none' or 'auto'"
        )
    elif norm in ("scale", "channel") and not image:
        what = "divides images by their pixel maximum" if norm == "scale" else "standardises image channels"
        raise ConfigError(
            f"config: data.normalize = {norm!r}: {what}, and dataset {spec.name!r} has vector samples "
            f"{list(shape)}; use 'standardize', 'none' or 'auto' (or data.input_shape for flattened images)"
        )
    return Layout(shape, text, norm)


def _finalise(
    splits: list[Split],
    gx: np.ndarray | None,
    gy: np.ndarray | None,
    spec: DatasetSpec,
    layout: Layout,
    num_classes: int | None,
) -> tuple[list[Split], np.ndarray | None, np.ndarray | None, TaskSpec, dict[str, Any]]:
    """Scale features/targets with the clients' federated training statistics, shape samples, fix
    dtypes."""
    info: dict[str, Any] = {}
    shape = layout.shape
    stats = None
    if layout.normalize in ("standardize", "channel"):
        channels = shape[0] if layout.normalize == "channel" else None
        stats = statistics(layout.normalize, *standardiser((s[1] for s in splits), channels))
        info["normalization"] = stats
    train_y = np.concatenate([s[2] for s in splits])
    all_y = np.concatenate([train_y, *(s[4] for s in splits)])
    if spec.task == "regression":
        tmean, tstd = (float(v[0]) for v in standardiser(s[2].reshape(-1, 1) for s in splits))
        task = TaskSpec("regression", 1, spec.name, tmean, tstd)
    else:
        tmean, tstd = 0.0, 1.0
        n_cls = num_classes or spec.num_classes or max(2, int(all_y.max()) + 1)
        task = TaskSpec("classification", n_cls, spec.name)
        info["num_classes"] = n_cls

    def fx(x: np.ndarray) -> np.ndarray:
        if stats is not None:
            return normalise(x, stats, shape)
        if layout.normalize == "scale":
            x = x.astype(np.float32) / np.float32(spec.pixel_max)
        return x.astype(np.float32, copy=not x.flags.writeable).reshape(len(x), *shape)

    def fy(y: np.ndarray) -> np.ndarray:
        if task.is_classification:
            return y.astype(np.int64, copy=False)
        return ((y - tmean) / tstd).astype(np.float32)

    # Every client's training samples are consecutive rows of one array (the clients get views):
    # batched training then gathers any group's mini-batches from it without first copying the
    # group's data together.
    sizes = np.cumsum([len(s[2]) for s in splits])[:-1]
    x_trains = np.split(fx(np.concatenate([s[1] for s in splits])), sizes)
    y_trains = np.split(fy(np.concatenate([s[2] for s in splits])), sizes)
    out = [
        (n, xa, ya, fx(c), fy(d)) for (n, _, _, c, d), xa, ya in zip(splits, x_trains, y_trains, strict=True)
    ]
    if gx is None or gy is None:
        return out, None, None, task, info
    return out, fx(gx), fy(gy), task, info


def _natural_splits(
    raw: Clients | ClientSplits, cfg: DataConfig, seed: int, classification: bool, where: str
) -> list[Split]:
    """Per-client train/test: split by ``data.test_fraction``, or as the data gives them."""
    tokens = raw.vocab is not None
    if isinstance(raw, Clients):
        ys = _joint_labels(raw.ys, where) if classification and not tokens else raw.ys
        groups = [(n, x, y) for n, x, y in zip(raw.names, raw.xs, ys, strict=True) if len(y)]
        return _split_clients(groups[: cfg.max_clients], cfg, seed, classification)
    n = len(raw.names)
    lists = (raw.names, raw.x_train, raw.y_train, raw.x_test, raw.y_test)
    if len({len(v) for v in lists}) != 1:
        raise file_error(where, "client splits: names, x_train, y_train, x_test and y_test differ in length")
    y_tr, y_te = raw.y_train, raw.y_test
    if classification and not tokens:
        joint = _joint_labels(list(y_tr) + list(y_te), where)
        y_tr, y_te = joint[:n], joint[n:]
    out = list(zip(raw.names, raw.x_train, y_tr, raw.x_test, y_te, strict=True))
    return out[: cfg.max_clients]


def _resampled(
    raw: Pooled, spec: DatasetSpec, cfg: DataConfig, seed: int
) -> tuple[ClientList, np.ndarray | None, np.ndarray | None, TaskSpec, Layout, dict[str, Any]]:
    """``partition.kind: resample``: clients as index ranges into the normalised pool."""
    rewrites = {
        "tasks": cfg.tasks,
        "corrupt.enabled": cfg.corrupt.enabled,
        "concepts": cfg.concepts,
        "missing_modalities": cfg.missing_modalities,
        "derived tasks": spec.derive,
    }
    for key, value in rewrites.items():
        if value:
            raise ConfigError(
                f"config: data.partition.kind = 'resample': its clients are views into one pool, and "
                f"{key} rewrites every client's data; use another partition kind"
            )
    classification = spec.task == "classification"
    if raw.x_test is None or raw.y_test is None:
        holdout_rng = _rng(seed, RNG_HOLDOUT)
        tr, te = partition.split_train_test(raw.y, cfg.global_test_fraction, holdout_rng, classification)
        x, y, gx, gy = raw.x[tr], raw.y[tr], raw.x[te], raw.y[te]
    else:
        x, y, gx, gy = raw.x, raw.y, raw.x_test, raw.y_test
    pcfg = cfg.partition
    if cfg.max_clients is not None:
        pcfg = pcfg.model_copy(update={"num_clients": min(pcfg.num_clients, cfg.max_clients)})
    train_idx, train_off, test_idx, test_off = resample_clients(
        _partition_labels(y, classification), pcfg, cfg.test_fraction, _rng(seed, RNG_PARTITION)
    )
    layout = _layout(spec, cfg, _features(x), False)
    counts = np.bincount(train_idx, minlength=len(y)).astype(np.float64)  # the clients' train rows
    total = counts.sum()
    info: dict[str, Any] = {}
    # Each pool row weighted by how many clients hold it: the clients' federated moments.
    if layout.normalize in ("standardize", "channel"):
        groups = layout.shape[0] if layout.normalize == "channel" else int(np.prod(layout.shape))
        rows = x.reshape(len(x), groups, -1)  # (pool, groups, values per group)
        weight = counts.reshape(-1, 1, 1) / (total * rows.shape[2])
        mean = (weight * rows).sum(axis=(0, 2))
        std = np.sqrt((weight * np.square(rows - mean.reshape(1, -1, 1))).sum(axis=(0, 2)))
        stats = statistics(layout.normalize, mean, std)
        info["normalization"] = stats

        def fx(a: np.ndarray) -> np.ndarray:
            return normalise(a, stats, layout.shape)
    else:
        div = np.float32(spec.pixel_max if layout.normalize == "scale" else 1.0)

        def fx(a: np.ndarray) -> np.ndarray:
            return (a.astype(np.float32) / div).reshape(len(a), *layout.shape)

    if classification:
        n_cls = spec.num_classes or max(2, int(y.max()) + 1)
        task = TaskSpec("classification", n_cls, spec.name)
        info["num_classes"] = n_cls

        def fy(a: np.ndarray) -> np.ndarray:
            return a.astype(np.int64)
    else:
        tmean = float(counts @ y / total)
        tstd = float(np.sqrt(counts @ np.square(y - tmean) / total)) or 1.0
        task = TaskSpec("regression", 1, spec.name, tmean, tstd)

        def fy(a: np.ndarray) -> np.ndarray:
            return ((a - tmean) / tstd).astype(np.float32)

    xs, ys = fx(x), fy(y)
    xs.flags.writeable = ys.flags.writeable = False
    clients = ClientList(Rows(xs, ys, train_off, train_idx), Rows(xs, ys, test_off, test_idx), [task])
    info["pool_samples"] = len(y)
    return clients, fx(gx), fy(gy), task, layout, info


def _features(x: np.ndarray) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape[1:])


def load_federated(cfg: DataConfig, seed: int) -> FederatedData:
    """Load ``cfg.dataset`` and split it into clients, reproducibly for a given ``seed``."""
    cfg = as_written(cfg)  # a store or LEAF export read with the config that wrote it
    spec = get_spec(cfg.dataset)
    _check_partition(spec, cfg.partition.kind or ("natural" if spec.kind == "natural" else "dirichlet"))
    if spec.name == "store":
        return _stored(cfg, seed)
    if spec.name == "federation":
        return _described(cfg, seed)
    raw, source = _load_raw(spec, cfg)
    classification = spec.task == "classification"
    vocab = None if isinstance(raw, Pooled) else raw.vocab
    if cfg.partition.kind == "resample" and isinstance(raw, Pooled):
        _no_validation(cfg, "partition.kind 'resample'")
        listed, gx, gy, task, layout, info = _resampled(raw, spec, cfg, seed)
        info.update(partition="resample", seed=seed, normalize=layout.normalize)
        info["test_fraction"] = cfg.test_fraction
        holdout = _holdout(len(listed), cfg.holdout_clients, seed)
        return FederatedData(spec.name, listed, layout.shape, task, gx, gy, source, info, holdout)
    if isinstance(raw, Pooled):
        groups, gx, gy = _pooled_groups(raw, cfg, seed, classification)
        splits = _split_clients(groups, cfg, seed, classification)
    else:
        splits = _natural_splits(raw, cfg, seed, classification, source)
        if not splits:
            raise DataError(f"dataset {spec.name!r}: no client has any samples")
        gx = np.concatenate([s[3] for s in splits])
        gy = np.concatenate([s[4] for s in splits])
    layout = _layout(spec, cfg, _features(splits[0][1]), vocab is not None)
    splits, gx, gy, task, info = _finalise(splits, gx, gy, spec, layout, len(vocab) if vocab else None)
    clients = [ClientData(cid, a, b, c, d, task, name) for cid, (name, a, b, c, d) in enumerate(splits)]
    shape = layout.shape
    if spec.derive is not None:
        clients, extra = spec.derive(clients, list(cfg.tasks) if cfg.tasks else None, seed)
        task, gx, gy = clients[0].task, None, None  # no single global test set across tasks
        info.update(extra)
    elif cfg.tasks:
        clients = assign_tasks(clients, list(cfg.tasks), layout.image, task.num_outputs)
        task, gx, gy = clients[0].task, None, None  # no single global test set across different tasks
        info["tasks"] = {name: sum(c.task.name == name for c in clients) for name in dict.fromkeys(cfg.tasks)}
    if cfg.missing_modalities:
        clients = _drop_modalities(clients, spec.name, cfg.missing_modalities)
        info["missing_modalities"] = {int(c): list(m) for c, m in sorted(cfg.missing_modalities.items())}
    if cfg.concepts is not None:
        # before validation carving and corruption: every split of a client shares its concept
        clients, info["concepts"] = apply_concepts(clients, cfg.concepts, seed, shape, layout.image)
        gx, gy = None, None  # no single global test set across conflicting concepts
    if cfg.val_fraction > 0:
        clients = carve_all(clients, cfg.val_fraction, seed)
        info["val_fraction"] = cfg.val_fraction
    holdout = _holdout(len(clients), cfg.holdout_clients, seed)
    if cfg.corrupt.enabled:
        held = set(holdout)
        clients, info["corrupt"] = corrupt_clients(
            clients,
            cfg.corrupt,
            seed,
            [c.cid for c in clients if c.cid not in held],
            _pixels_as_samples(spec, layout, info.get("normalization")) if layout.image else None,
        )
    info.update(
        partition=cfg.partition.kind,
        seed=seed,
        normalize=layout.normalize,
        test_fraction=None if isinstance(raw, ClientSplits) else cfg.test_fraction,
    )
    if vocab is not None:
        info["vocab"] = "".join(vocab)
    return FederatedData(spec.name, clients, shape, task, gx, gy, source, info, holdout, vocab=vocab)


def _pixels_as_samples(
    spec: DatasetSpec, layout: Layout, stats: dict[str, Any] | None
) -> Callable[[np.ndarray], np.ndarray]:
    """[0, 1] pixels (what the corruption harness makes) as this dataset's samples are normalised."""

    def to_model(x01: np.ndarray) -> np.ndarray:
        raw = np.asarray(x01, dtype=np.float64) * spec.pixel_max
        if stats is not None:
            return normalise(raw, stats, layout.shape)
        scale = 1.0 if layout.normalize == "scale" else spec.pixel_max
        return (np.asarray(x01, dtype=np.float32) * np.float32(scale)).reshape(len(raw), *layout.shape)

    return to_model


def _no_validation(cfg: DataConfig, what: str) -> None:
    if cfg.val_fraction > 0:
        raise ConfigError(
            f"config: data.val_fraction = {cfg.val_fraction}: not available with {what} yet (its clients "
            "are views into shared arrays); set it to 0"
        )


def _as_given(cfg: DataConfig, dataset: str, held: str, set_in: str, normalised: str) -> None:
    """Refuse data keys that would rebuild a federation that ``dataset`` holds as it was written."""
    packed = {
        "tasks": cfg.tasks,
        "corrupt.enabled": cfg.corrupt.enabled,
        "concepts": cfg.concepts,
        "missing_modalities": cfg.missing_modalities,
        "input_shape": cfg.input_shape,
        "max_clients": cfg.max_clients,
    }
    for key, value in packed.items():
        if value:
            raise ConfigError(
                f"config: data.{key}: dataset {dataset!r} holds a federation as {held}; set it in the "
                f"config you {set_in}"
            )
    if cfg.normalize not in ("auto", "none"):
        raise ConfigError(f"config: data.normalize = {cfg.normalize!r}: {normalised}; use 'auto' or 'none'")


def _described(cfg: DataConfig, seed: int) -> FederatedData:
    """``dataset: federation``: the server's view of a federation whose samples are on the nodes."""
    from fedmtl.data.description import load_described

    _no_validation(cfg, "dataset 'federation'")
    _as_given(
        cfg,
        "federation",
        "split",
        "split ('fedmtl flower split')",
        "the nodes' files are normalised when split (federation.json says how)",
    )
    if cfg.holdout_clients:
        raise ConfigError(
            "config: data.holdout_clients: dataset 'federation' keeps every client's data on its node; "
            "new-client evaluation needs the held-out clients' data on the server"
        )
    data = load_described(_leaf_file(cfg, "federation"))
    data.info.update(seed=seed)
    return data


def _stored(cfg: DataConfig, seed: int) -> FederatedData:
    """``dataset: store``: a packed federation (``fedmtl pack``), memory-mapped."""
    from fedmtl.data.store import open_store  # imported on use, like the store itself

    _no_validation(cfg, "dataset 'store'")
    _as_given(
        cfg,
        "store",
        "packed",
        "pack ('fedmtl pack')",
        "a client store is normalised when packed (its meta.json says how)",
    )
    data = open_store(_leaf_file(cfg, "store"))
    data.holdout = _holdout(data.num_clients, cfg.holdout_clients, seed)
    data.info.update(seed=seed)
    return data


def _drop_modalities(
    clients: list[ClientData], dataset: str, missing: dict[int, list[str]]
) -> list[ClientData]:
    """Clients without some modalities: their columns zero-filled (the standardised mean) and their
    mask column set to 'missing', on train and test rows alike (``fedmtl.fdrmfl.data``'s layout)."""
    from fedmtl.fdrmfl.data import _LAYOUTS, MISSING  # the multi-modal layouts; imported on use

    key = "config: data.missing_modalities"
    layout = _LAYOUTS.get(dataset)
    if layout is None:
        raise ConfigError(
            f"{key}: dataset {dataset!r} has no modalities; allowed for {', '.join(sorted(_LAYOUTS))}"
        )
    for cid, names in missing.items():
        if not 0 <= cid < len(clients):
            raise ConfigError(f"{key}: client {cid} does not exist (clients 0..{len(clients) - 1})")
        unknown = sorted(set(names) - set(layout.names))
        if unknown:
            allowed = ", ".join(layout.names)
            raise ConfigError(f"{key}: client {cid}: unknown modality {unknown[0]!r}; allowed: {allowed}")
        if set(names) >= set(layout.names):
            raise ConfigError(f"{key}: client {cid} would hold no modality; keep at least one")
    for name in layout.names:
        if all(name in missing.get(c.cid, []) for c in clients):
            raise ConfigError(f"{key}: modality {name!r} is missing on every client")
    out = []
    for c in clients:
        gone = [j for j, m in enumerate(layout.names) if m in missing.get(c.cid, [])]
        if not gone:
            out.append(c)
            continue
        xs = []
        for x in (c.x_train, c.x_test):
            x = np.array(x, copy=True)
            for j in gone:
                m = layout.modalities[j]
                x[:, m.start : m.stop] = 0.0
                x[:, layout.mask_start + j] = MISSING
            xs.append(x)
        out.append(replace(c, x_train=xs[0], x_test=xs[1]))
    return out


def _holdout(n: int, k: int, seed: int) -> list[int]:
    """Clients kept out of training entirely (new-client evaluation); seeded."""
    if k == 0:
        return []
    if k >= n:
        raise ConfigError(f"config: data.holdout_clients = {k}: must be fewer than the {n} clients")
    return sorted(int(i) for i in _rng(seed, RNG_HOLDOUT_CLIENTS).choice(n, size=k, replace=False))


# ------------------------------------------------------------------------------------ listing


def _describe(spec: DatasetSpec, raw: Raw) -> dict[str, Any]:
    if isinstance(raw, Pooled):
        n = len(raw.y) + (0 if raw.y_test is None else len(raw.y_test))
        return {"samples": n, "tasks": None, "features": int(np.prod(raw.x.shape[1:]))}
    if isinstance(raw, ClientSplits):
        xs, ys = raw.x_train, list(raw.y_train) + list(raw.y_test)
    else:
        xs, ys = raw.xs, raw.ys
    return {
        "samples": int(sum(len(y) for y in ys)),
        "tasks": len(raw.names),
        "features": int(np.prod(xs[0].shape[1:])) if xs else 0,
    }


def normalize_note(spec: DatasetSpec) -> str:
    """What ``data.normalize: auto`` does to this dataset, for ``fedmtl datasets``."""
    if spec.name == "store":
        return "as packed (meta.json records it)"
    if spec.name == "federation":
        return "as the nodes' files hold it (federation.json records it)"
    if spec.load is not None or spec.name == "leaf":
        return "auto: vectors standardize, images (data.input_shape) channel, text none"
    shape = spec.input_shape
    mode = spec.auto or auto_normalize(shape is not None and len(shape) > 1, False)
    return f"auto: {mode} ({NORMALIZE_NOTES[mode]})"


def list_datasets(data_dir: str | None) -> list[dict[str, Any]]:
    """One row per registered dataset: name, kind, task, location and (when readable) its size.

    ``location`` is the file/folder found, ``embedded (scikit-learn)`` or ``missing: <path>``;
    an unreadable file keeps its path and adds ``error``.
    """
    rows: list[dict[str, Any]] = []
    root = resolve_data_dir(data_dir)
    for spec in REGISTRY.values():
        row: dict[str, Any] = {
            "name": spec.name,
            "kind": spec.kind,
            "task": spec.task,
            "found": False,
            "samples": None,
            "tasks": None,
            "features": None,
            "description": spec.description,
            "normalize": normalize_note(spec),
        }
        rows.append(row)
        if spec.name in _FILE_NEEDS:
            row["location"] = f"needs data.file ({_FILE_NEEDS[spec.name]})"
            continue
        if spec.load is not None:
            row["location"] = "registered reader (fedmtl.data.register_dataset)"
            continue
        paths = [root / f for f in spec.files] if root is not None else []
        missing = [p for p in paths if not p.is_file()]
        if spec.files and root is None:
            row["location"] = f"missing: {spec.files[0]} (no data directory; {HOW_TO_SET})"
            continue
        if missing:
            row["location"] = f"missing: {missing[0]}"
            continue
        row["location"] = (
            EMBEDDED if not spec.files else str(paths[0] if len(paths) == 1 else paths[0].parent)
        )
        try:
            row.update(_describe(spec, spec.read(paths)), found=True)
        except DataError as exc:
            row["error"] = str(exc)
    return rows


# ------------------------------------------------------------------------------------ extension


def register_dataset(
    name: str,
    load: Callable[[DataConfig], Raw] | None = None,
    *,
    kind: Literal["pooled", "natural"] = "natural",
    task: Literal["classification", "regression"] = "classification",
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    pixel_max: float = 1.0,
    description: str = "",
    replace: bool = False,
) -> Any:
    """Make ``data.dataset: <name>`` load with ``load(data_section)``; usable as a decorator.

    ``load`` gets the validated ``data:`` section (``dir``, ``file`` and the rest) and returns
    ``Pooled`` (one pool, split into clients by ``data.partition``; ``kind='pooled'``), ``Clients``
    (one sample set per client, split by ``data.test_fraction``) or ``ClientSplits`` (per-client
    train and test sets as given); both of the latter are ``kind='natural'``. Everything after
    loading (normalisation, input shape, tasks, corruption, hold-out clients) is as for the
    built-in datasets. Registering the same function again (a notebook cell run twice) replaces
    the earlier registration; another function under a taken name needs ``replace=True``."""

    def add(fn: Callable[[DataConfig], Raw]) -> Callable[[DataConfig], Raw]:
        known = REGISTRY.get(name)
        if known is not None and not replace and not same_definition(known.load, fn):
            raise ValueError(
                f"dataset {name!r} is already registered; pass replace=True to replace it (registered: "
                f"{described(known.load or known.read)})"
            )
        REGISTRY[name] = DatasetSpec(
            name,
            kind,
            task,
            (),
            tuple(input_shape) if input_shape is not None else None,
            _reads_through_load,
            description or f"registered by {getattr(fn, '__module__', '?')}.{getattr(fn, '__name__', '?')}",
            num_classes,
            pixel_max,
            load=fn,
        )
        return fn

    return add if load is None else add(load)
