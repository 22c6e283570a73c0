"""fedmtl's SuperNode: Flower's own ``flower-supernode``, polling at the pace of a federation and
starting each ClientApp as a fork of a warm process.

Three of Flower 1.42's fixed costs per message dominate a warm exchange on loopback (docs/flower.md,
"Where an exchange's seconds go"):

- **Polling.** The SuperNode sleeps 3 s after every pull that finds no message, so a message waits
  for up to 3 s in the SuperLink, and it looks for its ClientApp's reply every 0.5 s. Here it pulls
  every ``--poll-interval`` seconds (default 0.2) while it is busy (a message in the last
  ``--poll-window`` seconds, default 120; and from its start) and every 3 s again after that, and it
  looks for replies every ``--reply-interval`` seconds (default 0.02).
- **Process start.** Flower's SuperExec starts ``flwr-clientapp`` for every message: a new Python
  importing flwr, over a second of CPU each (several seconds of wall time on a busy machine, and N
  of them per exchange compete for the cores). With ``--fork`` (the default) the SuperNode runs in
  Flower's ``--isolation process`` mode beside fedmtl's SuperExec (``fedmtl.flower.superexec``),
  which forks each ClientApp from a process that has imported flwr and fedmtl's ClientApp once.

- **Object pulls.** A message's objects are often not there yet when they are first asked for
  (``fedmtl.flower.pulls``): Flower retries after 1 s, here after 0.02 s (in the SuperNode and
  its ClientApps; the ServerApp does the same for the replies).

Everything else is Flower's own code (registration, TLS, node authentication, the Fleet and Runtime
APIs, ``run_clientapp``). The polling change replaces three fixed sleeps of Flower's SuperNode loop
and is only made for the flwr release it was written against (1.42; fedmtl pins it); with another
release this says so in one line and runs Flower's SuperNode as it is.

    fedmtl flower supernode [--poll-interval S] [--poll-window S] [--reply-interval S] [--no-fork]
        FLOWER-SUPERNODE-ARGS...     (--superlink, --insecure/--root-certificates, --node-config, ...)
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from fedmtl.errors import ConfigError

FLWR_SERIES = "1.42."  # the release whose SuperNode loop ``tune_polling`` knows
IDLE_SLEEP = 3  # Flower's sleep after an empty pull
REPLY_SLEEP = 0.5  # Flower's sleep between looks for the ClientApp's reply (and its objects)
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's SuperExec: seconds between task polls


class NodeClock:
    """The ``time`` module as Flower's SuperNode loop sees it: its fixed sleeps at fedmtl's pace.

    A sleep of 3 s (no message pulled) becomes ``poll`` seconds while the node is busy (a message
    within ``window`` seconds) and stays 3 s otherwise; a sleep of 0.5 s (no reply yet) becomes
    ``reply`` seconds. Every other attribute is the ``time`` module's."""

    def __init__(self, poll: float, window: float, reply: float, clock: Any = time) -> None:
        self.poll, self.window, self.reply = poll, window, reply
        self._time = clock
        self.last_message = clock.monotonic()  # a node just started expects its first message soon

    def __getattr__(self, name: str) -> Any:
        return getattr(self._time, name)

    def busy(self) -> None:
        self.last_message = self._time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds == IDLE_SLEEP:
            busy = self._time.monotonic() - self.last_message < self.window
            seconds = self.poll if busy else IDLE_SLEEP
        elif seconds == REPLY_SLEEP:
            seconds = self.reply
        self._time.sleep(seconds)


def tune_polling(poll: float, window: float, reply: float) -> NodeClock | None:
    """Give Flower's SuperNode loop a ``NodeClock``; None (nothing changed) if this flwr's loop is
    not the one it was written for."""
    import flwr
    from flwr.supernode import start_client_internal as loop

    try:
        ok = str(flwr.__version__).startswith(FLWR_SERIES) and (
            f"time.sleep({IDLE_SLEEP})" in inspect.getsource(loop.start_client_internal)
            and f"time.sleep({REPLY_SLEEP})" in inspect.getsource(loop._push_messages)
        )
    except (AttributeError, OSError, TypeError):
        ok = False
    if not ok:
        return None
    clock = NodeClock(poll, window, reply)
    push: Callable[..., Any] = loop._push_messages

    def push_messages(*args: Any, **kwargs: Any) -> Any:
        clock.busy()  # a message was pulled: the next one comes soon
        try:
            return push(*args, **kwargs)
        finally:
            clock.busy()

    loop.time = clock  # type: ignore[attr-defined]
    loop._push_messages = push_messages  # type: ignore[attr-defined]
    return clock


