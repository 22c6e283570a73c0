"""Every example config validates and runs as it is (shortened to 2 rounds)."""

from __future__ import annotations

from pathlib import Path

import pytest

import fedmtl
from fedmtl.config import load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(path, tmp_path, shared_data):
    cfg = load_config(
        path, ["train.rounds=2", "train.local_steps=3", "output.progress=false", "eval.every=1"]
    )
    res = fedmtl.run(cfg, out=tmp_path / "run")
    assert res.summary["rounds_completed"] == 2
    metric = res.summary["primary_metric"]
    assert res.final[f"{metric}_mean"] == res.final[f"{metric}_mean"]  # not NaN
