"""fedmtl installs like any Python package: a wheel builds from a clone, installs into a fresh
virtual environment and puts a working ``fedmtl`` on its PATH. Nothing is downloaded: the build uses
this environment's setuptools and the fresh environment reuses this one's dependencies."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _clone(dest: Path) -> Path:
    """The files a clone has (tracked, plus new files git does not ignore)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for rel in listed:
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _run(*cmd: str | Path, cwd: Path | None = None, env: dict | None = None) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, env=env)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc.stdout


@pytest.mark.slow
def test_a_wheel_from_a_clone_installs_into_a_fresh_venv_and_runs(tmp_path):
    clone = _clone(tmp_path / "clone")
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", dist, clone)  # fmt: skip
    wheel = next(dist.glob("fedmtl-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
        meta = z.read(next(n for n in names if n.endswith("/METADATA"))).decode()
    assert "fedmtl/cli.py" in names and "fedmtl = fedmtl.cli:main" in entry
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    numba = [ln for ln in meta.splitlines() if ln.startswith("Requires-Dist: numba")]
    assert numba and all("extra ==" in ln for ln in numba)  # only for the extra that needs it

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    # this environment's packages after the fresh one's, as plain path entries (their .pth files,
    # such as this checkout's editable fedmtl, are not processed)
    (site / "zz_reuse_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    where = _run(python, "-c", "import fedmtl; print(fedmtl.__file__)", cwd=work, env=env)
    assert Path(where.strip()).is_relative_to(venv)  # the installed copy, not this checkout
    fedmtl_bin = shutil.which("fedmtl", path=env["PATH"])
    assert fedmtl_bin is not None and Path(fedmtl_bin).parent == bin_dir
    assert _run("fedmtl", "--version", cwd=work, env=env).strip().startswith("fedmtl ")
    out = _run("fedmtl", "run", "--set", "train.rounds=2", "--out", "r", "--quiet", cwd=work, env=env)
    assert "run: r\n" in out
    assert "final (round 2): accuracy mean" in out and (work / "r" / "metrics.csv").is_file()
