"""Numba when available, plain Python otherwise.

The SDCA inner loop is sequential per sample, so it is compiled rather than vectorised. numba is an
extra (``mocha``): the MOCHA algorithm refuses to start without it (``require``), while the very
same functions run interpreted for a test that compares the two paths: identical results, only
slower, so the compiler never changes a number."""

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


def require() -> None:
    """MOCHA's solver is compiled: without numba, one line naming the extra that brings it."""
    if not HAVE_NUMBA:
        from fedmtl.errors import ConfigError

        raise ConfigError(
            "config: algorithm.name = 'mocha' needs numba for its compiled solver; install it with "
            "pip install numba (the fedmtl extra 'mocha': pip install '.[mocha]' in a clone)"
        )


def jit(func: F) -> F:
    """Compile ``func`` in nopython mode with an on-disk cache (first call compiles, later runs reuse)."""
    if _numba_njit is None:
        return func
    return _numba_njit(cache=True, nogil=True)(func)  # type: ignore[no-any-return]


def interpreted(func: Callable[..., Any]) -> Callable[..., Any]:
    """The plain-Python body of a jitted function (used to check both paths agree)."""
    return getattr(func, "py_func", func)
