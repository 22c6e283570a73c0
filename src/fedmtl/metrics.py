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
    """The metric used for 'best round' and the progress bar, and whether higher is better (a
    client with several tasks: its first task's, under that task's name: ``<task>.accuracy``)."""
    if task.is_multi:
        first = task.parts[0]
        metric, higher = primary_metric(first)
        return f"{first.name}{PART}{metric}", higher
    if task.dense:
        from fedmtl.fedbone.metrics import dense_primary

        return dense_primary(task)
    if task.kind == "multilabel":
        return "f1_micro", True
    return ("accuracy", True) if task.is_classification else ("rmse", False)


#: Separates a task's name from its metric in a multi-task client's row: ``ink.rmse``.
PART = "."


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


def multilabel_metrics(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Binary cross-entropy, subset accuracy, micro and macro F1 over the labels."""
    y = y.to(logits.dtype)
    loss = float(nn.functional.binary_cross_entropy_with_logits(logits, y)) if len(y) else float("nan")
    pred = (logits > 0).numpy()
    true = y.numpy() > 0.5
    tp = (pred & true).sum(0).astype(float)
    fp = (pred & ~true).sum(0).astype(float)
    fn = (~pred & true).sum(0).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        per = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    micro = 2 * tp.sum() / max(2 * tp.sum() + fp.sum() + fn.sum(), 1.0)
    return {
        "loss": loss,
        "subset_accuracy": float((pred == true).all(1).mean()) if len(y) else float("nan"),
        "f1_micro": float(micro),
        "f1_macro": float(per.mean()) if per.size else 0.0,
    }


def task_metrics(out: torch.Tensor, y: torch.Tensor, task: TaskSpec) -> dict[str, float]:
    if task.is_multi:  # each task on the samples labelled for it, under its name
        return multi_task_metrics(out, y, task)  # type: ignore[arg-type]
    if task.dense:  # per-pixel outputs (segmentation mIoU, map RMSE, PSNR)
        from fedmtl.fedbone.metrics import dense_metrics

        return dense_metrics(out, y, task)
    if task.kind == "multilabel":
        return multilabel_metrics(out, y)
    return classification_metrics(out, y) if task.is_classification else regression_metrics(out, y, task)


def multi_task_metrics(out: dict[str, torch.Tensor], y: torch.Tensor, task: TaskSpec) -> dict[str, float]:
    """Each task's metrics on its labelled samples, as ``<task>.<metric>``; ``loss``: the client's
    objective (the weighted sum of its task losses)."""
    from fedmtl.training.objectives import multi_task_loss

    metrics: dict[str, float] = {}
    col = 0
    for p in task.parts:
        target = y[:, col : col + p.columns]
        col += p.columns
        labelled = ~torch.isnan(target).all(1) if p.kind == "multilabel" else ~torch.isnan(target[:, 0])
        rows = labelled.nonzero().squeeze(1)
        part_y = target[rows] if p.kind == "multilabel" else target[rows, 0]
        if p.is_classification:
            part_y = part_y.long()
        elif p.kind == "multilabel":
            part_y = torch.nan_to_num(part_y)
        for k, v in task_metrics(out[p.name][rows], part_y, p).items():
            metrics[f"{p.name}{PART}{k}"] = v
    metrics["loss"] = float(multi_task_loss(out, y, task)) if len(y) else float("nan")
    return metrics


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


def lower_is_better(key: str) -> bool:
    """Whether a row's metric (``rmse``, ``shared_loss``, a task's ``ink.rmse``) is better lower."""
    base = key
    for prefix in ("shared_", "before_", "after_", "served_", "personal_", "val_"):
        base = base.removeprefix(prefix)
    return base.rpartition(PART)[2] in LOWER_IS_BETTER


def summarize_clients(rows: list[dict[str, float]]) -> dict[str, float]:
    """Flatten summaries of every numeric metric in ``rows`` into ``<metric>_<stat>`` keys."""
    out: dict[str, float] = {}
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, float) and k != "round"))
    for key in keys:
        stats = summarize([r[key] for r in rows if key in r], higher_is_better=not lower_is_better(key))
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


def per_task(row: dict[str, float], stat: str = "mean") -> dict[str, dict[str, float]]:
    """A round row's ``<task>.<metric>_<stat>`` values by task, then metric (clients with several
    tasks), or ``task_<task>_<metric>_mean`` (one task per client, several in the federation)."""
    out: dict[str, dict[str, float]] = {}
    suffix = f"_{stat}"
    for key, value in row.items():
        if not isinstance(value, float) or not key.endswith(suffix):
            continue
        name = key[: -len(suffix)]
        if PART in name and not name.startswith(("shared_", "val_", "new_", "before_", "after_")):
            task, _, metric = name.rpartition(PART)
            out.setdefault(task, {})[metric] = value
        elif name.startswith("task_") and stat == "mean":
            for metric in ("accuracy", "rmse", "r2", "gain", "miou", "psnr"):
                if name.endswith(f"_{metric}"):
                    out.setdefault(name[len("task_") : -len(metric) - 1], {})[metric] = value
    return out


def delta_m(values: dict[str, float], reference: dict[str, float], higher: dict[str, bool]) -> float:
    """Δm (Maninis et al. 2019, as FedBone reports it): the mean over tasks of each task's relative
    change of its metric against ``reference``, in %, signed so that higher is better."""
    terms = []
    for key, up in higher.items():
        rel = (values[key] - reference[key]) / abs(reference[key])
        terms.append(rel if up else -rel)
    return 100.0 * float(np.mean(terms))
