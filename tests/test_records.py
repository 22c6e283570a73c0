"""Run records: resume after SIGKILL equals an uninterrupted run; run directories are never reused."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import fedmtl
from fedmtl.errors import RunDirError
from fedmtl.experiment.records import RunDir
from tests.conftest import digits_config

VOLATILE = {"wall_time", "compute_wall"}


def _stable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def _cfg():
    return digits_config(
        train__rounds=40,
        clients__per_round=4,
        runtime__drop_prob=0.1,
        runtime__work_fraction=[0.5, 1.0],
        train__lr_schedule="exponential",
    )


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(_cfg()))
    killed = tmp_path / "killed"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(fedmtl.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedmtl.cli", "run", str(cfg_path), "--out", str(killed), "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            ckpt = killed / "checkpoint.tree"
            if ckpt.exists() and len((killed / "metrics.jsonl").read_text().splitlines()) > 60:
                break
            if proc.poll() is not None:
                pytest.fail(f"run ended before it could be killed: {proc.stderr.read().decode()}")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (killed / "summary.json").exists(), "the run finished before SIGKILL; make it longer"
    resumed = fedmtl.resume(killed)
    full = fedmtl.run(_cfg(), out=tmp_path / "full")
    rows_resumed = RunDir(killed).read_metrics()
    rows_full = RunDir(full.run_dir).read_metrics()
    assert _stable(rows_resumed) == _stable(rows_full)
    assert _stable([resumed.final]) == _stable([full.final])
    assert resumed.summary["best"]["round"] == full.summary["best"]["round"]


def test_resume_drops_partial_lines_and_rounds_after_checkpoint(tmp_path):
    cfg = digits_config(train__rounds=6, output={"progress": False, "checkpoint_every": 2})
    full = fedmtl.run(cfg, out=tmp_path / "full")
    # Forge a run killed after round 5's metrics but before its checkpoint, mid-way through a line.
    part = tmp_path / "part"
    part.mkdir()
    rd_full = RunDir(full.run_dir)
    for name in ("config.yaml",):
        (part / name).write_bytes((full.run_dir / name).read_bytes())
    rows = rd_full.read_metrics()
    rd = RunDir(part)
    rd.append([r for r in rows if r["round"] <= 5])
    with open(part / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 6, "kind": "cli')
    partial = fedmtl.run(
        digits_config(train__rounds=4, output={"progress": False, "checkpoint_every": 2}),
        out=tmp_path / "four",
    )
    ckpt = RunDir(partial.run_dir).load_checkpoint()
    assert ckpt["round"] == 4
    shutil.copytree(partial.run_dir / "clients", part / "clients")  # the client states it names
    rd.save_checkpoint(ckpt)
    res = fedmtl.resume(part)
    assert _stable(rd.read_metrics()) == _stable(rows)
    assert res.summary["rounds_completed"] == 6


def test_resume_of_finished_run_is_a_no_op(tmp_path):
    res = fedmtl.run(digits_config(train__rounds=2), out=tmp_path / "r")
    before = (res.run_dir / "metrics.jsonl").read_text()
    again = fedmtl.resume(res.run_dir)
    assert (res.run_dir / "metrics.jsonl").read_text() == before
    assert again.final == res.final


def test_never_overwrites_a_run_directory(tmp_path):
    res = fedmtl.run(digits_config(train__rounds=1), out=tmp_path / "r")
    with pytest.raises(RunDirError, match="already exists and is not empty"):
        fedmtl.run(digits_config(train__rounds=1), out=res.run_dir)
    a = RunDir.create(tmp_path / "runs", "x", 0)
    b = RunDir.create(tmp_path / "runs", "x", 0)
    assert a.path != b.path


def test_resume_rejects_non_run_dir(tmp_path):
    with pytest.raises(RunDirError, match="is not a fedmtl run directory"):
        fedmtl.resume(tmp_path)
