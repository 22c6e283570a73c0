"""Where a Flower exchange's seconds go: timestamps recorded on both sides, carried in the messages.

The ClientApp stamps wall-clock times (``time.time()``) into its reply's ``fedmtl.timing`` record:
when its process started, when the handler got the message, when the computation started and ended
(in the warm worker or in the ClientApp itself), and when the reply was built; the computation adds
its own durations (building the node's side, evaluating, training, the node's state file). The server
stamps its own around the push and at each pull. ``segments`` turns one message's stamps into the
consecutive parts of its round trip, which add up to the time from the push to its reply's pull.
(Flower's own ``Metadata.delivered_at`` does not reach the ClientApp in flwr 1.42: the message is
inflated from the objects the server pushed, so the SuperLink's queue and the node's dispatch are
one part here.)

Differences of stamps made on one machine are exact; across machines they assume synchronised
clocks (on loopback there is one clock). Loading this module imports neither torch nor flwr."""

from __future__ import annotations

import os
import time
from typing import Any

# Client stamps (seconds since the epoch) in the reply's timing record.
PROC_START = "proc_start"  # the ClientApp process started (forked or executed)
ENTER = "enter"  # the ClientApp handler got the message
START = "start"  # the computation got the request (in the warm worker: after the hop)
END = "end"  # the computation's answer is encoded
EXIT = "exit"  # the reply message is built; Flower pushes it next
# Durations inside the computation (seconds).
BUILD = "build_s"  # the node's data, model and algorithm (cached in a warm process)
EVAL = "eval_s"  # evaluating the previous round
TRAIN = "train_s"  # the client step
STATE = "state_s"  # reading and writing the client's state file

#: The parts of one message's round trip, in order, with what each holds.
SEGMENTS: dict[str, str] = {
    "push": "server: encode into Flower records, Flower's serialisation and the push to the SuperLink",
    "queue": "SuperLink queue until the SuperNode's poll, the node's pull of the message, its SuperExec "
    "picking the task up and starting the process",
    "clientapp": "ClientApp process: Python and flwr (or a fork), pulling and inflating the message, "
    "loading the app",
    "hop_in": "ClientApp: fedmtl decoding and handing the request to the warm worker (warm=false: "
    "importing torch and the training code in the ClientApp)",
    "compute": "the node's computation: evaluation, training, state file, encoding the answer",
    "hop_out": "the answer back from the worker into the reply message",
    "return": "ClientApp pushes the reply to the SuperNode, which pushes it to the SuperLink; "
    "the server's pull",
}


def process_start() -> float:
    """When this process started: its fork, if ``forked`` said so; else from ``/proc`` on Linux
    (``starttime`` against the boot clock, 10 ms steps); elsewhere, when this module was imported."""
    if _forked is not None:
        return _forked
    try:
        with open("/proc/self/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        since_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat(5): starttime
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot)
    except (OSError, ValueError, IndexError, AttributeError):
        return _IMPORTED


def forked() -> None:
    """This process was just forked (``fedmtl.flower.superexec``): it started now."""
    global _forked
    _forked = time.time()


_forked: float | None = None
_IMPORTED = time.time()


def segments(push_start: float, push_end: float, pulled: float, stamps: dict[str, float]) -> dict[str, float]:
    """One message's round trip, ``push_start`` to ``pulled`` (server clock), as ``SEGMENTS``.

    A missing client stamp merges its segment into the next one, so the parts always add up to the
    round trip."""
    marks = [
        ("push", push_end),
        ("queue", stamps.get(PROC_START)),
        ("clientapp", stamps.get(ENTER)),
        ("hop_in", stamps.get(START)),
        ("compute", stamps.get(END)),
        ("hop_out", stamps.get(EXIT)),
        ("return", pulled),
    ]
    out: dict[str, float] = {}
    last = push_start
    for name, t in marks:
        if t is None:
            out[name] = 0.0
            continue
        t = max(last, min(float(t), pulled))  # clock skew never makes a part negative
        out[name] = t - last
        last = t
    return out


def summary(stamps: dict[str, Any]) -> dict[str, float]:
    """The computation's own durations from a reply's timing record."""
    return {k: float(stamps[k]) for k in (BUILD, EVAL, TRAIN, STATE) if k in stamps}
