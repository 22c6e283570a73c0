"""Multi-modal regression data for FDRMFL, carried through fedmtl's single-array ``ClientData``.

How a multi-modal sample travels: one flat float32 row per sample,

    x = [ modality 1 (flattened) | modality 2 | ... | mask column per modality ]

and a ``Layout`` (names, kinds, shapes, column slices) that says how to cut the row back into
modalities. The layout is looked up by dataset name (``layout_for``), because the loader's
``TaskSpec`` carries the dataset name and nothing else; ``FederatedData.info["modalities"]`` holds
the same layout as plain data for users and run records.

Missing modalities: a client that lacks modality m has its mask column at -1 (present: +1) and its
modality columns filled with 0. The model decides "present" as ``mask >= 0``: any standardisation
``(v - mean) / std`` with ``std > 0`` keeps +1 at or above zero and -1 below, and a column that is
+1 everywhere standardises to exactly 0, so the rule holds whether or not the loader standardises
the mask columns (``fedmtl run`` does, ``federate`` here does not). A modality missing everywhere is
refused (``DataError``): there would be nothing to learn from and the sign rule would break.

Datasets (every random draw is seeded):
- ``diabetes_mm``: scikit-learn diabetes, clinical {age, sex, bmi, bp} vs blood serum {s1..s6}.
- ``fdrmfl_sim1..3``: the FDRMFL paper's simulated functions of an image (3x32x32), a sequence
  (10 steps x 50 channels) and a vector (32), all N(0, 1); with S the sum of every 10th element of
  each modality, f1 = tanh(0.05 S), f2 = softplus(0.1 S + 1e-4 S_img S_seq), f3 = 8 sech(0.02 S).

Client splits (``split_clients``): ``iid``; ``target`` (non-IID by target quantile: samples sorted by
y, plus seeded noise, cut into contiguous groups) and ``covariate`` (the same on the first principal
component of the inputs: covariate shift). ``federate`` builds a ``FederatedData`` with those splits,
per-client missing modalities and scalers fitted on client training rows only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import numpy as np

from fedmtl.data import partition
from fedmtl.data.federated import ClientData, FederatedData, TaskSpec
from fedmtl.errors import ConfigError, DataError

Kind = Literal["vector", "sequence", "image"]
KINDS: tuple[str, ...] = ("vector", "sequence", "image")
PRESENT, MISSING = 1.0, -1.0
SIM_SEED = 20251202  # the registered simulated datasets are fixed data; run seeds only split them
SIM_SAMPLES = 2500  # 2000 train + 500 test in the paper's notebooks
DIABETES_CLINICAL = ("age", "sex", "bmi", "bp")
DIABETES_SERUM = ("s1", "s2", "s3", "s4", "s5", "s6")


@dataclass(frozen=True)
class Modality:
    """One modality's place in the flat row. Shapes: vector (d,), sequence (steps, channels) or
    (steps,), image (channels, height, width)."""

    name: str
    kind: Kind
    shape: tuple[int, ...]
    start: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def stop(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class Layout:
    modalities: tuple[Modality, ...]

    @staticmethod
    def of(specs: list[tuple[str, Kind, tuple[int, ...]]]) -> Layout:
        mods, start = [], 0
        for name, kind, shape in specs:
            if kind not in KINDS:
                raise ConfigError(f"modality {name!r}: kind = {kind!r}: allowed: {', '.join(KINDS)}")
            mods.append(Modality(name, kind, tuple(int(s) for s in shape), start))
            start += mods[-1].size
        if len({m.name for m in mods}) != len(mods):
            raise ConfigError("modality names must be unique")
        return Layout(tuple(mods))

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.modalities]

    @property
    def num(self) -> int:
        return len(self.modalities)

    @property
    def mask_start(self) -> int:
        return self.modalities[-1].stop

    @property
    def width(self) -> int:
        """Columns of the flat row: every modality plus one mask column each."""
        return self.mask_start + self.num

    def pack(self, parts: dict[str, np.ndarray], present: np.ndarray | None = None) -> np.ndarray:
        """Flatten modalities (each (n, *shape)) into rows; ``present`` is (n, M) bool (all True by
        default). Missing modalities are zero-filled, whatever ``parts`` held there."""
        n = len(next(iter(parts.values())))
        present = np.ones((n, self.num), bool) if present is None else np.asarray(present, bool)
        out = np.zeros((n, self.width), np.float64)
        for j, m in enumerate(self.modalities):
            block = np.asarray(parts[m.name], np.float64).reshape(n, m.size)
            out[:, m.start : m.stop] = np.where(present[:, j : j + 1], block, 0.0)
        out[:, self.mask_start :] = np.where(present, PRESENT, MISSING)
        return out

    def present(self, x: np.ndarray) -> np.ndarray:
        """(n, M) bool: which modalities each row has (the sign rule in the module docstring)."""
        return np.asarray(x)[:, self.mask_start : self.width] >= 0

    def to_dict(self) -> list[dict[str, Any]]:
        return [
            {"name": m.name, "kind": m.kind, "shape": list(m.shape), "columns": [m.start, m.stop]}
            for m in self.modalities
        ] + [{"name": "mask", "kind": "mask", "shape": [self.num], "columns": [self.mask_start, self.width]}]


# ------------------------------------------------------------------------------------ generators


def diabetes_modalities() -> tuple[dict[str, np.ndarray], np.ndarray, Layout]:
    """The 442 patients, raw units (scalers are fitted later on training rows only)."""
    from sklearn.datasets import load_diabetes

    d = load_diabetes(scaled=False)
    x = np.asarray(d.data, np.float64)
    layout = Layout.of([("clinical", "vector", (4,)), ("serum", "vector", (6,))])
    return {"clinical": x[:, :4], "serum": x[:, 4:]}, np.asarray(d.target, np.float64), layout


def simulate(
    fn: int,
    n: int,
    seed: int,
    image_shape: tuple[int, int, int] = (3, 32, 32),
    seq_shape: tuple[int, int] = (10, 50),
    vector_dim: int = 32,
    noise: float = 0.0,
) -> tuple[dict[str, np.ndarray], np.ndarray, Layout]:
    """The paper's simulated functions f1..f3 (spec section 5); ``noise`` adds N(0, noise^2) to y."""
    if fn not in (1, 2, 3):
        raise ConfigError(f"fdrmfl simulation: fn = {fn!r}: allowed: 1, 2, 3")
    rng = np.random.default_rng([seed, 0])  # the same inputs for f1, f2 and f3
    parts = {
        "image": rng.standard_normal((n, *image_shape)),
        "sequence": rng.standard_normal((n, *seq_shape)),
        "vector": rng.standard_normal((n, vector_dim)),
    }
    sums = {k: v.reshape(n, -1)[:, ::10].sum(1) for k, v in parts.items()}
    s = sums["image"] + sums["sequence"] + sums["vector"]
    if fn == 1:
        y = np.tanh(0.05 * s)
    elif fn == 2:
        y = np.logaddexp(0.0, 0.1 * s + 1e-4 * sums["image"] * sums["sequence"])  # softplus
    else:
        y = 8.0 / np.cosh(0.02 * s)
    if noise > 0:
        y = y + noise * np.random.default_rng([seed, fn]).standard_normal(n)
    layout = Layout.of(
        [
            ("image", "image", image_shape),
            ("sequence", "sequence", seq_shape),
            ("vector", "vector", (vector_dim,)),
        ]
    )
    return parts, y, layout


