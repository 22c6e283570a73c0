"""CLI: bad input gives one line and exit status 2; good input prints where results are."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedmtl.cli import main
from tests.conftest import digits_config


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "fedmtl.cli", *args], capture_output=True, text=True, cwd=cwd
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["run", "--set", "train.lr=-2"],
            "fedmtl: error: config: train.lr = -2: input should be greater than 0",
        ),
        (
            ["run", "--set", "trian.lr=1"],
            "fedmtl: error: config: unknown key 'trian'; allowed keys: aggregation, algorithm, attack, "
            "clients, data, eval, model, name, output, privacy, runtime, secagg, seed, selection, train",
        ),
        (["run", "missing.yaml"], "fedmtl: error: config file not found: missing.yaml"),
        (["resume", "."], "fedmtl: error: . is not a fedmtl run directory (no config.yaml)"),
        (["bench", "nope"], "fedmtl: error: bench: unknown benchmark 'nope'; available: "),
        (["frobnicate"], "fedmtl: error: argument cmd: invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, args, message):
    proc = _cli(*args, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(message)
    assert "Traceback" not in proc.stderr


def test_run_report_compare_end_to_end(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(digits_config(train__rounds=3)))
    assert main(["run", str(cfg), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert (
        main(["run", str(cfg), "--out", str(tmp_path / "b"), "--set", "algorithm.name=local", "--quiet"]) == 0
    )
    out = capsys.readouterr().out
    assert f"run: {tmp_path / 'a'}" in out and "final (round 3): accuracy mean" in out
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.html").is_file()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp.md")]) == 0
    table = (tmp_path / "cmp.md").read_text()
    assert [line.split(" | ")[1] for line in table.splitlines() if line.startswith("| t ")] == [
        "fedavg",
        "local",
    ]


def test_datasets_lists_embedded_and_shared(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    for name in ("digits", "diabetes", "mnist", "landmine", "landmine_small", "school", "vehicle"):
        assert name in out


BENCHMARKS = sorted(
    p.stem for p in (Path(__file__).parents[1] / "benchmarks").glob("*.py") if not p.stem.startswith("_")
)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_prints_its_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", name, "--help"])
    assert exc.value.code == 0
    assert f"fedmtl bench {name}" in capsys.readouterr().out
