"""One writer per run folder: an OS lock on ``<run>/.lock`` for as long as a process writes it.

The kernel drops the lock when its process exits, however it exits (SIGKILL included), so a lock
left by a dead run never blocks a resume: the file stays, the lock does not. The file says who
holds it (pid, host, command, since), for the one-line refusal a second ``run`` or ``resume`` gets.
Where the lock is held but its recorded process is gone from this host (a network filesystem
that keeps locks of a crashed client), the refusal says so and how to clear it."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from fedmtl.errors import RunDirError

LOCK = ".lock"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``acquire`` or a one-line ``RunDirError``; ``release`` (or the process's exit) lets go."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunDirError(self._held_by()) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200] if sys.argv else "python",
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self.fd = fd
        return self

    def _held_by(self) -> str:
        folder = self.path.parent
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            holder = {}
        pid, host = holder.get("pid"), holder.get("host")
        who = f"pid {pid} on {host} since {holder.get('since', '?')} ({holder.get('command', '?')})"
        if isinstance(pid, int) and host == socket.gethostname() and not pid_alive(pid):
            return (
                f"run folder {folder} is locked, but its holder ({who}) is no longer running: a stale lock "
                f"kept by the filesystem; if no other machine writes this folder, delete {self.path}"
            )
        return f"run folder {folder} is in use by {who}; wait for it to end, or use another folder"

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire() if self.fd is None else self

    def __exit__(self, *exc: object) -> None:
        self.release()
