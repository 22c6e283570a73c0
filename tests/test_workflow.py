"""A researcher's day: runs you can watch, seeds as one experiment, results where people look,
benchmarks that never overwrite measured tables, and the small things around them."""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import fedmtl
from fedmtl.cli import main
from fedmtl.experiment.outputs import write_csv
from tests.conftest import digits_config

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedmtl.cli", *args], capture_output=True, text=True, cwd=cwd, **kw
    )


def _config(tmp_path: Path, **overrides) -> Path:
    path = tmp_path / "c.yaml"
    cfg = digits_config(**overrides)
    cfg["output"] = {**cfg.get("output", {}), "dir": str(tmp_path / "runs")}
    cfg["output"].pop("progress", None)  # left on: the lines are under test
    path.write_text(yaml.safe_dump(cfg))
    return path


# --------------------------------------------------------------------------------------------- watching


def test_off_a_terminal_the_folder_comes_first_then_one_line_per_evaluated_round(tmp_path, capsys):
    cfg = _config(tmp_path, train__rounds=4, eval__every=2)
    assert main(["run", str(cfg), "--out", str(tmp_path / "r")]) == 0  # captured stderr: no terminal
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == f"fedmtl: run folder {tmp_path / 'r'}"
    rounds = [ln for ln in lines if ln.startswith("fedmtl: round ")]
    assert [ln.split()[2] for ln in rounds] == ["2/4", "4/4"]  # evaluated rounds only
    for ln in rounds:
        assert " accuracy 0." in ln and " loss " in ln and " elapsed " in ln and " ETA " in ln
    assert main(["run", str(cfg), "--out", str(tmp_path / "q"), "--quiet"]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == "" and f"run: {tmp_path / 'q'}" in quiet.out


@pytest.mark.slow
def test_the_folder_line_reaches_a_log_file_while_the_run_is_still_going(tmp_path):
    """``fedmtl run ... > log 2>&1 &`` killed early still says where to resume."""
    cfg = _config(tmp_path, train__rounds=10_000)
    log = tmp_path / "log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedmtl.cli", "run", str(cfg)], stdout=fh, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 120
            while "fedmtl: round 1/" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            proc.kill()
            proc.wait()
    text = log.read_text()
    first = text.splitlines()[0]
    assert first.startswith(f"fedmtl: run folder {tmp_path / 'runs'}/t-fedavg-")
    assert "fedmtl: round 1/10000  accuracy" in text
    folder = Path(first.removeprefix("fedmtl: run folder "))
    assert (folder / "config.yaml").is_file()


