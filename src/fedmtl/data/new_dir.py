"""A directory that appears complete or not at all: written beside its target, then renamed.

``fedmtl pack`` (a client store or LEAF data) and ``fedmtl flower split`` write folders a run or a
site reads later; a crash half-way must leave nothing that looks usable, and nothing is overwritten."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fedmtl.errors import DataError


def begin(out: Path, what: str) -> Path:
    """The temporary folder to write ``out`` into; ``out`` must not exist or be empty (``what``
    names it in the error, e.g. "client store")."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{what} {out}: already exists and is not empty; choose another path")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, out: Path) -> Path:
    """Put the finished folder in place (an empty ``out`` is replaced)."""
    os.replace(tmp, out)
    return out
