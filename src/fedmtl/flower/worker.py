"""A warm worker per SuperNode: the ClientApp's work in one long-lived process.

Flower starts a fresh ClientApp process for every message. Importing torch and building the node's
data and algorithm in each of them is about half of an exchange on loopback. So the ClientApp hands
each message to a worker process of the node (started by the first message, detached, reached over
a Unix socket) that keeps torch imported and the node's data, model and algorithm built between
messages; the ClientApp itself only imports flwr and numpy. The worker computes exactly what the
ClientApp would (``fedmtl.flower.client.compute``), so results are the same; it exits when idle for
``IDLE`` seconds or when the SuperNode process that started it is gone. ``node_config``
``warm=false`` turns it off (every message computed in its own ClientApp process).

Who may talk to whom (docs/security.md). The socket lives in a private directory of the node's
user (``private_dir``: created 0700, checked before every use, refused if anyone else owns it or
can reach into it), so no other user can plant a listener at its path or connect to it. Both ends
check the peer's uid (``SO_PEERCRED``) and prove knowledge of a per-node secret (a 0600 key file in
that directory) before anything else is sent: a challenge-response with HMAC-SHA256 over fresh
nonces, so a listener that is not this node's worker gets no request and its reply is never read.
What crosses the socket is data only: Flower's own protobuf encoding of the records and a
``fedmtl.treefile`` envelope, never a pickle."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from fedmtl import errors, treefile
from fedmtl.errors import FedmtlError
from fedmtl.experiment.lock import pid_alive

IDLE = 600.0  # seconds without a message before the worker exits
START_TIMEOUT = 60.0
HANDSHAKE_TIMEOUT = 10.0
_LEN = struct.Struct("!Q")
_HELLO = b"fedmtl-worker/1\n"
_NONCE = 32
KEY_BYTES = 32
STOP = "stop"


class WorkerTrustError(FedmtlError):
    """The worker's directory, socket, peer or secret is not what this node's user made."""


def enabled(node_config: dict[str, Any]) -> bool:
    return str(node_config.get("warm", "true")).lower() not in ("false", "0", "no")


# ------------------------------------------------------------------------------------ where
def check_private(path: Path) -> Path:
    """``path`` is a directory of this user that nobody else can enter or write; else one line."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise WorkerTrustError(f"worker directory {path} is gone") from None
    uid = os.getuid()
    if not stat.S_ISDIR(st.st_mode):
        raise WorkerTrustError(
            f"worker directory {path} is not a directory (a link or file put there?); remove it"
        )
    if st.st_uid != uid:
        raise WorkerTrustError(
            f"worker directory {path} is owned by uid {st.st_uid}, not by this user (uid {uid}): someone "
            "else made it; remove it (or set XDG_RUNTIME_DIR to a private folder)"
        )
    if st.st_mode & 0o077:
        raise WorkerTrustError(
            f"worker directory {path} has mode {stat.S_IMODE(st.st_mode):04o}: other users can reach it; "
            f"chmod 700 {path}"
        )
    return path


def private_dir() -> Path:
    """This user's folder for worker sockets: ``$XDG_RUNTIME_DIR/fedmtl`` (a per-user 0700 folder on
    systemd machines), else ``<tmp>/fedmtl-<uid>``; created 0700 and checked on every call."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime and Path(runtime).is_dir() else Path(tempfile.gettempdir())
    path = base / ("fedmtl" if runtime and base == Path(runtime) else f"fedmtl-{os.getuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise WorkerTrustError(f"worker directory {path}: cannot create it ({exc.strerror})") from None
    return check_private(path)


def socket_path(node_config: dict[str, Any]) -> Path:
    """One worker per node (its node_config and state folder) and fedmtl installation; a path short
    enough for AF_UNIX."""
    from fedmtl import __version__
    from fedmtl.flower.node_state import state_root

    items = sorted((str(k), str(v)) for k, v in node_config.items())
    key = repr((items, str(state_root(node_config)), sys.executable, __version__))
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return private_dir() / f"{digest}.sock"


def _key_path(sock: Path) -> Path:
    return sock.with_suffix(".key")


def read_secret(path: Path, create: bool = False) -> bytes:
    """The node's secret: a 0600 file of this user's in the private directory (made if ``create``)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    if create:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(os.urandom(KEY_BYTES))
    for _ in range(50):  # another ClientApp may be writing it this instant
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise WorkerTrustError(f"worker secret {path}: cannot open ({exc.strerror})") from None
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
                raise WorkerTrustError(
                    f"worker secret {path} is not a private file of this user (owner uid {st.st_uid}, "
                    f"mode {stat.S_IMODE(st.st_mode):04o}); remove it"
                )
            secret = fh.read()
        if len(secret) == KEY_BYTES:
            return secret
        time.sleep(0.01)
    raise WorkerTrustError(f"worker secret {path} has {len(secret)} bytes, expected {KEY_BYTES}; remove it")


