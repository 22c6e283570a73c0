"""Anomaly detectors on score vectors, fitted with scikit-learn and shipped as plain arrays.

A fitted detector is a dict of numpy arrays (``Arrays``), so the server can send it to clients in
a ``Message`` (and Flower records) and a client can keep one in its state; ``decision`` evaluates
it with numpy and equals scikit-learn's ``decision_function`` (tested). Positive decision values
are inliers, negative ones are flagged. Features are standardised with the fitting vectors'
mean and deviation first (the detectors' RBF width and split points then mean the same thing
whatever the scale of the losses)."""

from __future__ import annotations

import math

import numpy as np

from fedmtl.training.tensors import Arrays

OCSVM, IFOREST = 1.0, 2.0


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    return (x - mean) / std, mean, std


def fit_ocsvm(x: np.ndarray, nu: float) -> Arrays:
    """sklearn ``OneClassSVM(nu=nu)`` with its defaults (RBF, gamma='scale') on standardised x."""
    from sklearn.svm import OneClassSVM

    z, mean, std = _standardise(np.asarray(x, dtype=np.float64))
    svm = OneClassSVM(nu=nu).fit(z)
    return {
        "kind": np.array([OCSVM]),
        "mean": mean,
        "std": std,
        "sv": np.asarray(svm.support_vectors_, dtype=np.float64),
        "coef": np.asarray(svm.dual_coef_, dtype=np.float64).ravel(),
        "intercept": np.asarray(svm.intercept_, dtype=np.float64).ravel(),
        "gamma": np.array([float(svm._gamma)]),
    }


def _avg_path_length(n: np.ndarray) -> np.ndarray:
    """Expected path length of an unsuccessful search in a BST of n nodes (the iForest norm)."""
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


def fit_iforest(x: np.ndarray, contamination: float, n_estimators: int | None, seed: int) -> Arrays:
    """sklearn ``IsolationForest(contamination, n_estimators=ceil(sqrt(n)))``, flattened to arrays.

    Every tree's nodes go into shared arrays (child indices made global); a leaf stores its path
    length (depth plus the expected remaining length for the samples it holds)."""
    from sklearn.ensemble import IsolationForest

    z, mean, std = _standardise(np.asarray(x, dtype=np.float64))
    trees = n_estimators or max(1, math.ceil(math.sqrt(len(z))))
    forest = IsolationForest(
        n_estimators=trees, contamination=contamination, max_features=1.0, random_state=seed
    ).fit(z)
    feats, thr, left, right, value, roots = [], [], [], [], [], []
    base = 0
    for est in forest.estimators_:
        t = est.tree_
        leaf = t.children_left == -1
        roots.append(base)
        feats.append(np.where(leaf, 0, t.feature))
        thr.append(t.threshold)
        left.append(np.where(leaf, -1, t.children_left + base))
        right.append(np.where(leaf, -1, t.children_right + base))
        value.append(t.compute_node_depths() + _avg_path_length(t.n_node_samples) - 1.0)
        base += t.node_count
    return {
        "kind": np.array([IFOREST]),
        "mean": mean,
        "std": std,
        "feature": np.concatenate(feats).astype(np.int64),
        "threshold": np.concatenate(thr).astype(np.float64),
        "left": np.concatenate(left).astype(np.int64),
        "right": np.concatenate(right).astype(np.int64),
        "value": np.concatenate(value).astype(np.float64),
        "roots": np.asarray(roots, dtype=np.int64),
        "norm": _avg_path_length(np.array([forest.max_samples_])),
        "offset": np.array([float(forest.offset_)]),
    }


def decision(det: Arrays, x: np.ndarray) -> np.ndarray:
    """Inlier score of each row of ``x`` (negative: flagged); sklearn's ``decision_function``."""
    z = (np.asarray(x, dtype=np.float64) - det["mean"]) / det["std"]
    kind = float(det["kind"][0])
    if kind == OCSVM:
        sq = (z * z).sum(1)[:, None] + (det["sv"] ** 2).sum(1)[None, :] - 2.0 * z @ det["sv"].T
        k = np.exp(-float(det["gamma"][0]) * np.maximum(sq, 0.0))
        return k @ det["coef"] + float(det["intercept"][0])
    if kind == IFOREST:
        # sklearn's trees compare float32 inputs with float64 thresholds.
        z32 = z.astype(np.float32).astype(np.float64)
        node = np.broadcast_to(det["roots"], (len(z), len(det["roots"]))).copy()
        rows = np.arange(len(z))[:, None]
        while True:
            inner = det["left"][node] != -1
            if not inner.any():
                break
            go_left = z32[rows, det["feature"][node]] <= det["threshold"][node]
            nxt = np.where(go_left, det["left"][node], det["right"][node])
            node = np.where(inner, nxt, node)
        depth = det["value"][node].sum(1)
        denom = len(det["roots"]) * float(det["norm"][0])
        scores = 2.0 ** (-(depth / denom)) if denom > 0 else np.ones(len(z))
        return -scores - float(det["offset"][0])
    raise ValueError(f"unknown detector kind {kind}")


def fit(
    method: str, x: np.ndarray, nu: float, contamination: float, n_estimators: int | None, seed: int
) -> Arrays:
    if method == "ocsvm":
        return fit_ocsvm(x, nu)
    if method == "iforest":
        return fit_iforest(x, contamination, n_estimators, seed)
    raise ValueError(f"no detector named {method!r}")
