"""The generated first line of every results table: which command, commit and machine made it.

A table is only as good as the code it describes: ``stamp`` puts that line under the table's title
when the benchmark writes it, so a reader can tell a stale table from a current one."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, check=False)
    return out.stdout.strip()


def line(bench: str, argv: list[str], started: float) -> str:
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    # the results folder changes as benchmarks write into it; the code is what must be committed
    changed = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    dirty = " (with uncommitted changes)" if changed else ""
    command = " ".join(["fedmtl bench", bench, *argv])
    return (
        f"Written by `{command}` on {time.strftime('%Y-%m-%d %H:%M')} at commit {commit}{dirty}; "
        f"{platform.machine()} machine, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"{(time.perf_counter() - started) / 60:.1f} min wall."
    )


def stamp(path: Path, bench: str, argv: list[str], started: float) -> Path:
    """Put the provenance line under the title of the table at ``path``."""
    text = Path(path).read_text()
    title, _, rest = text.partition("\n")
    Path(path).write_text(f"{title}\n\n{line(bench, argv, started)}\n{rest}")
    return Path(path)


def write_table(path: Path | str, lines: list[str], bench: str, argv: list[str], started: float) -> Path:
    """Write a benchmark's table (its lines, title first) and stamp it: what every benchmark ends with."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return stamp(path, bench, argv, started)
