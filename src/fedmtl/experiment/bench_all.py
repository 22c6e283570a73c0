"""``fedmtl bench all``: every benchmark, one after another, each in its own process.

Tables are regenerated together on one commit (each names it). A full run writes into
``benchmarks/results``; ``--quick`` (short runs, a smoke test of every benchmark) writes into a
temporary folder unless ``--out`` names one, so quick tables never replace measured ones."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: benchmarks whose --out is a folder (they write several files); the others take a file
FOLDER_OUT = {"mocha", "throughput"}
#: run first: the cheap ones, so a broken benchmark shows early
FIRST = ("secagg", "scale", "mocha")
#: tables a benchmark writes in a second invocation (its own flags), besides its main table
EXTRA: dict[str, list[list[str]]] = {
    "fdrmfl": [["--sim-ablation", "--sims", f"fdrmfl_sim{i}"] for i in (1, 2, 3)],
}


def benchmarks(root: Path) -> list[str]:
    """Every ``benchmarks/NAME.py`` (helpers start with ``_``), cheap ones first."""
    names = sorted(p.stem for p in root.glob("*.py") if not p.stem.startswith("_"))
    return [n for n in FIRST if n in names] + [n for n in names if n not in FIRST]


def commands(root: Path, out: Path, quick: bool) -> list[list[str]]:
    cmds = []
    for name in benchmarks(root):
        target = out if name in FOLDER_OUT else out / f"{name}.md"
        for flags in [[], *EXTRA.get(name, [])]:
            cmds.append(
                [
                    sys.executable,
                    "-m",
                    "fedmtl.cli",
                    "bench",
                    name,
                    *(["--quick"] if quick else []),
                    *flags,
                    "--out",
                    str(target),
                ]
            )
    return cmds


def quick_out(name: str) -> Path:
    """Where ``fedmtl bench NAME --quick`` writes without ``--out``: a new temporary folder (a file
    in it for benchmarks that write one table)."""
    folder = Path(tempfile.mkdtemp(prefix=f"fedmtl-bench-{name}-quick-"))
    return folder if name in FOLDER_OUT else folder / f"{name}.md"


#: the measured line every full table carries (``_provenance.line``): its cores and wall time
_STAMP = re.compile(r"^Written by `(?P<cmd>[^`]+)`.*?(?P<cores>\d+) cores.*?(?P<min>[\d.]+) min wall", re.M)


def _summary(path: Path) -> str:
    """The first sentence of a benchmark's docstring."""
    text = path.read_text(encoding="utf-8")
    m = re.search(r'^"""(.+?)(?:\.\s|\n\n|""")', text, re.S)
    return " ".join(m.group(1).split()) if m else ""


def measured(root: Path, name: str) -> str:
    """How long the last full run took, from its table's provenance line (``41.2 min on 2 cores``)."""
    table = root / "results" / f"{name}.md"
    if not table.is_file():
        return "not measured yet"
    m = _STAMP.search(table.read_text(encoding="utf-8"))
    if m is None:
        return "not recorded"
    return (
        f"{float(m['min']):.0f} min on {m['cores']} cores"
        if float(m["min"]) >= 1
        else (f"{float(m['min']) * 60:.0f} s on {m['cores']} cores")
    )


def listing(root: Path) -> str:
    """``fedmtl bench --list``: every benchmark, how long its last full run took, what it measures."""
    names = benchmarks(root)
    rows = [(n, measured(root, n), _summary(root / f"{n}.py")) for n in names]
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    lines = [
        f"{'benchmark':<{w0}}  {'full run took':<{w1}}  what it measures",
        *(f"{n:<{w0}}  {t:<{w1}}  {d}" for n, t, d in rows),
    ]
    lines.append("(--quick: a smoke test of a few minutes or less, written to a temporary folder)")
    return "\n".join(lines)


def run_all(root: Path, quick: bool, out: Path | None = None) -> Path:
    folder = out or (Path(tempfile.mkdtemp(prefix="fedmtl-bench-quick-")) if quick else root / "results")
    folder.mkdir(parents=True, exist_ok=True)
    failed = []
    for cmd in commands(root, folder, quick):
        name = cmd[4]
        t0 = time.perf_counter()
        print(f"[bench all] {name} ...", flush=True)
        rc = subprocess.run(cmd, check=False).returncode
        print(
            f"[bench all] {name}: {'ok' if rc == 0 else f'exit {rc}'} in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        if rc != 0:
            failed.append(name)
    if failed:
        from fedmtl.errors import FedmtlError

        raise FedmtlError(f"bench all: {', '.join(failed)} failed; tables in {folder}")
    return folder