def _check_socket(path: Path) -> None:
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
        raise WorkerTrustError(
            f"worker socket {path} is not a socket of this user (owner uid {st.st_uid}); refusing to use it"
        )


def peer_uid(conn: socket.socket) -> int | None:
    """The uid of the process at the other end (Linux ``SO_PEERCRED``; None where unavailable)."""
    opt = getattr(socket, "SO_PEERCRED", None)
    if opt is None:
        return None
    creds = conn.getsockopt(socket.SOL_SOCKET, opt, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


# ------------------------------------------------------------------------------------ wire
def _exact(conn: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = conn.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError("worker connection closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _send(conn: socket.socket, obj: Any) -> None:
    data = treefile.encode(obj)
    conn.sendall(_LEN.pack(len(data)) + data)


def _recv(conn: socket.socket) -> Any:
    head = _exact(conn, _LEN.size)
    return treefile.decode(_exact(conn, _LEN.unpack(head)[0]))


def _mac(secret: bytes, role: bytes, nonce_c: bytes, nonce_s: bytes) -> bytes:
    return hmac.new(secret, role + nonce_c + nonce_s, hashlib.sha256).digest()


def _prove_client(conn: socket.socket, secret: bytes, path: Path) -> None:
    """The client's half: the peer must be this user's process and know the node's secret."""
    uid = peer_uid(conn)
    if uid is not None and uid != os.getuid():
        raise WorkerTrustError(
            f"worker socket {path} is served by uid {uid}, not by this user (uid {os.getuid()}); refusing it"
        )
    nonce_c = os.urandom(_NONCE)
    conn.sendall(_HELLO + nonce_c)
    answer = _exact(conn, _NONCE + 32)
    nonce_s, proof = answer[:_NONCE], answer[_NONCE:]
    if not hmac.compare_digest(proof, _mac(secret, b"server", nonce_c, nonce_s)):
        raise WorkerTrustError(
            f"worker socket {path}: the listener does not know this node's secret; refusing it "
            "(stop whatever listens there)"
        )
    conn.sendall(_mac(secret, b"client", nonce_c, nonce_s))


def _prove_server(conn: socket.socket, secret: bytes) -> bool:
    """The worker's half: only this user's processes that know the secret are answered."""
    uid = peer_uid(conn)
    if uid is not None and uid != os.getuid():
        return False
    hello = _exact(conn, len(_HELLO) + _NONCE)
    if not hello.startswith(_HELLO):
        return False
    nonce_c, nonce_s = hello[len(_HELLO) :], os.urandom(_NONCE)
    conn.sendall(nonce_s + _mac(secret, b"server", nonce_c, nonce_s))
    return hmac.compare_digest(_exact(conn, 32), _mac(secret, b"client", nonce_c, nonce_s))


# ------------------------------------------------------------------------------------ payload
def _pack_records(records: Any) -> Any:
    from flwr.common.serde import recorddict_to_proto

    if records is None:
        return None
    return recorddict_to_proto(records).SerializeToString()


def _unpack_records(data: Any) -> Any:
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    if data is None:
        return None
    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


def _request(request: tuple[Any, ...]) -> dict[str, Any]:
    content, node_config, run_id, action = request
    config = {str(k): v for k, v in node_config.items()}
    return {"content": _pack_records(content), "node_config": config, "run_id": int(run_id), "action": action}


def _raise(reply: dict[str, Any]) -> Any:
    """The worker's exception, raised here: fedmtl's own error classes as they were, others named."""
    name, message = str(reply.get("error", "Exception")), str(reply.get("message", ""))
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, FedmtlError):
        raise cls(message)
    if name == WorkerTrustError.__name__:
        raise WorkerTrustError(message)
    raise RuntimeError(f"fedmtl worker: {name}: {message}")


# ------------------------------------------------------------------------------------ client
def _connect(path: Path, secret: bytes) -> socket.socket | None:
    """A proven connection to the worker at ``path``; None if nothing listens (start one)."""
    try:
        _check_socket(path)
    except FileNotFoundError:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        return None
    try:
        conn.settimeout(HANDSHAKE_TIMEOUT)
        _prove_client(conn, secret, path)
        conn.settimeout(None)
    except (OSError, ConnectionError):
        conn.close()
        raise WorkerTrustError(
            f"worker socket {path}: the listener broke off the handshake; refusing it"
        ) from None
    except BaseException:
        conn.close()
        raise
    return conn


def _start(path: Path, watch: int, secret: bytes) -> socket.socket:
    """Start the worker (detached: it outlives this ClientApp process) and connect to it."""
    log = path.with_suffix(".log")
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "ab") as fh:
        subprocess.Popen(
            [sys.executable, "-m", "fedmtl.flower.worker", str(path), str(watch)],
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        conn = _connect(path, secret)
        if conn is not None:
            return conn
        time.sleep(0.05)
    raise RuntimeError(f"fedmtl worker did not start within {START_TIMEOUT:.0f} s (log: {log})")


def call(node_config: dict[str, Any], request: tuple[Any, ...]) -> Any:
    """``compute(*request)`` in this node's worker, started if needed; its exception is raised here."""
    path = socket_path(node_config)
    secret = read_secret(_key_path(path), create=True)
    conn = _connect(path, secret) or _start(path, os.getppid(), secret)
    with conn:
        _send(conn, _request(request))
        reply = _recv(conn)
    if not reply.get("ok"):
        _raise(reply)
    return _unpack_records(reply["out"]), _unpack_records(reply["latest"])


def stop(node_config: dict[str, Any]) -> bool:
    """Ask this node's worker to exit; False if none was running."""
    path = socket_path(node_config)
    key = _key_path(path)
    if not key.exists():
        return False
    conn = _connect(path, read_secret(key))
    if conn is None:
        return False
    with conn:
        _send(conn, {"op": STOP})
        _recv(conn)
    return True


# ------------------------------------------------------------------------------------ worker
def _answer(request: Any) -> dict[str, Any]:
    from fedmtl.flower.client import compute

    try:
        content = _unpack_records(request["content"])
        out, latest = compute(content, request["node_config"], request["run_id"], request["action"])
        return {"ok": True, "out": _pack_records(out), "latest": _pack_records(latest)}
    except Exception as exc:  # reported by the ClientApp, as if it had raised it
        if not isinstance(exc, FedmtlError):
            traceback.print_exc()  # into the worker's log
        return {"ok": False, "error": type(exc).__name__, "message": str(exc)}


def serve(path: Path, watch: int, idle: float = IDLE) -> None:
    """Answer requests one at a time until idle for ``idle`` seconds or ``watch`` (a pid) is gone."""

    def terminated(signum: int, frame: Any) -> None:
        raise SystemExit(0)  # SIGTERM (a SuperNode's shutdown): leave through ``finally``

    signal.signal(signal.SIGTERM, terminated)
    check_private(path.parent)
    secret = read_secret(_key_path(path))
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    old = os.umask(0o177)  # the socket: this user only (its folder already is)
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
                try:
                    conn.settimeout(HANDSHAKE_TIMEOUT)
                    if not _prove_server(conn, secret):
                        continue  # not this node's ClientApp: nothing is read from it
                    conn.settimeout(None)
                    request = _recv(conn)
                except (OSError, ConnectionError, treefile.TreeFormatError):
                    continue
                if not isinstance(request, dict):
                    continue
                stopping = request.get("op") == STOP
                with contextlib.suppress(OSError):  # the ClientApp may be gone (its SuperNode killed)
                    _send(conn, {"ok": True} if stopping else _answer(request))
                if stopping:
                    break
            last = time.monotonic()
    finally:
        server.close()
        log = path.with_suffix(".log")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            if log.stat().st_size == 0:
                log.unlink()


def _alive(pid: int) -> bool:
    """Whether the node's SuperNode still runs (pid 0 or 1: no parent to watch, always)."""
    return pid <= 1 or pid_alive(pid)


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]))
