"""Report and comparison output from fake run directories, so the reporting works without training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from fedmtl.errors import RunDirError
from fedmtl.experiment.report import compare_runs, load_run, write_compare, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OFFSETS = (-0.1, -0.05, 0.0, 0.05, 0.1)
ROUNDS = 6
SKIPPED_EVAL = 5  # a round without evaluation, so "final" must be the last *evaluated* round
PEAK = 3  # best round; the metric gets worse afterwards so best != final
BYTES_UP, BYTES_DOWN = 1_000_000, 2_500_000


def _mean_at(rnd: int, regression: bool, shift: float) -> float:
    """Primary metric mean: improves until PEAK, then degrades."""
    if regression:
        return 1.0 - 0.1 * min(rnd, PEAK) + 0.05 * max(rnd - PEAK, 0) + shift
    return 0.5 + 0.1 * min(rnd, PEAK) - 0.05 * max(rnd - PEAK, 0) + shift


def make_run(
    root: Path,
    dirname: str,
    name: str,
    algo: str,
    dataset: str,
    *,
    regression: bool = False,
    shift: float = 0.0,
    summary: bool = True,
    gain: bool = False,
) -> Path:
    """Write config.yaml, metrics.jsonl and (optionally) summary.json the way the runner does."""
    run_dir = root / dirname
    run_dir.mkdir(parents=True)
    config = {"name": name, "seed": 0, "algorithm": {"name": algo}, "data": {"dataset": dataset}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    metrics = ("loss", "rmse", "r2") if regression else ("loss", "accuracy", "precision", "recall", "f1")
    primary = "rmse" if regression else "accuracy"
    lines: list[str] = []
    round_rows: dict[int, dict[str, Any]] = {}
    for rnd in range(1, ROUNDS + 1):
        row: dict[str, Any] = {
            "round": rnd,
            "kind": "round",
            "sampled": len(OFFSETS),
            "dropped": 0,
            "bytes_up": BYTES_UP,
            "bytes_down": BYTES_DOWN,
            "sim_time": 0.1,
            "wall_time": 1.5 * rnd,
            "train_loss": 1.0 / rnd,
        }
        if rnd != SKIPPED_EVAL:
            mean = _mean_at(rnd, regression, shift)
            clients = []
            for cid, off in enumerate(OFFSETS):
                crow: dict[str, Any] = {"round": rnd, "kind": "client", "client": cid, "n_test": 40 + cid}
                for m in metrics:
                    crow[m] = mean + off if m == primary else 0.5 + off
                if gain:
                    crow["gain"] = off / 2
                clients.append(crow)
                lines.append(json.dumps(crow))
            for m in metrics:
                vals = np.array([c[m] for c in clients])
                row[f"{m}_mean"] = float(vals.mean())
                row[f"{m}_std"] = float(vals.std())
                row[f"{m}_worst10"] = float(vals.max() if m in ("loss", "rmse") else vals.min())
                row[f"{m}_best10"] = float(vals.min() if m in ("loss", "rmse") else vals.max())
            row[f"global_{primary}"] = mean + 0.01
            row["global_loss"] = 0.4
        round_rows[rnd] = row
        lines.append(json.dumps(row))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if summary:
        doc = {
            "name": name,
            "algorithm": algo,
            "dataset": dataset,
            "primary_metric": primary,
            "higher_is_better": not regression,
            "rounds_completed": ROUNDS,
            "final": round_rows[ROUNDS],
            "best": round_rows[PEAK],
            "wall_time": 1.5 * ROUNDS,
            "bytes_total": ROUNDS * (BYTES_UP + BYTES_DOWN),
        }
        (run_dir / "summary.json").write_text(json.dumps(doc))
    return run_dir


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    """Two classification runs (one unfinished, one with an HTML-hostile name) and a regression run."""
    return [
        make_run(tmp_path, "a", "mnist", "fedavg", "mnist", gain=True),
        make_run(tmp_path, "b", "digits <dirichlet> & co", "ditto", "digits", shift=0.02, summary=False),
        make_run(tmp_path, "c", "housing", "fedprox", "california", regression=True),
    ]


def _table(md: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a Markdown table."""
    lines = [ln for ln in md.strip().splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    assert set(lines[1].replace("|", "")) == {"-"}
    return cells[0], cells[2:]


def test_write_report_writes_html_and_pngs(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = write_report(runs, out)
    assert report == out / "report.html"
    text = report.read_text(encoding="utf-8")
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 4
    for png in pngs:
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
        assert f'src="{png.name}"' in text
    assert "mnist (fedavg)" in text
    assert "housing (fedprox)" in text
    assert "digits &lt;dirichlet&gt; &amp; co (ditto)" in text
    assert "<dirichlet>" not in text
    assert f"{_mean_at(ROUNDS, False, 0.0):.4f}" in text  # run a final accuracy
    assert f"{_mean_at(ROUNDS, False, 0.02):.4f}" in text  # run b final accuracy
    assert f"{_mean_at(ROUNDS, True, 0.0):.4f}" in text  # run c final rmse
    assert "<th>gain</th>" in text and "<th>n_test</th>" in text and "<th>r2</th>" in text
    assert "21.00" in text  # 6 rounds x 3.5 MB


def test_write_report_defaults_to_first_run_dir(runs: list[Path]) -> None:
    report = write_report(runs[:1])
    assert report == runs[0] / "report.html"
    assert len(list(runs[0].glob("*.png"))) == 4


def test_compare_runs_reports_final_and_best(runs: list[Path], tmp_path: Path) -> None:
    header, rows = _table(compare_runs(runs))
    assert len(rows) == len(runs)
    col = {h: i for i, h in enumerate(header)}
    by_run = {r[col["Run"]]: r for r in rows}
    for label, regression, shift in (
        ("mnist (fedavg)", False, 0.0),
        ("digits <dirichlet> & co (ditto)", False, 0.02),
        ("housing (fedprox)", True, 0.0),
    ):
        row = by_run[label]
        assert row[col["Final mean"]] == f"{_mean_at(ROUNDS, regression, shift):.4f}"
        assert row[col["Best round"]] == str(PEAK)
        assert row[col["Best mean"]] == f"{_mean_at(PEAK, regression, shift):.4f}"
        assert row[col["Global (final)"]] == f"{_mean_at(ROUNDS, regression, shift) + 0.01:.4f}"
        assert row[col["Total MB"]] == "21.00"
        assert row[col["Wall time"]] == "9.0 s"
        assert row[col["Rounds"]].startswith(str(ROUNDS))
    assert by_run["housing (fedprox)"][col["Metric"]].startswith("rmse")
    assert by_run["housing (fedprox)"][col["Final worst-10%"]] == f"{_mean_at(ROUNDS, True, 0.0) + 0.1:.4f}"
    out = write_compare(runs, tmp_path / "cmp" / "compare.md")
    assert out.read_text(encoding="utf-8") == compare_runs(runs)


def test_missing_summary_is_recomputed(tmp_path: Path) -> None:
    done = load_run(make_run(tmp_path, "done", "x", "fedavg", "mnist"))
    partial = load_run(make_run(tmp_path, "partial", "x", "fedavg", "mnist", summary=False))
    assert done.summary is not None and partial.summary is None
    for key in ("primary_metric", "higher_is_better", "rounds_completed", "final", "best", "bytes_total"):
        assert partial.stats[key] == done.stats[key], key
    assert partial.stats["wall_time"] == pytest.approx(done.stats["wall_time"])
    assert partial.final["round"] == ROUNDS and partial.best["round"] == PEAK


def test_truncated_last_line_is_ignored(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, "killed", "mnist", "fedavg", "mnist", summary=False)
    with (run_dir / "metrics.jsonl").open("a") as fh:
        fh.write('{"round": 7, "kind": "round", "accuracy_me')
    run = load_run(run_dir)
    assert [r["round"] for r in run.rounds] == list(range(1, ROUNDS + 1))
    assert len(run.clients) == (ROUNDS - 1) * len(OFFSETS)
    assert run.final["round"] == ROUNDS
    assert write_report([run_dir]).is_file()


def test_missing_run_dir_raises(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    with pytest.raises(RunDirError) as err:
        load_run(missing)
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(RunDirError, match="does-not-exist"):
        write_report([missing])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunDirError) as err:
        compare_runs([empty])
    assert str(empty) in str(err.value) and "metrics.jsonl" in str(err.value)


def test_odd_names_and_empty_runs_still_report(tmp_path: Path) -> None:
    odd = make_run(tmp_path, "odd", "_tmp $\\x^$ run", "fedavg", "mnist")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text('{"round": 1, "kind": "round", "bytes_up": 10, "bytes_do')
    report = write_report([odd, empty], tmp_path / "out")
    assert "_tmp $\\x^$ run (fedavg)" in report.read_text(encoding="utf-8")
    header, rows = _table(compare_runs([odd, empty]))
    assert rows[1][0] == "empty" and rows[1][header.index("Final mean")] == "—"


def test_multi_task_runs_get_a_per_task_table(tmp_path: Path) -> None:
    import fedmtl
    from tests.conftest import digits_config

    res = fedmtl.run(
        digits_config(train__rounds=2, data__tasks=["digit", "parity"], algorithm={"name": "fedper"}),
        out=tmp_path / "mt",
    )
    page = write_report([res.run_dir]).read_text()
    assert "<h2>Per task at the final round</h2>" in page
    for task in ("digit", "parity"):
        value = res.final[f"task_{task}_accuracy_mean"]
        assert f"<td>{task}</td><td>{value:.4f}</td>" in page
    single = fedmtl.run(digits_config(train__rounds=1), out=tmp_path / "st")
    assert "Per task" not in write_report([single.run_dir]).read_text()
