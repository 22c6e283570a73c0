"""``fedmtl bench all``: every benchmark is in it, and quick runs never replace measured tables."""

from __future__ import annotations

from pathlib import Path

from fedmtl.cli import benchmarks_dir, main
from fedmtl.experiment.bench_all import EXTRA, FOLDER_OUT, benchmarks, commands

ROOT = Path(__file__).resolve().parents[1] / "benchmarks"


def test_every_benchmark_runs_in_bench_all_with_its_own_output():
    files = {p.stem for p in ROOT.glob("*.py") if not p.stem.startswith("_")}
    assert set(benchmarks(ROOT)) == files and len(benchmarks(ROOT)) == len(files)
    for cmd in commands(ROOT, Path("/tmp/x"), quick=True):
        name, out = cmd[4], Path(cmd[-1])
        assert cmd[5] == "--quick" and cmd[-2] == "--out"
        assert out == (Path("/tmp/x") if name in FOLDER_OUT else Path("/tmp/x") / f"{name}.md")
        source = (ROOT / f"{name}.py").read_text()
        assert '"--quick"' in source and '"--out"' in source  # the flags bench all passes exist
        for flag in cmd[6:-2]:  # a second invocation's own flags (EXTRA) exist too
            assert not flag.startswith("--") or f'"{flag}"' in source
    assert any(EXTRA["fdrmfl"][1] == c[6:-2] for c in commands(ROOT, Path("/tmp/x"), quick=True))


def test_bench_all_refuses_unknown_arguments(capsys):
    assert main(["bench", "all", "--rounds", "3"]) == 2
    assert "bench all: unknown arguments ['--rounds', '3']; allowed: --quick" in capsys.readouterr().err


def test_bench_all_finds_the_checkouts_benchmarks_from_anywhere(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no benchmarks/ here
    assert benchmarks_dir() == ROOT