def _sim(fn: int) -> tuple[dict[str, np.ndarray], np.ndarray, Layout]:
    return simulate(fn, SIM_SAMPLES, SIM_SEED)


SOURCES = {
    "diabetes_mm": diabetes_modalities,
    "fdrmfl_sim1": lambda: _sim(1),
    "fdrmfl_sim2": lambda: _sim(2),
    "fdrmfl_sim3": lambda: _sim(3),
}
_LAYOUTS: dict[str, Layout] = {
    "diabetes_mm": Layout.of([("clinical", "vector", (4,)), ("serum", "vector", (6,))]),
    **{
        f"fdrmfl_sim{i}": Layout.of(
            [("image", "image", (3, 32, 32)), ("sequence", "sequence", (10, 50)), ("vector", "vector", (32,))]
        )
        for i in (1, 2, 3)
    },
}


def register_layout(name: str, layout: Layout) -> None:
    """Make ``layout`` known under a dataset/task name (``federate`` does this for its data)."""
    _LAYOUTS[name] = layout


def layout_for(name: str) -> Layout:
    if name not in _LAYOUTS:
        raise ConfigError(
            f"config: data.dataset = {name!r}: algorithm 'fdrmfl' needs a multi-modal dataset; "
            f"available: {', '.join(sorted(_LAYOUTS))}"
        )
    return _LAYOUTS[name]


