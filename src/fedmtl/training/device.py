"""Where local training and evaluation compute: ``runtime.device`` (cpu, cuda, auto).

Data, client states and messages stay numpy arrays on the host; the training and prediction code
moves what a computation needs to the device and brings results back. The device is a context
(``using``) set around a run's rounds and evaluations, so algorithms, executors and features need
no device argument. On the CPU every conversion is a no-op and the numbers are those of a run
without this module; the hand-written fused MLP step and oneDNN routing are CPU code, so a CUDA
run trains batched clients with the generic vmapped step."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from fedmtl.errors import ConfigError

CPU = torch.device("cpu")
_CURRENT: ContextVar[torch.device] = ContextVar("fedmtl_device", default=CPU)


def current() -> torch.device:
    return _CURRENT.get()


def on_cpu() -> bool:
    return _CURRENT.get().type == "cpu"


@contextmanager
def using(device: torch.device) -> Iterator[None]:
    token = _CURRENT.set(device)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def resolve(name: str) -> torch.device:
    """``runtime.device`` as a torch device: ``auto`` is CUDA where one is present, else the CPU."""
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else CPU
    if name == "cpu":
        return CPU
    if not torch.cuda.is_available():
        raise ConfigError(
            f"config: runtime.device = {name!r}: this machine has no CUDA device that torch can use "
            "(torch.cuda.is_available() is False); use 'cpu' or 'auto'"
        )
    dev = torch.device(name)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(
            f"config: runtime.device = {name!r}: only {torch.cuda.device_count()} CUDA device(s) present"
        )
    return dev


def to_device(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the current device (itself on the CPU)."""
    dev = _CURRENT.get()
    return t if dev.type == "cpu" else t.to(dev, non_blocking=True)


def to_host(t: torch.Tensor) -> torch.Tensor:
    return t if t.device.type == "cpu" else t.cpu()
