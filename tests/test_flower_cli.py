"""``fedmtl flower``: the printed/written deployment commands, and the core staying free of flwr.

Needs no Flower install: printing commands and importing fedmtl must work without the extra."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedmtl.errors import ConfigError
from fedmtl.flower import cli, local

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "flower_digits.yaml"


def _flower(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="fedmtl")
    cli.add_parser(parser.add_subparsers(dest="cmd", required=True))
    return cli.handle(parser.parse_args(["flower", *argv]))


def test_local_prints_every_command_of_a_loopback_deployment(tmp_path, capsys):
    assert (
        _flower("local", str(EXAMPLE), "--set", "train.rounds=2", "--port", "8100", "--home", str(tmp_path))
        == 0
    )
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if x and not x.startswith("#")]
    link = next(x for x in lines if " flower-superlink " in x)
    assert "--host 127.0.0.1 --port 8100" in link and "--insecure" in link
    assert "--disable-runtime-dependency-installation" in link
    # fedmtl's SuperNode: Flower's, polling at a federation's pace, ClientApps forked warm
    nodes = [x for x in lines if " fedmtl flower supernode " in x]
    assert len(nodes) == 2  # one per client of the config
    for i, node in enumerate(nodes):
        args = shlex.split(node)
        assert args[args.index("--superlink") + 1] == "127.0.0.1:8100"
        assert args[args.index("--port") + 1] == str(9094 + i)
        assert args[args.index("--node-config") + 1] == f"partition-id={i} num-partitions=2"
    toml = out.split("<<'EOF'\n", 1)[1].split("\nEOF", 1)[0]
    assert tomllib.loads(toml)["superlink"]["fedmtl-local"] == {"address": "127.0.0.1:8100", "insecure": True}
    run = shlex.split(next(x for x in lines if " flwr run " in x))
    assert run[0].startswith("FLWR_HOME=")
    assert run[1:6] == ["flwr", "run", str(ROOT / "flower_app"), local.FEDERATION, "--stream"]
    rc = run[run.index("--run-config") + 1]
    assert rc == f'config="{EXAMPLE}" overrides="train.rounds=2"'


def test_local_writes_runnable_scripts(tmp_path, capsys):
    folder = tmp_path / "deploy"
    assert (
        _flower("local", str(EXAMPLE), "--nodes", "3", "--out", str(tmp_path / "run"), "--write", str(folder))
        == 0
    )
    names = sorted(p.name for p in folder.glob("*.sh"))
    assert names == ["run.sh", "superlink.sh", "supernode-0.sh", "supernode-1.sh", "supernode-2.sh"]
    assert all(os.access(folder / n, os.X_OK) for n in names)
    assert "partition-id=2 num-partitions=3" in (folder / "supernode-2.sh").read_text()
    rc = tomllib.loads((folder / "run-config.toml").read_text())
    assert rc == {"config": str(EXAMPLE), "out": str(tmp_path / "run")}
    assert str(folder / "run-config.toml") in (folder / "run.sh").read_text()
    cfg = tomllib.loads((folder / "flwr-home" / "cli" / "config.toml").read_text())
    assert cfg["superlink"]["default"] == local.FEDERATION
    for script in names:
        assert subprocess.run(["bash", "-n", str(folder / script)], check=False).returncode == 0


def test_bad_flower_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        _flower("local", "nope.yaml")
    with pytest.raises(ConfigError, match="no Flower app .pyproject.toml. found in .*; pass --app DIR"):
        _flower("local", str(EXAMPLE), "--app", str(tmp_path))
    with pytest.raises(ConfigError, match="--nodes = 0: must be at least 1"):
        _flower("local", str(EXAMPLE), "--nodes", "0")


def test_node_config_and_run_config_values_are_toml():
    assert (
        local.node_config_arg({"partition-id": 0, "data-dir": '/d "x"'})
        == 'partition-id=0 data-dir="/d \\"x\\""'
    )
    assert tomllib.loads(local.run_config_toml({"a": 1.5, "b": True, "c": "x"})) == {
        "a": 1.5,
        "b": True,
        "c": "x",
    }


def test_the_core_and_the_cli_import_nothing_from_flwr():
    code = (
        "import sys, fedmtl, fedmtl.cli, fedmtl.experiment.run, fedmtl.runtime, fedmtl.flower, "
        "fedmtl.flower.cli, fedmtl.flower.local\n"
        "bad = sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.'))\n"
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


class _FakeTime:
    """A clock for NodeClock: records the sleeps it is asked for."""

    def __init__(self) -> None:
        self.now, self.slept = 0.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_the_supernode_polls_fast_while_busy_and_at_flowers_pace_when_idle():
    from fedmtl.flower.supernode import NodeClock

    fake = _FakeTime()
    clock = NodeClock(poll=0.2, window=10.0, reply=0.02, clock=fake)
    clock.sleep(3)  # no message pulled, the node just started: busy
    clock.sleep(0.5)  # no reply from the ClientApp yet
    clock.sleep(1.25)  # any other sleep is Flower's own
    fake.now = 20.0  # nothing for longer than the window: Flower's 3 s again
    clock.sleep(3)
    clock.busy()
    clock.sleep(3)
    assert fake.slept == [0.2, 0.02, 1.25, 3, 0.2]
    assert clock.monotonic() == fake.now  # everything else is the time module's


def test_supernode_options_out_of_range_are_refused_naming_the_range(capsys):
    from fedmtl.flower.supernode import parser

    with pytest.raises(SystemExit) as exc:
        parser().parse_known_args(["--poll-interval", "0", "--superlink", "x:1"])
    assert exc.value.code == 2
    assert "--poll-interval 0: must be between 0.01 and 3.0 seconds" in capsys.readouterr().err
    ours, rest = parser().parse_known_args(["--no-fork", "--superlink", "x:1", "--insecure"])
    assert (ours.fork, ours.poll_interval, rest) == (False, 0.2, ["--superlink", "x:1", "--insecure"])
