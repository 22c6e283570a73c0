"""A Flower deployment on this machine: one SuperLink and N SuperNodes on 127.0.0.1, by PID.

``fedmtl flower local`` prints these same commands for people to run in their own terminals;
``fedmtl flower run`` and the tests start them here. Nothing in this module imports ``flwr``: it only
starts Flower's own executables, so the commands shown are the commands run.

Flower processes spawn helpers (each SuperNode a ``flower-superexec`` that spawns a ``flwr-clientapp``
per message; the SuperLink a ``flower-superexec`` in a *new session* that spawns ``flwr-serverapp``).
So stopping kills process groups, every descendant found in the process table, and, on Linux, every
process that inherited this deployment's tag in its environment, each by PID: nothing outlives it."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmtl.errors import FedmtlError

TAG_VAR = "FEDMTL_FLOWER_TAG"
FEDERATION = "fedmtl-local"


class DeploymentError(FedmtlError):
    """A Flower process did not start, or a run did not finish in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def node_config_arg(node_config: Mapping[str, Any]) -> str:
    """The ``--node-config`` value: space-separated ``key=value`` with TOML values."""
    return " ".join(f"{k}={_toml_value(v)}" for k, v in node_config.items())


def superlink_cmd(
    port: int,
    host: str = "127.0.0.1",
    tls: tuple[str, str, str] | None = None,
    database: str | None = None,
) -> list[str]:
    """``flower-superlink`` serving its HTTP APIs on ``host:port``; ``tls`` = (ca, cert, key) files;
    ``database``: a file for its state (registered nodes, runs), so a restarted SuperLink has them."""
    cmd = [
        "flower-superlink",
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    if database is not None:
        cmd += ["--database", database]
    if tls is None:
        return [*cmd, "--insecure"]
    ca, cert, key = tls
    return [*cmd, "--ssl-ca-certfile", ca, "--ssl-certfile", cert, "--ssl-keyfile", key]


def supernode_cmd(
    superlink: str, port: int, node_config: Mapping[str, Any], root_cert: str | None = None
) -> list[str]:
    """``flower-supernode`` connecting to ``superlink`` with its runtime API on ``127.0.0.1:port``."""
    cmd = ["flower-supernode", "--superlink", superlink, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--insecure"] if root_cert is None else ["--root-certificates", root_cert]
    return [*cmd, "--node-config", node_config_arg(node_config)]


def federation_toml(address: str, name: str = FEDERATION, insecure: bool = True) -> str:
    """The ``$FLWR_HOME/config.toml`` that makes ``flwr run APP <name>`` reach ``address``."""
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    lines.append("insecure = true" if insecure else '# root-certificates = "/path/to/ca.crt"')
    return "\n".join(lines) + "\n"


def run_config_toml(run_config: Mapping[str, Any]) -> str:
    """Run-config overrides as a TOML file (``flwr run --run-config FILE.toml``): no shell quoting."""
    return "".join(f"{k} = {_toml_value(v)}\n" for k, v in run_config.items())


def flwr_run_cmd(
    app_dir: str | Path, federation: str = FEDERATION, run_config_file: str | None = None
) -> list[str]:
    cmd = ["flwr", "run", str(app_dir), federation, "--stream"]
    return [*cmd, "--run-config", run_config_file] if run_config_file else cmd


def flower_env(home: Path, tag: str | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: this Python's executables first, no network calls home."""
    env = dict(os.environ if base is None else base)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"  # no uv sync: no internet, fedmtl preinstalled
    env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = "0.1"  # pick up a ClientApp task in 0.1 s, not 1 s
    env["PYTHONUNBUFFERED"] = "1"
    if tag:
        env[TAG_VAR] = tag
    return env


# ------------------------------------------------------------------------------------ processes
def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, pgid) for every process (``ps`` works on Linux and macOS)."""
    try:
        out = subprocess.run(
            ["ps", "-A", "-o", "pid=,ppid=,pgid="], capture_output=True, text=True, check=False
        )
    except OSError:
        return {}
    table = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            table[int(parts[0])] = (int(parts[1]), int(parts[2]))
    return table


def _tagged(tag: str) -> set[int]:
    """PIDs whose environment carries ``tag`` (Linux /proc; empty elsewhere)."""
    found = set()
    needle = f"{TAG_VAR}={tag}".encode()
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.add(int(entry.name))
        except OSError:
            continue
    return found


def descendants(roots: Iterable[int], table: dict[int, tuple[int, int]] | None = None) -> set[int]:
    table = _process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: set[int] = set()
    stack = list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in out:
                out.add(child)
                stack.append(child)
    return out


def _signal(pids: Iterable[int], groups: Iterable[int], sig: int) -> None:
    own = os.getpgrp()
    for pgid in set(groups) - {own, 0, 1}:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
    for pid in set(pids) - {os.getpid()}:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _wait_port(proc: Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise DeploymentError(f"{proc.name} exited with status {proc.popen.returncode}:\n{proc.tail()}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", int(proc.port or 0))) == 0:
                return
        time.sleep(0.1)
    raise DeploymentError(
        f"{proc.name} did not listen on 127.0.0.1:{proc.port} within {timeout:.0f} s:\n{proc.tail()}"
    )


class LocalFederation:
    """One SuperLink and ``len(node_configs)`` SuperNodes on loopback, each with its own port.

    Use as a context manager: everything it started is stopped on exit, also after an error."""

    def __init__(
        self,
        root: str | Path,
        node_configs: list[dict[str, Any]],
        federation: str = FEDERATION,
        database: bool = False,
    ):
        self.root = Path(root)
        self.database = str(self.root / "superlink.db") if database else None
        self.node_configs = node_configs
        self.federation = federation
        self.tag = uuid.uuid4().hex
        self.superlink: Proc | None = None
        self.nodes: list[Proc] = []
        self.procs: list[Proc] = []
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        atexit.register(self.stop)  # also on an unhandled exit; stop() is idempotent

    @property
    def address(self) -> str:
        assert self.superlink is not None
        return f"127.0.0.1:{self.superlink.port}"

    def _home(self, name: str) -> Path:
        home = self.root / "home" / name
        home.mkdir(parents=True, exist_ok=True)
        return home

    def _start(self, name: str, cmd: list[str], port: int | None = None, home: str | None = None) -> Proc:
        log = self.root / "logs" / f"{name}.log"
        with open(log, "ab") as fh:
            popen = subprocess.Popen(
                cmd,
                cwd=self.root,
                env=flower_env(self._home(home or name), self.tag),
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so it can be stopped as a whole
            )
        proc = Proc(name, popen, log, port)
        self.procs.append(proc)
        return proc

    def start(self, timeout: float = 60.0) -> LocalFederation:
        """Start the SuperLink and the SuperNodes (in parallel) and wait until all of them listen."""
        port = free_port()
        self.superlink = self._start("superlink", superlink_cmd(port, database=self.database), port)
        nodes = [self.start_node(cfg, wait=None) for cfg in self.node_configs]
        for proc in [self.superlink, *nodes]:
            _wait_port(proc, timeout)
        return self

    def start_node(self, node_config: dict[str, Any], wait: float | None = 60.0) -> Proc:
        """Start one more SuperNode (it retries until the SuperLink answers)."""
        i = len(self.nodes)
        port = free_port()
        proc = self._start(f"supernode-{i}", supernode_cmd(self.address, port, node_config), port)
        self.nodes.append(proc)
        if wait is not None:
            _wait_port(proc, wait)
        return proc

    def kill_superlink(self, sig: int = signal.SIGKILL) -> None:
        """Kill the SuperLink with everything it started (its SuperExec and the running ServerApp)."""
        link = self.superlink
        if link is None or link.popen.poll() is not None:
            return
        table = _process_table()
        pids = [link.pid, *descendants([link.pid], table)]
        _signal(pids, {table[p][1] for p in pids if p in table}, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            link.popen.wait(timeout=10)

    def restart_superlink(self, timeout: float = 60.0) -> Proc:
        """A new SuperLink on the same port (and database, if any): the SuperNodes reconnect to it."""
        assert self.superlink is not None
        self.kill_superlink()
        port = self.superlink.port
        self.superlink = self._start("superlink", superlink_cmd(int(port or 0), database=self.database), port)
        _wait_port(self.superlink, timeout)
        return self.superlink

    def restart_node(self, i: int, wait: float = 60.0) -> Proc:
        """Kill SuperNode ``i`` and start it again with the same config and home (so the same disk
        state); the SuperLink gives it a new node id."""
        self.kill_node(i)
        port = free_port()
        link = self.address
        proc = self._start(f"supernode-{i}", supernode_cmd(link, port, self.node_configs[i]), port)
        self.nodes[i] = proc
        _wait_port(proc, wait)
        return proc

    def kill_node(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Kill SuperNode ``i`` with its SuperExec and running ClientApp (its process group)."""
        node = self.nodes[i]
        if node.popen.poll() is not None:
            return
        table = _process_table()
        _signal([node.pid, *descendants([node.pid], table)], [node.pid], sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.popen.wait(timeout=10)

    def submit(self, app_dir: str | Path, run_config: Mapping[str, Any]) -> Proc:
        """Start ``flwr run APP <federation> --stream`` (it exits when the run ends)."""
        home = self._home("cli")
        (home / "config.toml").write_text(federation_toml(self.address, self.federation))
        n = len(self.procs)
        rc_file = self.root / f"run-config-{n}.toml"
        rc_file.write_text(run_config_toml(run_config))
        cmd = flwr_run_cmd(Path(app_dir).resolve(), self.federation, str(rc_file))
        return self._start(f"flwr-run-{n}", cmd, home="cli")

    def stop_run(self, run_id: int, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``flwr stop RUN_ID``: the SuperLink marks a (dead) run stopped and drops its queued messages."""
        home = self._home("cli")
        (home / "config.toml").write_text(federation_toml(self.address, self.federation))
        return subprocess.run(
            ["flwr", "stop", str(int(run_id)), self.federation],
            env=flower_env(home, self.tag),
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def run(
        self, app_dir: str | Path, run_config: Mapping[str, Any], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """Submit a run and wait for it to end; the output is ``flwr run --stream``'s log."""
        proc = self.submit(app_dir, run_config)
        return self.wait(proc, timeout)

    def wait(self, proc: Proc, timeout: float) -> subprocess.CompletedProcess[str]:
        try:
            proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeploymentError(f"flwr run did not finish within {timeout:.0f} s:\n{self.logs()}") from None
        out = proc.log.read_text(errors="replace")
        return subprocess.CompletedProcess(proc.popen.args, proc.popen.returncode, out, "")

    def logs(self, n: int = 30) -> str:
        return "\n".join(f"--- {p.name} ({p.log})\n{p.tail(n)}" for p in self.procs)

    def stop(self, grace: float = 5.0) -> None:
        """Stop every process this deployment started, and their children, by PID and group."""
        atexit.unregister(self.stop)
        if not self.procs:
            return
        table = _process_table()
        live = [p.pid for p in self.procs if p.popen.poll() is None]
        pids = set(live) | descendants(live, table) | _tagged(self.tag)
        # Process groups of live processes only: a finished process's PID may belong to someone else.
        groups = {table[p][1] for p in pids if p in table}
        _signal(pids, groups, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        reaped = {p.pid for p in self.procs if p.popen.poll() is not None}
        for _ in range(3):
            table = _process_table()
            left = {p for p in pids | _tagged(self.tag) if p in table} - reaped
            if not left:
                break
            _signal(left, {table[p][1] for p in left}, signal.SIGKILL)
            time.sleep(0.2)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=5)

    def alive(self) -> set[int]:
        """PIDs of this deployment's processes still running (for tests that check cleanup)."""
        table = _process_table()
        roots = [p.pid for p in self.procs if p.popen.poll() is None]
        zombies = {pid for pid in table if _is_zombie(pid)}
        return (set(roots) | descendants(roots, table) | _tagged(self.tag)) - zombies

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"
