"""The README works as written: short enough to read, its links lead somewhere, and its Python
snippets and ``fedmtl`` commands run as they stand, in a fresh folder with the repository's examples."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
#: commands the README shows but a test cannot run here: other machines, long benchmarks
NOT_RUN = ("fedmtl flower", "fedmtl bench mnist", "fedmtl bench all")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _commands() -> list[str]:
    out = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            cmd = line.split("  #")[0].strip()
            if cmd.startswith("fedmtl ") and not cmd.startswith(NOT_RUN):
                out.append(cmd)
    return out


def _folder(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(REPO / "examples")
    return work


def _env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"}


def test_the_readme_is_a_page_a_newcomer_reads():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200
    for heading in ("## Install", "## A first run", "## Your own data and model", "## Where to go next"):
        assert heading in lines


def test_every_local_link_in_the_readme_and_docs_exists():
    for page in [README, *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name}: {target}"


def test_the_readme_shows_commands_the_cli_has():
    assert len(_commands()) >= 6
    from fedmtl.cli import COMMANDS

    for cmd in _commands():
        assert shlex.split(cmd)[1] in COMMANDS, cmd


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_snippets_run_as_written(index, tmp_path):
    code = _blocks("python")[index]
    work = _folder(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=work, capture_output=True, text=True, env=_env(), timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_shell_commands_run_as_written_in_order(tmp_path):
    work = _folder(tmp_path)
    for cmd in _commands():
        proc = subprocess.run(
            shlex.split(cmd), cwd=work, capture_output=True, text=True, env=_env(), timeout=600
        )
        assert proc.returncode == 0, f"{cmd}\n{proc.stderr[-3000:]}"
    assert (work / "runs" / "report" / "report.html").is_file()
    assert "± " in (work / "runs" / "compare.md").read_text()


def test_the_error_messages_the_docs_show_are_the_ones_fedmtl_prints(capsys):
    from fedmtl.cli import main

    pairs = re.findall(
        r"^\$ (fedmtl .+)\n(fedmtl: error: .+)$", (REPO / "docs" / "configuration.md").read_text(), re.M
    )
    assert len(pairs) >= 2
    for cmd, message in pairs:
        assert main(shlex.split(cmd)[1:]) == 2
        assert capsys.readouterr().err.strip() == message
