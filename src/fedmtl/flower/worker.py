"""A warm worker per SuperNode: the ClientApp's work in one long-lived process.

Flower starts a fresh ClientApp process for every message. Importing torch and building the node's
data and algorithm in each of them is about half of an exchange on loopback. So the ClientApp hands
each message to a worker process of the node (started by the first message, detached, reached over
a Unix socket only its user can open) that keeps torch imported and the node's data, model and
algorithm built between messages; the ClientApp itself only imports flwr and numpy. The worker
computes exactly what the ClientApp would (``fedmtl.flower.client.compute``), so results are the
same; it exits when idle for ``IDLE`` seconds or when the SuperNode process that started it is gone.
``node_config`` ``warm=false`` turns it off (every message computed in its own ClientApp process)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

IDLE = 600.0  # seconds without a message before the worker exits
START_TIMEOUT = 60.0
_LEN = struct.Struct("!Q")
STOP = "stop"


def enabled(node_config: dict[str, Any]) -> bool:
    return str(node_config.get("warm", "true")).lower() not in ("false", "0", "no")


def socket_path(node_config: dict[str, Any]) -> Path:
    """One worker per node (its node_config and state folder) and fedmtl installation; a path short
    enough for AF_UNIX."""
    from fedmtl import __version__
    from fedmtl.flower.node_state import state_root

    items = sorted((str(k), str(v)) for k, v in node_config.items())
    key = repr((items, str(state_root(node_config)), sys.executable, __version__))
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return Path(tempfile.gettempdir()) / f"fedmtl-{os.getuid()}-{digest}.sock"


def _send(conn: socket.socket, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    conn.sendall(_LEN.pack(len(data)) + data)


def _recv(conn: socket.socket) -> Any:
    head = _exact(conn, _LEN.size)
    return pickle.loads(_exact(conn, _LEN.unpack(head)[0]))


def _exact(conn: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = conn.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError("worker connection closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _connect(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        return None
    return conn


def _start(path: Path, watch: int) -> socket.socket:
    """Start the worker (detached: it outlives this ClientApp process) and connect to it."""
    log = path.with_suffix(".log")
    with open(log, "ab") as fh:
        subprocess.Popen(
            [sys.executable, "-m", "fedmtl.flower.worker", str(path), str(watch)],
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        conn = _connect(path)
        if conn is not None:
            return conn
        time.sleep(0.05)
    raise RuntimeError(f"fedmtl worker did not start within {START_TIMEOUT:.0f} s (log: {log})")


def call(node_config: dict[str, Any], request: tuple[Any, ...]) -> Any:
    """``compute(*request)`` in this node's worker, started if needed; its exception is raised here."""
    path = socket_path(node_config)
    conn = _connect(path) or _start(path, os.getppid())
    with conn:
        _send(conn, request)
        ok, value = _recv(conn)
    if not ok:
        raise value
    return value


def stop(node_config: dict[str, Any]) -> bool:
    """Ask this node's worker to exit; False if none was running."""
    conn = _connect(socket_path(node_config))
    if conn is None:
        return False
    with conn:
        _send(conn, STOP)
        _recv(conn)
    return True


def serve(path: Path, watch: int, idle: float = IDLE) -> None:
    """Answer requests one at a time until idle for ``idle`` seconds or ``watch`` (a pid) is gone."""
    from fedmtl.flower.client import compute

    def terminated(signum: int, frame: Any) -> None:
        raise SystemExit(0)  # SIGTERM (a SuperNode's shutdown): leave through ``finally``

    signal.signal(signal.SIGTERM, terminated)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    old = os.umask(0o177)  # the socket: this user only
    try:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
    finally:
        os.umask(old)
    server.listen(8)
    server.settimeout(2.0)
    last = time.monotonic()
    try:
        while time.monotonic() - last < idle and _alive(watch):
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                request = _recv(conn)
                if request == STOP:
                    _send(conn, (True, None))
                    break
                try:
                    reply: tuple[bool, Any] = (True, compute(*request))
                except Exception as exc:  # reported by the ClientApp, as if it had raised it
                    reply = (False, exc)
                _send(conn, reply)
            last = time.monotonic()
    finally:
        server.close()
        log = path.with_suffix(".log")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            if log.stat().st_size == 0:
                log.unlink()


def _alive(pid: int) -> bool:
    if pid <= 1:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]))
