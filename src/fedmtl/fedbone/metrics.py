"""Metrics of the dense tasks: mIoU for segmentation, RMSE for maps, PSNR for image restoration.

All are computed over every pixel of a client's test split at once (dataset-level IoU, not a mean
of per-image IoUs), the convention of semantic-segmentation benchmarks."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from fedmtl.data.federated import TaskSpec

#: Primary metric and whether higher is better, per dense task.
PRIMARY: dict[str, tuple[str, bool]] = {
    "segment": ("miou", True),
    "edge": ("rmse", False),
    "denoise": ("psnr", True),
}


def miou(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean IoU over classes present in truth or prediction, pixel accuracy); logits (n, C, H, W)."""
    k = int(logits.shape[1])
    pred = logits.argmax(1).reshape(-1).numpy()
    true = y.reshape(-1).numpy().astype(np.int64)
    cm = np.bincount(true * k + pred, minlength=k * k).reshape(k, k)
    inter = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - inter
    present = union > 0
    iou = float((inter[present] / union[present]).mean()) if present.any() else float("nan")
    return iou, float(inter.sum() / max(len(true), 1))


def psnr(mse: float, peak: float = 1.0) -> float:
    return float("inf") if mse <= 0 else float(10.0 * math.log10(peak**2 / mse))


def dense_metrics(out: torch.Tensor, y: torch.Tensor, task: TaskSpec) -> dict[str, float]:
    """Metrics of one client's predictions ``out`` against targets ``y`` for a dense task."""
    if len(y) == 0:
        return {"loss": float("nan")}
    if task.is_classification:
        iou, acc = miou(out, y)
        return {"loss": float(nn.functional.cross_entropy(out, y)), "miou": iou, "pixel_accuracy": acc}
    pred = out.reshape(y.shape).double()
    mse = float(((pred - y.double()) ** 2).mean())
    row = {"loss": mse, "rmse": math.sqrt(mse)}
    if task.dense == "denoise":
        row["psnr"] = psnr(mse)
    return row


def dense_primary(task: TaskSpec) -> tuple[str, bool]:
    if task.dense in PRIMARY:
        return PRIMARY[task.dense]
    return ("miou", True) if task.is_classification else ("rmse", False)
