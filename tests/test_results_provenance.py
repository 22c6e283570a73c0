"""Every results table says which command, commit and machine wrote it (issue 26).

A table without that line cannot be checked against the code it describes, and one written from
uncommitted code cannot be reproduced; both fail here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TABLES = sorted((BENCH / "results").glob("*.md"))
LINE = re.compile(
    r"^Written by `fedmtl bench (?P<name>[a-z_]+)(?: [^`]*)?` "
    r"on \d{4}-\d\d-\d\d \d\d:\d\d at commit [0-9a-f]{7,}"
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
    assert (BENCH / f"{match['name']}.py").is_file(), f"{table.name}: no benchmark {match['name']!r}"
    assert "uncommitted" not in lines[2], f"{table.name}: written from uncommitted code"
