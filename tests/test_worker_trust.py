"""The warm worker trusts no one it has not checked: attacks on its socket, as another user where
the machine allows it (root can drop to ``nobody``) and simulated otherwise. Each refusal is one line
and the reply of whatever listens is never read, let alone decoded."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'fedmtl[flower]')")

from fedmtl.flower import worker  # noqa: E402
from fedmtl.flower.worker import WorkerTrustError  # noqa: E402

NODE = {"partition-id": 0, "num-partitions": 2, "warm": True}
# A listener as another user: stdlib only, so the system Python runs it (fedmtl's may be unreadable).
LISTENER = r"""
import os, socket, sys
path, log, make_dir = sys.argv[1], sys.argv[2], sys.argv[3] == "mkdir"
if make_dir:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.chmod(os.path.dirname(path), 0o777)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
os.chmod(path, 0o777)
s.listen(1)
print("ready", flush=True)
s.settimeout(3)
try:
    c, _ = s.accept()
except OSError:
    open(log, "w").write("no connection")
    raise SystemExit(0)
c.settimeout(3)
got = b""
try:
    c.sendall(b"\0" * 64 + b"a reply the victim must not read")
    while True:
        chunk = c.recv(65536)
        if not chunk:
            break
        got += chunk
except OSError:
    pass
open(log, "w").write(f"received {len(got)} bytes")
"""


@pytest.fixture
def tmp_root(monkeypatch):
    """A shared temporary folder like /tmp (sticky, world-writable) as the worker's base."""
    base = Path(tempfile.mkdtemp(prefix="fedmtl-trust-", dir="/tmp"))
    base.chmod(0o1777)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def no_decode(monkeypatch):
    """Fails the test if the client ever reads a reply frame."""

    def refuse(conn):
        raise AssertionError("the client read a reply from an unproven listener")

    monkeypatch.setattr(worker, "_recv", refuse)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def _as_nobody() -> tuple[int, int] | None:
    if os.getuid() != 0 or shutil.which("python3", path="/usr/bin:/bin") is None:
        return None
    try:
        pw = pwd.getpwnam("nobody")
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid


