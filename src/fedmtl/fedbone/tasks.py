"""Dense tasks derived from MNIST, so client groups learn different things from the same input kind.

FedBone's setting is heterogeneous *dense* tasks over one input domain (NYUDv2: segmentation, depth,
edges, ...). On a CPU budget the same structure comes from MNIST: each client keeps its images and
derives one task from them, locally:

- ``digit``: 10-way classification of the image (accuracy);
- ``segment``: foreground mask, pixel > 0.5 is class 1 (per-pixel cross-entropy; mIoU);
- ``edge``: Sobel gradient magnitude of the image, scaled to [0, 1] (dense regression; RMSE);
- ``denoise``: the input is the image plus seeded Gaussian noise, the target the clean image
  (image-to-image regression; RMSE and PSNR).

Targets of the dense tasks stay in pixel units (no standardisation), so RMSE and PSNR read as
usual for [0, 1] images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedmtl.data.federated import ClientData, TaskSpec
from fedmtl.errors import ConfigError

#: Foreground threshold (pixels in [0, 1]).
FOREGROUND = 0.5
#: Standard deviation of the denoising task's input noise (pixels in [0, 1]).
NOISE_STD = 0.3
#: Sobel magnitudes are divided by this and clipped to [0, 1] (a full-contrast step edge gives 4).
EDGE_SCALE = 4.0
RNG_NOISE = 41  # rng purpose for the denoising noise; fixed so old seeds stay valid


class MapOutputs(int):
    """An output count that also says the output is a per-pixel map (channels), not a vector.

    Models are built from ``(input_shape, num_outputs)`` alone; carrying the layout inside the int
    lets a model pick a dense decoder or a pooled classifier without widening that interface, while
    every other use of ``num_outputs`` sees a plain int."""

    dense = True

    def __new__(cls, value: int) -> MapOutputs:
        return super().__new__(cls, value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (MapOutputs, (int(self),))


def is_map(num_outputs: int) -> bool:
    return bool(getattr(num_outputs, "dense", False))


@dataclass(frozen=True)
class DenseTask:
    name: str
    spec: TaskSpec
    description: str
    metrics: tuple[str, ...]


TASKS: dict[str, DenseTask] = {
    t.name: t
    for t in (
        DenseTask("digit", TaskSpec("classification", 10, "digit"), "10-way digit class", ("accuracy",)),
        DenseTask(
            "segment",
            TaskSpec("classification", MapOutputs(2), "segment", dense="segment"),
            f"foreground mask (pixel > {FOREGROUND})",
            ("miou", "pixel_accuracy"),
        ),
        DenseTask(
            "edge",
            TaskSpec("regression", MapOutputs(1), "edge", dense="edge"),
            "Sobel gradient magnitude map",
            ("rmse",),
        ),
        DenseTask(
            "denoise",
            TaskSpec("regression", MapOutputs(1), "denoise", dense="denoise"),
            f"clean image from the image plus N(0, {NOISE_STD}^2) noise",
            ("rmse", "psnr"),
        ),
    )
}
DEFAULT_TASKS = ("digit", "segment", "edge", "denoise")


def foreground(x: np.ndarray) -> np.ndarray:
    """(n, 1, H, W) images in [0, 1] -> (n, H, W) int64 masks."""
    return (x[:, 0] > FOREGROUND).astype(np.int64)


def sobel_magnitude(x: np.ndarray) -> np.ndarray:
    """(n, 1, H, W) images -> (n, 1, H, W) float32 edge maps in [0, 1] (zero padding)."""
    img = np.pad(x[:, 0].astype(np.float32), ((0, 0), (1, 1), (1, 1)))
    h, w = x.shape[2], x.shape[3]

    def at(dy: int, dx: int) -> np.ndarray:
        return img[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    mag = np.sqrt(gx**2 + gy**2) / EDGE_SCALE
    return np.clip(mag, 0.0, 1.0)[:, None].astype(np.float32)


def noisy(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (x + rng.normal(0.0, NOISE_STD, size=x.shape)).astype(np.float32)


def derive(
    name: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(input, target) of task ``name`` from images ``x`` in [0, 1] and digit labels ``y``."""
    if name == "digit":
        return x, y.astype(np.int64)
    if name == "segment":
        return x, foreground(x)
    if name == "edge":
        return x, sobel_magnitude(x)
    if name == "denoise":
        return noisy(x, rng), x.astype(np.float32)
    raise ConfigError(f"config: data.tasks: unknown dense task {name!r}; allowed: {', '.join(TASKS)}")


def check_tasks(names: Sequence[str] | None) -> list[str]:
    names = list(names) if names else list(DEFAULT_TASKS)
    for n in names:
        if n not in TASKS:
            raise ConfigError(
                f"config: data.tasks = {names!r}: unknown task {n!r} for mnist_dense; "
                f"allowed: {', '.join(TASKS)}"
            )
    return names


def assign_dense_tasks(
    clients: list[ClientData], names: Sequence[str] | None, seed: int
) -> tuple[list[ClientData], dict[str, Any]]:
    """Client ``c`` learns ``names[c % len(names)]``; its own data is turned into that task locally.

    The denoising noise is drawn per client from (seed, purpose, client id), so a seed fixes it."""
    names = check_tasks(names)
    out = []
    for c in clients:
        task = TASKS[names[c.cid % len(names)]]
        rng = np.random.default_rng([seed, RNG_NOISE, c.cid])
        x_tr, y_tr = derive(task.name, c.x_train, c.y_train, rng)
        x_te, y_te = derive(task.name, c.x_test, c.y_test, rng)
        out.append(replace(c, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, task=task.spec))
    info = {"tasks": {n: sum(c.task.name == n for c in out) for n in dict.fromkeys(names)}}
    return out, info