@lru_cache(maxsize=4)
def pooled(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Flat rows (all modalities present) and targets: the reader behind the registered datasets."""
    parts, y, layout = SOURCES[name]()
    x = layout.pack(parts)
    x.flags.writeable = y.flags.writeable = False  # shared by every load through the cache
    return x, y


# ------------------------------------------------------------------------------------ splits

Split = Literal["iid", "target", "covariate"]
SPLITS: tuple[str, ...] = ("iid", "target", "covariate")


def first_component(parts: dict[str, np.ndarray]) -> np.ndarray:
    """Score along the first principal direction of the standardised, concatenated modalities (by
    SVD, whose sign the committed FDRMFL benchmark splits follow; ``partition.first_component``
    is the general, sign-fixed version ``data.partition.kind: covariate`` uses)."""
    x = np.concatenate([v.reshape(len(v), -1) for v in parts.values()], axis=1)
    x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    return x @ vt[0]


def split_clients(
    kind: str,
    num_clients: int,
    y: np.ndarray,
    covariate: np.ndarray | None,
    rng: np.random.Generator,
    noise: float = 0.25,
) -> list[np.ndarray]:
    """Sample indices per client. Non-IID splits sort by the score (y or the covariate) plus
    ``noise`` standard deviations of seeded jitter and cut contiguous, equal-sized groups, so clients
    see different ranges of the target (``target``) or of the inputs (``covariate``)."""
    n = len(y)
    if kind not in SPLITS:
        raise ConfigError(f"fdrmfl data: split = {kind!r}: allowed: {', '.join(SPLITS)}")
    if num_clients < 1 or num_clients > n // 4:
        raise ConfigError(f"fdrmfl data: num_clients = {num_clients}: allowed 1..{n // 4} for {n} samples")
    if kind == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), num_clients)]
    source = y if kind == "target" else covariate
    if source is None or len(source) != n:
        raise ConfigError("fdrmfl data: split = 'covariate' needs a covariate score per sample")
    return partition.sorted_groups(source, num_clients, noise, rng)


def _standardiser(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = rows.mean(0) if len(rows) else np.zeros(rows.shape[1])
    std = rows.std(0) if len(rows) else np.ones(rows.shape[1])
    return mean, np.where(std > 1e-12, std, 1.0)


def federate(
    name: str,
    parts: dict[str, np.ndarray],
    y: np.ndarray,
    layout: Layout,
    num_clients: int = 3,
    split: str = "iid",
    seed: int = 0,
    test_fraction: float = 0.2,
    missing: dict[int, list[str]] | None = None,
    noise: float = 0.25,
) -> FederatedData:
    """Clients with their own train/test split; scalers (per modality column, and the target) are
    fitted on the pooled *training* rows of present modalities only, so no test value shapes the
    inputs. ``missing`` maps a client id to the modalities it lacks (train and test alike)."""
    missing = missing or {}
    for cid, names in missing.items():
        unknown = sorted(set(names) - set(layout.names))
        if unknown:
            raise ConfigError(f"fdrmfl data: missing[{cid}] = {unknown}: allowed modalities {layout.names}")
        if set(names) >= set(layout.names):
            raise DataError(f"fdrmfl data: client {cid} would have no modality at all")
    if all(m in missing.get(c, []) for m in layout.names for c in range(num_clients)):
        raise DataError("fdrmfl data: every client misses every modality")
    rng = np.random.default_rng([seed, 9, 1])
    cov = first_component(parts) if split == "covariate" else None
    groups = split_clients(split, num_clients, y, cov, rng, noise)
    flat = layout.pack(parts)
    splits = []
    for cid, idx in enumerate(groups):
        perm = np.random.default_rng([seed, 9, 2, cid]).permutation(idx)
        n_test = max(1, int(round(test_fraction * len(idx))))
        te, tr = np.sort(perm[:n_test]), np.sort(perm[n_test:])
        pres = np.array([m not in missing.get(cid, []) for m in layout.names])
        splits.append((cid, tr, te, pres))
    # Scalers from training rows of clients that hold each modality.
    mean = np.zeros(layout.mask_start)
    std = np.ones(layout.mask_start)
    for j, m in enumerate(layout.modalities):
        rows = [flat[tr, m.start : m.stop] for _, tr, _, p in splits if p[j]]
        if not rows:
            raise DataError(f"fdrmfl data: modality {m.name!r} is missing on every client")
        mean[m.start : m.stop], std[m.start : m.stop] = _standardiser(np.concatenate(rows))
    y_train = np.concatenate([y[tr] for _, tr, _, _ in splits])
    ymean, ystd = float(y_train.mean()), float(y_train.std() or 1.0)
    task = TaskSpec("regression", 1, name, ymean, ystd)

    def rows(idx: np.ndarray, pres: np.ndarray) -> np.ndarray:
        out = flat[idx].copy()
        out[:, : layout.mask_start] = (out[:, : layout.mask_start] - mean) / std
        for j, m in enumerate(layout.modalities):
            if not pres[j]:
                out[:, m.start : m.stop] = 0.0
                out[:, layout.mask_start + j] = MISSING
        return out.astype(np.float32)

    clients = [
        ClientData(
            cid,
            rows(tr, p),
            ((y[tr] - ymean) / ystd).astype(np.float32),
            rows(te, p),
            ((y[te] - ymean) / ystd).astype(np.float32),
            task,
            f"client_{cid:03d}",
        )
        for cid, tr, te, p in splits
    ]
    register_layout(name, layout)
    info = {
        "modalities": layout.to_dict(),
        "split": split,
        "missing": {int(k): list(v) for k, v in missing.items()},
        "seed": seed,
        "normalized": True,
        "test_fraction": test_fraction,
    }
    return FederatedData(name, clients, (layout.width,), task, source="fedmtl.fdrmfl", info=info)


def load(
    dataset: str,
    num_clients: int = 3,
    split: str = "iid",
    seed: int = 0,
    test_fraction: float = 0.2,
    missing: dict[int, list[str]] | None = None,
) -> FederatedData:
    """``federate`` on a named source (``diabetes_mm``, ``fdrmfl_sim1..3``)."""
    if dataset not in SOURCES:
        raise ConfigError(f"fdrmfl data: dataset = {dataset!r}: allowed: {', '.join(SOURCES)}")
    parts, y, layout = SOURCES[dataset]()
    return federate(dataset, parts, y, layout, num_clients, split, seed, test_fraction, missing)
