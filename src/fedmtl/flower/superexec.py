"""fedmtl's SuperExec: Flower's own, but each ClientApp process is a fork of a warm one.

Flower's SuperExec starts ``flwr-clientapp`` for every message: a new Python that imports flwr
(about 1.3 s of CPU; several seconds of wall time when the cores are busy, and with 8 SuperNodes on
2 cores that alone is over 5 s per exchange). Here the SuperExec's executor (Flower's ``Executor``
interface: ``launch(spec)``) hands each ClientApp task to a *fork server*, a child process that has
imported Flower's ClientApp runtime and fedmtl's ClientApp once and forks a process per task; that
process runs Flower's own ``run_clientapp`` with the task's token, as ``flwr-clientapp`` would.
Tasks of other types go to Flower's subprocess executor.

The fork server reads its requests from a pipe that only this process holds (no socket, no file),
one JSON line each, so the task token does not show in the process table either; it exits when the
pipe closes (this process is gone). It runs no threads, so forking it is safe; a forked ClientApp
never returns into the server's loop (it leaves with ``os._exit``).

    python -m fedmtl.flower.superexec FLOWER-SUPEREXEC-ARGS...   (started by fedmtl.flower.supernode)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import traceback
from typing import IO, Any

SERVE = "--fork-server"


class ForkExecutor:
    """Flower's ``Executor`` interface over a fork server (ClientApp tasks; others: Flower's own)."""

    def __init__(self) -> None:
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        self.fallback = SubprocessExecutor()
        self.server: subprocess.Popen[bytes] | None = None
        self._start()

    def _start(self) -> None:
        self.server = subprocess.Popen(
            [sys.executable, "-m", "fedmtl.flower.superexec", SERVE], stdin=subprocess.PIPE
        )

    def get_eligible_capacity(self, supported_task_types: Any, **kwargs: Any) -> Any:
        return self.fallback.get_eligible_capacity(supported_task_types, **kwargs)

    def wait_for_capacity(self, task_type: Any = None, **kwargs: Any) -> None:
        self.fallback.wait_for_capacity(task_type, **kwargs)

    def launch(self, spec: Any) -> Any:
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP or spec.runtime_dependency_install:
            return self.fallback.launch(spec)  # a fork cannot install the app's dependencies first
        request = {
            "address": spec.runtime_api_address,
            "token": spec.token,
            "insecure": bool(spec.insecure),
            "root_certificates": spec.root_certificates_path,
            "parent_pid": spec.parent_pid,
            "quiet": bool(spec.suppress_output),
        }
        for _ in range(2):  # a fork server that died is started again once
            server = self.server
            if server is None or server.poll() is not None or server.stdin is None:
                self._start()
                continue
            try:
                server.stdin.write(json.dumps(request).encode() + b"\n")
                server.stdin.flush()
                return LaunchResult.accepted()
            except OSError:
                self._start()
        return self.fallback.launch(spec)

    def reconcile(self) -> None:
        self.fallback.reconcile()

    def close(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            with contextlib.suppress(OSError):
                if server.stdin is not None:
                    server.stdin.close()  # the fork server leaves at the end of its input
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=5)
            if server.poll() is None:
                server.kill()
        self.fallback.close()


def _child(request: dict[str, Any], run_clientapp: Any, certificates: Any, timing: Any) -> None:
    """In the forked process: Flower's ClientApp for one task, then out (never back to the loop)."""
    code = 1
    try:
        timing.forked()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)  # the request pipe stays the server's
        if request.get("quiet"):
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        os.close(devnull)
        insecure = bool(request["insecure"])
        parent = request.get("parent_pid")
        run_clientapp(
            runtime_api_address=str(request["address"]),
            token=str(request["token"]),
            insecure=insecure,
            certificates=certificates(request.get("root_certificates"), insecure),
            parent_pid=int(parent) if parent is not None else None,
        )
        code = 0
    except SystemExit as exc:  # flwr_exit ends the ClientApp with sys.exit
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def serve(requests: IO[bytes]) -> None:
    """Import Flower's ClientApp runtime and fedmtl's ClientApp once, then fork one process per
    request line until ``requests`` ends."""
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    import fedmtl.flower.client  # noqa: F401  (the app's imports, shared by every fork)
    from fedmtl.flower import pulls, timing

    pulls.tune()  # a ClientApp starts before its SuperNode holds the message's objects
    with contextlib.suppress(ImportError):  # else imported by each ClientApp's Runtime API client
        import httpcore  # noqa: F401

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # finished ClientApps are reaped by the kernel
    for line in requests:
        try:
            request = json.loads(line)
        except ValueError:
            continue
        if not isinstance(request, dict) or "token" not in request or "address" not in request:
            continue
        if os.fork() == 0:
            _child(request, run_clientapp, validate_and_resolve_root_certificates, timing)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args == [SERVE]:
        serve(sys.stdin.buffer)
        return
    from flwr.supercore.cli import flower_superexec  # the command's function
    from flwr.supercore.constant import ExecutorType
    from flwr.supercore.superexec import run_superexec  # the module

    flower_executor = run_superexec.get_executor

    def executor(executor_type: Any, *args: Any, **kwargs: Any) -> Any:
        if executor_type == ExecutorType.SUBPROCESS:
            return ForkExecutor()
        return flower_executor(executor_type, *args, **kwargs)

    run_superexec.get_executor = executor  # type: ignore[assignment]
    sys.argv = ["flower-superexec", *args]
    flower_superexec()


if __name__ == "__main__":
    main()
