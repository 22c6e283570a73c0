"""Every results table says which command, commit and machine wrote it (issue 26), and the line is
checked against the repository, not only for its format (issue 36): the commit must be one of this
checkout's history and the command a benchmark ``fedmtl bench all`` runs.

A table without that line cannot be checked against the code it describes, one written from
uncommitted code cannot be reproduced, and a hand-typed line naming a made-up commit or benchmark
describes nothing; all fail here."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from fedmtl.experiment.bench_all import benchmarks

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
TABLES = sorted((BENCH / "results").glob("*.md"))
LINE = re.compile(
    r"^Written by `fedmtl bench (?P<name>[a-z_]+)(?: [^`]*)?` "
    r"on \d{4}-\d\d-\d\d \d\d:\d\d at commit (?P<commit>[0-9a-f]{7,})"
)


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)


def _in_history(commit: str) -> bool:
    """``commit`` names a commit that HEAD descends from (or is)."""
    full = _git("rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    return (
        full.returncode == 0
        and _git("merge-base", "--is-ancestor", full.stdout.strip(), "HEAD").returncode == 0
    )


def test_there_are_tables():
    assert len(TABLES) >= 10


@pytest.mark.parametrize("table", TABLES, ids=lambda p: p.name)
def test_every_table_starts_with_its_provenance_line(table):
    lines = table.read_text().splitlines()
    assert lines[0].startswith("# "), f"{table.name}: first line must be the title"
    assert lines[1] == "", f"{table.name}: a blank line after the title"
    match = LINE.match(lines[2])
    assert match, f"{table.name}: line 3 must be the generated provenance line, got {lines[2][:80]!r}"
    assert match["name"] in benchmarks(BENCH), (
        f"{table.name}: {match['name']!r} is not a registered benchmark"
    )
    assert "uncommitted" not in lines[2], f"{table.name}: written from uncommitted code"
    if _git("rev-parse", "--git-dir").returncode != 0:
        pytest.skip("not a git checkout: the commit cannot be looked up")
    assert _in_history(match["commit"]), f"{table.name}: commit {match['commit']} is not in this history"


def test_a_hand_typed_line_fails_the_checks():
    """The checks above refuse what a person might type: a made-up commit, an unknown benchmark."""
    typed = "Written by `fedmtl bench personalisation --quick` on 2026-01-01 00:00 at commit abcdef0; x"
    match = LINE.match(typed)
    assert match and match["name"] not in benchmarks(BENCH)
    if _git("rev-parse", "--git-dir").returncode != 0:
        pytest.skip("not a git checkout")
    assert not _in_history("abcdef0")
    assert _in_history(_git("rev-parse", "--short", "HEAD").stdout.strip())