def _listen_as(ids: tuple[int, int], path: Path, log: Path, make_dir: bool) -> subprocess.Popen[str]:
    uid, gid = ids

    def drop() -> None:
        os.setgid(gid)
        os.setuid(uid)

    python = shutil.which("python3", path="/usr/bin:/bin")
    proc = subprocess.Popen(
        [python, "-I", "-c", LISTENER, str(path), str(log), "mkdir" if make_dir else "-"],
        preexec_fn=drop,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if line.strip() != "ready":
        proc.kill()
        pytest.fail(f"the listener as uid {uid} did not start: {proc.stderr.read()}")  # type: ignore[union-attr]
    return proc


def _expected_path(root: Path) -> Path:
    digest = worker.socket_path(NODE).name
    return root / f"fedmtl-{os.getuid()}" / digest


def test_another_user_who_made_the_socket_folder_first_gets_no_connection(tmp_root, no_decode):
    ids = _as_nobody()
    if ids is None:
        pytest.skip("needs root to act as another user (the simulated case is the next test)")
    path = _expected_path(tmp_root)
    shutil.rmtree(path.parent)  # the attacker is first, in the shared temporary folder
    log = tmp_root / "listener.log"
    proc = _listen_as(ids, path, log, make_dir=True)
    try:
        with pytest.raises(WorkerTrustError) as exc:
            worker.call(NODE, (None, NODE, 1, "train"))
        assert _one_line(exc) == (
            f"worker directory {path.parent} is owned by uid {ids[0]}, not by this user (uid {os.getuid()}): "
            "someone else made it; remove it (or set XDG_RUNTIME_DIR to a private folder)"
        )
        proc.wait(timeout=30)
        assert log.read_text() == "no connection"
    finally:
        proc.kill()


def test_a_listener_of_another_user_inside_the_folder_is_refused_by_owner_and_by_peer_uid(
    tmp_root, no_decode, monkeypatch
):
    ids = _as_nobody()
    if ids is None:
        pytest.skip("needs root to act as another user")
    path = worker.socket_path(NODE)  # the victim's private folder exists (0700)
    path.parent.chmod(0o777)  # a moment of carelessness lets the attacker bind inside it
    log = tmp_root / "listener.log"
    proc = _listen_as(ids, path, log, make_dir=False)
    path.parent.chmod(0o700)
    try:
        with pytest.raises(WorkerTrustError) as exc:
            worker.call(NODE, (None, NODE, 1, "train"))
        assert _one_line(exc) == (
            f"worker socket {path} is not a socket of this user (owner uid {ids[0]}); refusing to use it"
        )
        # without the owner check (say, a socket renamed into place), the peer's uid still gives it away
        monkeypatch.setattr(worker, "_check_socket", lambda p: None)
        with pytest.raises(WorkerTrustError) as exc:
            worker.call(NODE, (None, NODE, 1, "train"))
        assert _one_line(exc) == (
            f"worker socket {path} is served by uid {ids[0]}, not by this user (uid {os.getuid()}); "
            "refusing it"
        )
        proc.wait(timeout=30)
        assert log.read_text() == "received 0 bytes"  # not even the greeting: no request left
    finally:
        proc.kill()


def test_a_folder_of_another_owner_open_to_others_or_a_link_is_refused(tmp_root, monkeypatch):
    path = worker.socket_path(NODE)
    folder = path.parent
    folder.chmod(0o755)
    with pytest.raises(WorkerTrustError) as exc:
        worker.call(NODE, (None, NODE, 1, "train"))
    assert _one_line(exc) == (
        f"worker directory {folder} has mode 0755: other users can reach it; chmod 700 {folder}"
    )
    folder.rmdir()
    (tmp_root / "elsewhere").mkdir(mode=0o700)
    folder.symlink_to(tmp_root / "elsewhere")
    with pytest.raises(
        WorkerTrustError, match="is not a directory \\(a link or file put there\\?\\); remove it"
    ):
        worker.call(NODE, (None, NODE, 1, "train"))
    folder.unlink()
    real = os.getuid()
    monkeypatch.setattr(worker.os, "getuid", lambda: real + 4242)  # as if another user had made it
    with pytest.raises(WorkerTrustError) as exc:
        worker.call(NODE, (None, NODE, 1, "train"))
    assert f"is owned by uid {real}, not by this user (uid {real + 4242}): someone else made it" in _one_line(
        exc
    )


class _Impostor(threading.Thread):
    """A same-user listener at the worker's path that does not know the node's secret."""

    def __init__(self, path: Path, close_at_once: bool = False) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.close_at_once = close_at_once
        self.received = b""

    def run(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            if self.close_at_once:
                return
            conn.settimeout(3)
            self.received = conn.recv(1024)  # the greeting and the client's nonce
            conn.sendall(os.urandom(64))  # a made-up proof
            conn.sendall(b"\0\0\0\0\0\0\0\x10" + b"x" * 16)  # and a reply frame it hopes is read
            with contextlib.suppress(OSError):
                while chunk := conn.recv(65536):
                    self.received += chunk


def test_a_listener_without_the_nodes_secret_gets_no_request_and_its_reply_is_not_read(tmp_root, no_decode):
    path = worker.socket_path(NODE)
    worker.read_secret(path.with_suffix(".key"), create=True)
    impostor = _Impostor(path)
    impostor.start()
    with pytest.raises(WorkerTrustError) as exc:
        worker.call(NODE, (None, NODE, 1, "train"))
    assert _one_line(exc) == (
        f"worker socket {path}: the listener does not know this node's secret; refusing it "
        "(stop whatever listens there)"
    )
    impostor.join(timeout=10)
    assert impostor.received.startswith(b"fedmtl-worker/1\n") and len(impostor.received) == 16 + 32
    path.unlink()
    quitter = _Impostor(path, close_at_once=True)
    quitter.start()
    with pytest.raises(WorkerTrustError, match="the listener broke off the handshake; refusing it"):
        worker.call(NODE, (None, NODE, 1, "train"))


def test_a_secret_file_others_can_read_is_refused(tmp_root):
    path = worker.socket_path(NODE)
    key = path.with_suffix(".key")
    worker.read_secret(key, create=True)
    key.chmod(0o644)
    with pytest.raises(
        WorkerTrustError, match=r"is not a private file of this user \(owner uid \d+, mode 0644\)"
    ):
        worker.call(NODE, (None, NODE, 1, "train"))


def test_the_worker_answers_nobody_who_cannot_prove_the_secret(tmp_root):
    path = worker.socket_path(NODE)
    secret = worker.read_secret(path.with_suffix(".key"), create=True)
    env = {**os.environ, "TMPDIR": str(tmp_root)}
    proc = subprocess.Popen([sys.executable, "-m", "fedmtl.flower.worker", str(path), "0"], env=env)
    try:
        deadline = time.monotonic() + 60
        while not path.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.settimeout(10)
            raw.connect(str(path))
            raw.sendall(b"fedmtl-worker/1\n" + os.urandom(32))
            assert len(worker._exact(raw, 64)) == 64  # its proof; ours is made up
            raw.sendall(os.urandom(32) + b"\0" * 8 + b"a request")
            try:
                answer = raw.recv(1024)
            except ConnectionResetError:  # closed with our request unread
                answer = b""
            assert answer == b""  # closed without a word
        conn = worker._connect(path, secret)  # the node's own ClientApp is answered
        assert conn is not None
        with conn:
            worker._send(conn, {"op": worker.STOP})
            assert worker._recv(conn) == {"ok": True}
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
