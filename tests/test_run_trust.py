"""A run folder knows what run it is, has one writer at a time, and holds no pickle; bad input that
used to escape is one line, exit 2, and nothing written."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import pytest
import yaml

import fedmtl
from fedmtl import treefile
from fedmtl.cli import main
from fedmtl.errors import RunDirError
from fedmtl.experiment.records import CHECKPOINT, LEGACY_CHECKPOINT, RESUMES, RunDir
from fedmtl.runtime.client_states import read_states
from tests.conftest import digits_config

ROOT = Path(__file__).resolve().parents[1]


def _cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def _interrupted(tmp_path: Path, name: str, **over) -> Path:
    """A run killed after its round-2 checkpoint (forged: round 4 of 4 rows dropped, summary gone)."""
    cfg = digits_config(train__rounds=4, output={"progress": False, "checkpoint_every": 2}, **over)
    full = fedmtl.run(cfg, out=tmp_path / f"{name}-full")
    part = tmp_path / name
    shutil.copytree(full.run_dir, part)
    (part / "summary.json").unlink()
    half = fedmtl.run({**cfg, "train": {**cfg["train"], "rounds": 2}}, out=tmp_path / f"{name}-half")
    shutil.copy2(half.run_dir / CHECKPOINT, part / CHECKPOINT)
    shutil.rmtree(part / "clients", ignore_errors=True)
    if (half.run_dir / "clients").exists():
        shutil.copytree(half.run_dir / "clients", part / "clients")
    return part


def test_resume_refuses_a_foreign_config_in_one_line_and_writes_nothing(tmp_path):
    part = _interrupted(tmp_path, "a")
    before = {p.name: p.read_bytes() for p in part.iterdir() if p.is_file() and p.name != ".lock"}
    cfg = yaml.safe_load((part / "config.yaml").read_text())
    cfg["data"]["partition"]["num_clients"] = 6  # another run's config.yaml
    cfg["train"]["lr"] = 0.5
    (part / "config.yaml").write_text(yaml.safe_dump(cfg))
    before["config.yaml"] = (part / "config.yaml").read_bytes()
    code, err = _cli(["resume", str(part)])
    assert code == 2 and err.count("\n") == 1, err
    assert "will not resume: config.yaml differs from the checkpoint's config" in err
    assert "data.partition.num_clients 8 -> 6" in err and "train.lr 0.1 -> 0.5" in err
    assert "--accept-mismatch" in err
    after = {p.name: p.read_bytes() for p in part.iterdir() if p.is_file() and p.name != ".lock"}
    assert after == before  # metrics.jsonl not even truncated


def test_resume_refuses_another_runs_checkpoint_and_other_model_shapes(tmp_path):
    part = _interrupted(tmp_path, "a")
    other = fedmtl.run(
        digits_config(train__rounds=2, model={"name": "mlp", "hidden": [16]}), out=tmp_path / "other"
    )
    shutil.copy2(other.run_dir / CHECKPOINT, part / CHECKPOINT)
    code, err = _cli(["resume", str(part), "--accept-mismatch"])  # shapes: not even with the flag
    assert code == 2 and err.count("\n") == 1, err
    assert "cannot resume:" in err and "parameter shapes differ (digits.body.1.bias [16] -> [32]" in err


def test_resume_refuses_changed_data_and_the_flag_continues_and_is_recorded(tmp_path):
    store = tmp_path / "store"
    assert main(["pack", "--set", "data.partition.num_clients=4", str(store)]) == 0
    part = _interrupted(tmp_path, "a", data={"dataset": "store", "file": str(store)})
    x = np.load(store / "train_x.npy", mmap_mode="r+")
    x[0, 0] += 1.0  # one value of the data changed since the checkpoint
    x.flush()
    del x
    code, err = _cli(["resume", str(part)])
    assert code == 2 and "will not resume: the data differs (fingerprint" in err, err
    code, err = _cli(["resume", str(part), "--accept-mismatch", "--quiet"])
    assert code == 0, err
    (line,) = [json.loads(x) for x in (part / RESUMES).read_text().splitlines()]
    assert line["accepted_mismatch"][0].startswith("the data differs")
    assert RunDir.open(part).read_summary()["complete"]
    # the checkpoints after it record the data it went on with
    ckpt = RunDir.open(part).load_checkpoint()
    assert ckpt["round"] == 4 and ckpt["identity"]["data"] in line["accepted_mismatch"][0]


def test_a_zero_byte_array_in_a_client_store_is_one_line(tmp_path):
    store = tmp_path / "store"
    assert main(["pack", "--set", "data.partition.num_clients=4", str(store)]) == 0
    (store / "test_y.npy").write_bytes(b"")
    code, err = _cli(
        ["run", "--set", f"data={{dataset: store, file: {store}}}", "--out", str(tmp_path / "r")]
    )
    assert code == 2 and err.count("\n") == 1, err
    assert f"data file {store / 'test_y.npy'}: not a readable .npy array (empty or cut short)" in err
    assert not (tmp_path / "r").exists()


def test_a_second_writer_is_refused_while_the_first_runs_and_a_dead_ones_lock_is_not_in_the_way(tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(digits_config(train__rounds=400)))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedmtl.cli", "run", str(cfg_path), "--out", str(out), "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / CHECKPOINT).exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        code, err = _cli(["resume", str(out)])
        assert code == 2 and err.count("\n") == 1, err
        assert f"run folder {out} is in use by pid {proc.pid}" in err and "(cli.py run " in err
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert (out / ".lock").exists()  # the file stays, the kernel dropped the lock with the process
    rd = RunDir.open(out, lock=True)
    rd.release()


def test_a_lock_held_for_a_dead_process_is_reported_as_stale(tmp_path):
    from fedmtl.experiment.lock import RunLock

    held = RunLock(tmp_path).acquire()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    lock = tmp_path / ".lock"
    info = json.loads(lock.read_text())
    lock.write_text(json.dumps({**info, "pid": int(dead.stdout)}))  # as an NFS lock of a crashed writer
    with pytest.raises(RunDirError, match=r"is locked, but its holder .* is no longer running: a stale lock"):
        RunLock(tmp_path).acquire()
    held.release()
    RunLock(tmp_path).acquire().release()


def test_a_pickled_run_folder_is_never_loaded_and_the_message_says_how_to_convert(tmp_path):
    res = fedmtl.run(digits_config(train__rounds=2, algorithm={"name": "ditto"}), out=tmp_path / "new")
    old = tmp_path / "old"
    shutil.copytree(res.run_dir, old)
    (old / "summary.json").unlink()
    ckpt = RunDir.open(old).load_checkpoint()
    ckpt.pop("identity")
    marker = tmp_path / "ran"

    class Payload:  # what a malicious folder would hold
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (old / LEGACY_CHECKPOINT).write_bytes(pickle.dumps({**ckpt, "evil": Payload()}))
    (old / CHECKPOINT).unlink()
    code, err = _cli(["resume", str(old)])
    assert code == 2 and err.count("\n") == 1, err
    assert "is a pickle written by an older fedmtl; fedmtl no longer reads pickles" in err
    assert f"python tools/convert_pickle_run.py {old}" in err
    code, err = _cli(["report", str(old)])
    assert not marker.exists()
    # the converter refuses the payload rather than running it
    tool = [sys.executable, str(ROOT / "tools" / "convert_pickle_run.py"), str(old)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(tool, capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "refused: the pickle names io.open" in proc.stderr
    assert not marker.exists()
    # an honest old folder converts, and resumes to the same states
    for seg in sorted((old / "clients").glob("seg-*.bin")):
        index = np.load(seg.with_suffix("").with_suffix(".idx.npy")).reshape(-1, 3)
        states = read_states(res.run_dir)
        blob, new = bytearray(), index.copy()
        for i, (cid, _, _) in enumerate(index.tolist()):
            raw = pickle.dumps(states[cid])
            new[i, 1:] = (len(blob), len(raw))
            blob += raw
        seg.write_bytes(bytes(blob))
        np.save(seg.with_suffix("").with_suffix(".idx.npy"), new)
    (old / LEGACY_CHECKPOINT).write_bytes(pickle.dumps(ckpt))
    proc = subprocess.run(tool, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert treefile.encode(read_states(old)) == treefile.encode(read_states(res.run_dir))  # bit for bit
    assert fedmtl.resume(old).summary["complete"]


def test_a_budget_below_the_first_round_is_refused_before_any_folder_exists(tmp_path):
    out = tmp_path / "run"
    dp = {"enabled": True, "noise_multiplier": 1.0, "clip_norm": 0.5, "max_epsilon": 0.01}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(digits_config(privacy=dp, clients__per_round=4)))
    code, err = _cli(["run", str(cfg), "--out", str(out)])
    assert code == 2 and err.count("\n") == 1, err
    assert "config: the run would stop before round 1: privacy budget: round 1 would raise epsilon to" in err
    assert not out.exists()


@pytest.mark.parametrize("value", ["0.99", "-0.1", "0.51"])
def test_val_fraction_outside_0_to_half_is_refused(tmp_path, value):
    code, err = _cli(["run", "--set", f"data.val_fraction={value}", "--out", str(tmp_path / "r")])
    assert code == 2 and "data.val_fraction" in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_tune_takes_val_fraction_0_as_no_validation_split_and_says_it_cannot_choose(tmp_path):
    code, err = _cli(["tune", "--set", "data.val_fraction=0", "--budget", "1", "--grid", "train.lr=0.1",
                      "--out", str(tmp_path / "t")])  # fmt: skip
    assert code == 2 and err.count("\n") == 1, err
    assert "tune: data.val_fraction = 0 means no validation rows" in err
    assert not (tmp_path / "t").exists()
