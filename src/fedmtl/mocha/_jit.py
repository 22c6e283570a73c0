"""Numba when available, plain Python otherwise.

The SDCA inner loop is sequential per sample, so it is compiled rather than vectorised. Without
numba the very same functions run interpreted: identical results, only slower (a test compares the
two paths), so a missing compiler never changes a number."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

try:  # pragma: no cover - exercised by whichever environment runs the tests
    from numba import njit as _numba_njit

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    _numba_njit = None
    HAVE_NUMBA = False


def jit(func: F) -> F:
    """Compile ``func`` in nopython mode with an on-disk cache (first call compiles, later runs reuse)."""
    if _numba_njit is None:
        return func
    return _numba_njit(cache=True, nogil=True)(func)  # type: ignore[no-any-return]


def interpreted(func: Callable[..., Any]) -> Callable[..., Any]:
    """The plain-Python body of a jitted function (used to check both paths agree)."""
    return getattr(func, "py_func", func)