def test_progress_goes_through_the_fedmtl_logger(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fedmtl")
    cfg = digits_config(train__rounds=2)
    cfg["output"] = {"progress": True}
    fedmtl.run(cfg, out=tmp_path / "r")
    messages = [r.getMessage() for r in caplog.records if r.name == "fedmtl"]
    assert messages[0] == f"run folder {tmp_path / 'r'}"
    assert sum(m.startswith("round ") for m in messages) == 2


def test_auto_named_folders_say_which_algorithm_ran(tmp_path):
    cfg = digits_config(train__rounds=1, algorithm={"name": "ditto"})
    cfg["output"] = {"dir": str(tmp_path), "progress": False}
    assert fedmtl.run(cfg).run_dir.name.startswith("t-ditto-")
    cfg["name"] = "mnist-ditto"
    assert fedmtl.run(cfg).run_dir.name.startswith("mnist-ditto-2")  # not said twice


# --------------------------------------------------------------------------------------------- records


def test_metrics_csv_holds_the_jsonl_rows(tmp_path):
    res = fedmtl.run(digits_config(train__rounds=2), out=tmp_path / "r")
    rows = [json.loads(ln) for ln in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    with open(res.run_dir / "metrics.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(rows)
    assert list(table[0])[:3] == ["round", "kind", "client"]
    for want, got in zip(rows, table, strict=True):
        for key, value in want.items():
            if isinstance(value, float):
                assert float(got[key]) == pytest.approx(value, rel=1e-12), key
            elif isinstance(value, list | dict):
                assert json.loads(got[key]) == value
            else:
                assert got[key] == str(value), key
    # a killed run's partial last line is left out, as everywhere else
    with open(res.run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 3, "kind": "rou')
    write_csv(res.run_dir)
    with open(res.run_dir / "metrics.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)


def test_load_run_and_load_experiment_as_frames_and_as_records(tmp_path, monkeypatch):
    exp = fedmtl.run_seeds(digits_config(train__rounds=2), [3, 5], out=tmp_path / "exp")
    rounds = fedmtl.load_run(exp.runs[0].run_dir)
    stacked = fedmtl.load_experiment(tmp_path / "exp", kind="client")
    pd = pytest.importorskip("pandas")
    assert isinstance(rounds, pd.DataFrame)
    assert rounds["round"].tolist() == [1, 2] and set(rounds["seed"]) == {3}
    assert rounds["accuracy_mean"].iloc[-1] == pytest.approx(exp.runs[0].final["accuracy_mean"])
    assert set(stacked["seed"]) == {3, 5} and set(stacked["kind"]) == {"client"}
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if pandas were not installed
    records = fedmtl.load_run(exp.runs[1].run_dir)
    assert isinstance(records, list) and records[-1]["seed"] == 5 and records[-1]["algorithm"] == "fedavg"
    with pytest.raises(fedmtl.errors.ConfigError, match="kind = 'rounds'; allowed: round, client"):
        fedmtl.load_run(exp.runs[1].run_dir, kind="rounds")


def test_tensorboard_writes_the_round_rows(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = fedmtl.run(digits_config(train__rounds=3, output={"tensorboard": True}), out=tmp_path / "r")
    acc = EventAccumulator(str(res.run_dir / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("accuracy_mean")
    assert [e.step for e in events] == [1, 2, 3]
    assert events[-1].value == pytest.approx(res.final["accuracy_mean"], rel=1e-6)


def test_tensorboard_without_the_package_is_one_line_before_any_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    cfg = _config(tmp_path, train__rounds=1, output={"tensorboard": True})
    assert main(["run", str(cfg), "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()


def test_keeping_only_the_final_client_states(tmp_path, capsys):
    from fedmtl.runtime.client_states import read_states

    cfg = digits_config(train__rounds=4, algorithm={"name": "ditto"}, output={"checkpoint_every": 1})
    full = fedmtl.run(cfg, out=tmp_path / "all")
    kept = fedmtl.run({**cfg, "output": {**cfg["output"], "client_states": "final"}}, out=tmp_path / "final")
    states_all, states_final = read_states(full.run_dir), read_states(kept.run_dir)
    assert states_all.keys() == states_final.keys() and states_all
    for cid, state in states_all.items():
        for key, arr in state["personal"].items():
            assert (arr == states_final[cid]["personal"][key]).all()
    size = lambda p: sum(f.stat().st_size for f in (p / "clients").rglob("*") if f.is_file())  # noqa: E731
    assert size(kept.run_dir) < size(full.run_dir)
    none = fedmtl.run({**cfg, "output": {**cfg["output"], "client_states": "none"}}, out=tmp_path / "none")
    timeless = lambda row: {k: v for k, v in row.items() if k != "wall_time"}  # noqa: E731
    assert read_states(none.run_dir) == {} and timeless(none.final) == timeless(full.final)
    cli_cfg = _config(tmp_path, train__rounds=2)
    assert main(["run", str(cli_cfg), "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    assert "folder holds " in capsys.readouterr().out


# --------------------------------------------------------------------------------------------- seeds


def test_seeds_run_as_one_experiment_that_compare_and_report_aggregate(tmp_path, capsys):
    cfg = _config(tmp_path, train__rounds=3)
    out = tmp_path / "exp"
    assert main(["run", str(cfg), "--seeds", "0", "1", "2", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "experiment.json").read_text())
    assert doc["seeds"] == [0, 1, 2] and doc["complete"]
    finals = [json.loads((out / f"seed-{s}" / "summary.json").read_text())["final"] for s in (0, 1, 2)]
    import numpy as np

    values = np.array([f["accuracy_mean"] for f in finals])
    assert doc["final"]["accuracy_mean"]["mean"] == pytest.approx(values.mean())
    assert doc["final"]["accuracy_mean"]["std"] == pytest.approx(values.std())
    assert f"accuracy mean {values.mean():.4f} ± {values.std():.4f}" in printed
    # seed 1 is the same run as a plain run with seed 1
    single = fedmtl.run(load := yaml.safe_load(cfg.read_text()) | {"seed": 1}, out=tmp_path / "one")
    assert single.final["accuracy_mean"] == finals[1]["accuracy_mean"] and load
    assert main(["compare", str(out), str(tmp_path / "one"), "--out", str(tmp_path / "c.md")]) == 0
    table = (tmp_path / "c.md").read_text()
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in table.splitlines()[2:4]]
    col = header.index("Final mean")
    assert rows[0][col] == f"{values.mean():.4f} ± {values.std():.4f}"
    assert rows[0][header.index("Seeds")] == "0, 1, 2" and rows[1][header.index("Seeds")] == "1"
    assert rows[1][col] == f"{finals[1]['accuracy_mean']:.4f}"
    page = (fedmtl.experiment.report.write_report([out], tmp_path / "rep")).read_text()
    assert "3 seeds" in page and f"{values.mean():.4f} ± {values.std():.4f}" in page


def test_an_interrupted_experiment_resumes_to_the_same_numbers(tmp_path):
    import shutil

    cfg = digits_config(train__rounds=3)
    whole = fedmtl.run_seeds(cfg, [0, 1], out=tmp_path / "whole")
    cut = tmp_path / "cut"
    shutil.copytree(whole.path, cut)
    shutil.rmtree(cut / "seed-1")
    (cut / "seed-0" / "summary.json").unlink()  # as if killed after its last checkpoint
    assert main(["resume", str(cut), "--quiet"]) == 0
    again = json.loads((cut / "experiment.json").read_text())["final"]
    want = json.loads((whole.path / "experiment.json").read_text())["final"]
    assert again.pop("wall_time") and want.pop("wall_time")  # measured, not computed
    assert again == want


def test_bad_seeds_are_one_line(tmp_path, capsys):
    for seeds, message in ((["1", "1"], "each seed once"), (["-1"], "seeds must be >= 0")):
        assert main(["run", "--seeds", *seeds, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and err.startswith("fedmtl: error: --seeds")
        assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------- personalisation


def test_personalisation_is_printed_compared_and_reported(tmp_path, capsys):
    cfg = _config(tmp_path, train__rounds=3, algorithm={"name": "ditto"}, data__holdout_clients=2)
    assert main(["run", str(cfg), "--out", str(tmp_path / "d"), "--quiet"]) == 0
    out = capsys.readouterr().out
    final = json.loads((tmp_path / "d" / "summary.json").read_text())["final"]
    assert f"gain {final['gain_mean']:.4f}" in out
    assert f"clients hurt {final['gain_negative_frac']:.0%}" in out
    before, after = final["new_before_accuracy_mean"], final["new_after_accuracy_mean"]
    assert f"new clients (held out): accuracy {before:.4f} before adapting, {after:.4f} after" in out
    from fedmtl.experiment.report import compare_runs, write_report

    table = compare_runs([tmp_path / "d"])
    for column in (
        "Personal gain",
        "Clients hurt",
        "Shared model",
        "New clients before",
        "New clients after",
    ):
        assert column in table.splitlines()[0]
    assert f"{after:.4f}" in table
    page = write_report([tmp_path / "d"], tmp_path / "rep").read_text()
    assert "<h2>Personalisation</h2>" in page and (tmp_path / "rep" / "report_personal.png").is_file()
    assert f"<td>{before:.4f}</td><td>{after:.4f}</td>" in page


# --------------------------------------------------------------------------------------------- small things


@pytest.mark.slow
def test_version_and_a_closed_pipe(tmp_path):
    proc = _cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"fedmtl {fedmtl.__version__}"
    fake = tmp_path / "r"
    fedmtl.run(digits_config(train__rounds=1), out=fake)
    runs = [str(fake)] * 40  # a long table
    pipe = subprocess.run(
        f"{sys.executable} -m fedmtl.cli compare {' '.join(runs)} --out {tmp_path / 'c.md'} | head -n 1",
        shell=True,
        capture_output=True,
        text=True,
    )
    assert "Traceback" not in pipe.stderr and "BrokenPipe" not in pipe.stderr
    assert pipe.stdout.startswith("| Run |") and (tmp_path / "c.md").is_file()


def test_datasets_is_a_table_and_json_on_request(capsys):
    assert main(["datasets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["name", "kind", "task", "size"]
    digits = next(ln for ln in lines if ln.startswith("digits "))
    assert "1797 samples x 64 features" in digits and "{" not in digits
    assert main(["datasets", "--json"]) == 0
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert next(r for r in rows if r["name"] == "digits")["samples"] == 1797


def test_bench_list_says_how_long_each_takes(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if ln.startswith("mnist_fedavg "))
    assert "min on 2 cores" in row and "FedAvg, FedProx and Local on MNIST" in row


def test_quick_benchmarks_write_to_a_temporary_folder(tmp_path, monkeypatch, capsys):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "fake.py").write_text(
        '"""A stand-in benchmark."""\n'
        "import argparse\n"
        "from pathlib import Path\n\n"
        "def main(argv):\n"
        "    ap = argparse.ArgumentParser(prog='fedmtl bench fake')\n"
        "    ap.add_argument('--quick', action='store_true')\n"
        "    ap.add_argument('--out', default=str(Path(__file__).parent / 'results' / 'fake.md'))\n"
        "    a = ap.parse_args(argv)\n"
        "    Path(a.out).parent.mkdir(parents=True, exist_ok=True)\n"
        "    Path(a.out).write_text('table')\n"
        "    return Path(a.out)\n"
    )
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "fake", "--quick"]) == 0
    written = Path(capsys.readouterr().out.strip().removeprefix("results: "))
    assert written.name == "fake.md" and written.read_text() == "table"
    assert bench not in written.parents and not (bench / "results").exists()
    assert main(["bench", "fake", "--quick", "--out", str(tmp_path / "mine.md")]) == 0
    assert (tmp_path / "mine.md").is_file()
    assert main(["bench", "fake"]) == 0  # a full run writes the committed place
    assert (bench / "results" / "fake.md").is_file()


def test_mocha_without_numba_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    from fedmtl.mocha import _jit

    monkeypatch.setattr(_jit, "HAVE_NUMBA", False)
    args = [
        "run",
        "--set",
        "algorithm.name=mocha",
        "--set",
        "model.name=linear",
        "--set",
        "data.dataset=diabetes",
    ]
    assert main([*args, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "fedmtl: error: config: algorithm.name = 'mocha' needs numba for its compiled solver; install it "
        "with pip install numba (the fedmtl extra 'mocha': pip install '.[mocha]' in a clone)"
    ]
    assert not (tmp_path / "r").exists()


def test_registering_again_replaces_and_registered_model_keys_are_checked(tmp_path, monkeypatch):
    from pydantic import BaseModel

    from fedmtl.data.datasets import REGISTRY
    from fedmtl.models.registry import _MODELS

    # what this test registers is gone after it (other tests list the registries)
    monkeypatch.setattr("fedmtl.data.datasets.REGISTRY", dict(REGISTRY))
    monkeypatch.setattr("fedmtl.models.registry._MODELS", dict(_MODELS))
    from torch import nn

    from fedmtl.data import Clients, register_dataset
    from fedmtl.errors import ConfigError
    from fedmtl.models import register_model

    class Width(BaseModel):
        width: int = 4

    def cell(scale: float) -> None:  # a notebook cell, run twice
        @register_dataset("twice_data", kind="natural")
        def read(cfg):
            import numpy as np

            rng = np.random.default_rng(0)
            xs = [rng.normal(size=(30, 3)).astype("float32") * scale for _ in range(3)]
            return Clients(["a", "b", "c"], xs, [(x[:, 0] > 0).astype("int64") for x in xs])

        @register_model("twice_model", params=Width)
        def build(p, inp):
            body = nn.Sequential(nn.Flatten(), nn.Linear(3, p.width))
            return nn.ModuleDict({"body": body, "head": nn.Linear(p.width, inp.num_outputs)})

    cell(1.0)
    cell(2.0)  # no "already registered"
    with pytest.raises(
        ValueError, match=r"model 'twice_model' is already registered; .*cell.<locals>.build\)"
    ):
        register_model("twice_model", lambda p, i: None)
    with pytest.raises(ConfigError, match="config: unknown key 'model.widht'; allowed keys: width"):
        fedmtl.load_config(None, ["data.dataset=twice_data", "model.name=twice_model", "model.widht=8"])
