"""Where the real dataset files live: an explicit setting, ``FEDMTL_DATA``, or ``../shared/data``.

Development and CI machines keep the data next to the repository (``../shared/data``); users point
at their own copy with ``data.dir`` / ``--data-dir`` or the environment variable.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedmtl.errors import DataError

ENV_VAR = "FEDMTL_DATA"
HOW_TO_SET = "set data.dir, --data-dir or FEDMTL_DATA"
# src/fedmtl/data/paths.py -> parents[3] is the repository root (the folder holding src/).
REPO_ROOT = Path(__file__).resolve().parents[3]


def default_candidates() -> list[Path]:
    """The ``../shared/data`` locations tried when nothing is set, in order."""
    rel = Path("..") / "shared" / "data"
    return [Path.cwd() / rel, REPO_ROOT / rel]


def _checked(value: str, origin: str) -> Path:
    p = Path(value).expanduser()
    if not p.is_dir():
        raise DataError(f"data directory {p} (from {origin}) does not exist or is not a directory")
    return p.resolve()


def resolve_data_dir(explicit: str | None, origin: str = "data.dir / --data-dir") -> Path | None:
    """Return the data folder, or None when no setting is given and no default folder exists.

    A folder that was asked for explicitly (argument or ``FEDMTL_DATA``) but is absent is an error,
    so a typo is never silently replaced by the default copy.
    """
    if explicit:
        return _checked(explicit, origin)
    env = os.environ.get(ENV_VAR)
    if env:
        return _checked(env, f"environment variable {ENV_VAR}")
    for cand in default_candidates():
        if cand.is_dir():
            return cand.resolve()
    return None
