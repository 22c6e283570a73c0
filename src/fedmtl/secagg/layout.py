"""The flat vector a client's update becomes, and back: key order and shapes of the broadcast."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmtl.errors import ProtocolError
from fedmtl.training.tensors import Arrays


@dataclass(frozen=True)
class Layout:
    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @staticmethod
    def of(arrays: Arrays) -> Layout:
        keys = tuple(arrays)
        return Layout(
            keys, tuple(tuple(arrays[k].shape) for k in keys), tuple(str(arrays[k].dtype) for k in keys)
        )

    @property
    def size(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.shapes))

    def delta(self, new: Arrays, base: Arrays, who: str) -> np.ndarray:
        """``new - base`` over the layout's keys, flattened in float64."""
        if set(new) != set(self.keys):
            raise ProtocolError(
                f"secagg: {who}: update keys {sorted(new)} differ from the broadcast's {sorted(self.keys)}"
            )
        parts = []
        for k, shape in zip(self.keys, self.shapes, strict=True):
            if tuple(new[k].shape) != shape:
                raise ProtocolError(
                    f"secagg: {who}: {k!r} has shape {list(new[k].shape)}, expected {list(shape)}"
                )
            parts.append((np.asarray(new[k], np.float64) - np.asarray(base[k], np.float64)).ravel())
        return np.concatenate(parts) if parts else np.zeros(0)

    def apply(self, base: Arrays, flat: np.ndarray) -> Arrays:
        """``base + flat`` as named arrays of the broadcast's dtypes."""
        out: Arrays = {}
        i = 0
        for k, shape, dt in zip(self.keys, self.shapes, self.dtypes, strict=True):
            n = int(np.prod(shape))
            out[k] = (np.asarray(base[k], np.float64) + flat[i : i + n].reshape(shape)).astype(dt)
            i += n
        return out
