"""Flower's object pulls at the pace of loopback: retry after 0.02 s instead of 1 s.

A Flower message travels as a tree of objects. In flwr 1.42 the receiver often asks for them before
the sender has finished pushing them: the SuperNode stores a pulled message (so its SuperExec starts
the ClientApp) before it has pulled the message's objects from the SuperLink, and the SuperNode
pushes a reply message before its objects, which the ServerApp pulls as soon as it sees the
message. Every object not there yet costs Flower's initial backoff of 1 s (then 2, 4, ... up to
10 s). Measured on loopback with the fast SuperNode (``fedmtl.flower.supernode``), about 1 s of a
2.5 s exchange was the ClientApp waiting out that backoff (``docs/flower.md``).

``tune`` lowers the backoff of every ``pull_objects`` call in this process (its keyword defaults);
the number of tries (500) and the overall limit (2 h) stay Flower's, so a slow sender still gets
minutes. Called by the SuperNode, the fork server of the ClientApps, and the ServerApp."""

from __future__ import annotations

INITIAL = 0.02  # seconds before the first retry of an object that is not there yet (Flower: 1)
CAP = 1.0  # the longest wait between retries (Flower: 10)


def tune(initial: float = INITIAL, cap: float = CAP) -> bool:
    """Lower Flower's pull backoff in this process; False (nothing changed) if this flwr's
    ``pull_objects`` has no such keywords."""
    try:
        from flwr.supercore.inflatable import inflatable_utils
    except ImportError:
        return False
    defaults = getattr(inflatable_utils.pull_objects, "__kwdefaults__", None)
    if not isinstance(defaults, dict) or not {"initial_backoff", "backoff_cap"} <= set(defaults):
        return False
    defaults["initial_backoff"] = initial
    defaults["backoff_cap"] = cap
    return True