def _seconds(name: str, low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} {text!r}: expected seconds") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{name} {text}: must be between {low} and {high} seconds")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedmtl flower supernode",
        description="Flower's flower-supernode with fedmtl's polling and forked ClientApps; every "
        "other argument is flower-supernode's (see flower-supernode --help)",
    )
    p.add_argument("--poll-interval", type=_seconds("--poll-interval", 0.01, 3.0), default=0.2,
                   help="seconds between pulls while busy (Flower: 3)")  # fmt: skip
    p.add_argument("--poll-window", type=_seconds("--poll-window", 0.0, 86400.0), default=120.0,
                   help="seconds after a message during which the node counts as busy")  # fmt: skip
    p.add_argument("--reply-interval", type=_seconds("--reply-interval", 0.001, 0.5), default=0.02,
                   help="seconds between looks for the ClientApp's reply (Flower: 0.5)")  # fmt: skip
    p.add_argument("--fork", action=argparse.BooleanOptionalAction, default=True,
                   help="fork each ClientApp from a warm process (fedmtl's SuperExec; default) "
                   "instead of starting flwr-clientapp")  # fmt: skip
    return p


def _superexec_cmd(flower_args: argparse.Namespace) -> list[str]:
    """fedmtl's SuperExec for a SuperNode started with ``flower_args`` (Flower's parsed arguments),
    connected to its Runtime API as Flower's own subprocess isolation connects its SuperExec."""
    host = str(flower_args.host)
    address = f"[{host}]:{flower_args.port}" if ":" in host else f"{host}:{flower_args.port}"
    cmd = [sys.executable, "-m", "fedmtl.flower.superexec", "--runtime-api-address", address]
    if flower_args.ssl_certfile or flower_args.ssl_keyfile or flower_args.ssl_ca_certfile:
        if flower_args.ssl_ca_certfile:
            cmd += ["--root-certificates", str(flower_args.ssl_ca_certfile)]
    else:
        cmd += ["--insecure"]
    return [*cmd, "--parent-pid", str(os.getpid())]


def main(argv: list[str] | None = None) -> None:
    """Run Flower's SuperNode with fedmtl's polling (and its forking SuperExec); blocks like
    ``flower-supernode``."""
    ours, rest = parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    # the module (flwr.supernode.cli re-exports its function under the same name)
    flower = importlib.import_module("flwr.supernode.cli.flower_supernode")

    if "--isolation" in rest or any(a.startswith("--isolation=") for a in rest):
        if ours.fork:
            raise ConfigError(
                "fedmtl flower supernode: --isolation is set by --fork (process, with fedmtl's "
                "SuperExec); pass --no-fork to choose Flower's isolation yourself"
            )
    elif ours.fork:
        rest = [*rest, "--isolation", "process"]
    flower_args = flower._parse_args_run_supernode().parse_args(rest)  # Flower's errors, as its CLI
    if tune_polling(ours.poll_interval, ours.poll_window, ours.reply_interval) is None:
        import flwr

        print(
            f"fedmtl flower supernode: flwr {flwr.__version__} is not the {FLWR_SERIES}x release whose "
            "polling this tunes; running Flower's SuperNode as it is",
            file=sys.stderr,
            flush=True,
        )
    from fedmtl.flower import pulls

    pulls.tune()  # the objects of a message the server is still pushing: retried after 0.02 s
    if ours.fork:
        env = dict(os.environ)
        env.setdefault(TASK_POLL_ENV, "0.1")  # Flower's default: a task waits up to 1 s
        # the SuperExec retries until the Runtime API below listens; it exits when this process does
        subprocess.Popen(_superexec_cmd(flower_args), env=env, stdin=subprocess.DEVNULL)
    sys.argv = ["flower-supernode", *rest]
    flower.flower_supernode()


if __name__ == "__main__":
    main()
