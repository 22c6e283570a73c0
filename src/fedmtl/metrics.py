"""Per-client metrics and their summaries across clients.

Macro precision/recall/F1 are computed from a confusion matrix in numpy: sklearn's scorer costs
about a millisecond per call, which dominates a 1000-client evaluation round."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedmtl.data.federated import TaskSpec

SUMMARY_STATS = ("mean", "std", "worst10", "best10")


def primary_metric(task: TaskSpec) -> tuple[str, bool]:
    """The metric used for 'best round' and the progress bar, and whether higher is better."""
    if task.dense:
        from fedmtl.fedbone.metrics import dense_primary

        return dense_primary(task)
    return ("accuracy", True) if task.is_classification else ("rmse", False)


def classification_metrics(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    loss = float(nn.functional.cross_entropy(logits, y)) if len(y) else float("nan")
    pred = logits.argmax(1).numpy()
    true = y.numpy()
    k = int(max(logits.shape[1], true.max(initial=0) + 1))
    cm = np.bincount(true * k + pred, minlength=k * k).reshape(k, k)
    tp = np.diag(cm).astype(float)
    support = cm.sum(1)
    predicted = cm.sum(0)
    present = (support + predicted) > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        prec = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
        rec = np.where(support > 0, tp / np.maximum(support, 1), 0.0)
        f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0.0)
    return {
        "loss": loss,
        "accuracy": float(tp.sum() / max(len(true), 1)),
        "precision": float(prec[present].mean()) if present.any() else 0.0,
        "recall": float(rec[present].mean()) if present.any() else 0.0,
        "f1": float(f1[present].mean()) if present.any() else 0.0,
    }


def regression_metrics(out: torch.Tensor, y: torch.Tensor, task: TaskSpec) -> dict[str, float]:
    pred = out.reshape(y.shape).double()
    yd = y.double()
    mse = float(((pred - yd) ** 2).mean()) if len(y) else float("nan")
    var = float(((yd - yd.mean()) ** 2).mean()) if len(y) > 1 else 0.0
    return {
        "loss": mse,
        "rmse": float(np.sqrt(mse) * task.target_std),
        "r2": float(1 - mse / var) if var > 0 else 0.0,
    }


def task_metrics(out: torch.Tensor, y: torch.Tensor, task: TaskSpec) -> dict[str, float]:
    if task.dense:  # per-pixel outputs (segmentation mIoU, map RMSE, PSNR)
        from fedmtl.fedbone.metrics import dense_metrics

        return dense_metrics(out, y, task)
    return classification_metrics(out, y) if task.is_classification else regression_metrics(out, y, task)


def summarize(values: list[float], higher_is_better: bool = True) -> dict[str, float]:
    """Mean, std and the worst/best 10% tails (10th/90th percentile, flipped for lower-is-better)."""
    arr = np.asarray([v for v in values if v == v], dtype=float)
    if arr.size == 0:
        return {s: float("nan") for s in SUMMARY_STATS}
    lo, hi = np.percentile(arr, 10), np.percentile(arr, 90)
    worst, best = (lo, hi) if higher_is_better else (hi, lo)
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std()),
        "worst10": float(worst),
        "best10": float(best),
    }


LOWER_IS_BETTER = {"loss", "rmse"}


def summarize_clients(rows: list[dict[str, float]]) -> dict[str, float]:
    """Flatten summaries of every numeric metric in ``rows`` into ``<metric>_<stat>`` keys."""
    out: dict[str, float] = {}
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, float) and k != "round"))
    for key in keys:
        base = key
        for prefix in ("shared_", "before_", "after_", "served_", "personal_", "val_"):
            base = base.removeprefix(prefix)
        lower = base in LOWER_IS_BETTER
        stats = summarize([r[key] for r in rows if key in r], higher_is_better=not lower)
        out.update({f"{key}_{s}": v for s, v in stats.items()})
    for gain in ("gain", "personal_gain"):  # the share of clients what they use (or the personal
        if gain in keys:  # model, where another is served) did worse for than the shared model
            gains = [r[gain] for r in rows if gain in r]
            out[f"{gain}_negative_frac"] = float(np.mean([g < 0 for g in gains]))
    tasks = {r.get("task") for r in rows}
    if len(tasks) > 1:
        for task in sorted(t for t in tasks if t is not None):
            sub = [r for r in rows if r.get("task") == task]
            for key in ("accuracy", "rmse", "r2", "gain", "miou", "psnr"):
                vals = [r[key] for r in sub if key in r]
                if vals:
                    out[f"task_{task}_{key}_mean"] = float(np.mean(vals))
    return out
