"""Run fedmtl algorithms, unchanged, on the Flower deployment engine (the ``flower`` extra).

Only this subpackage imports ``flwr``, and only when its apps are built: ``fedmtl.flower.cli`` (the
``fedmtl flower`` command) and ``fedmtl.flower.local`` (a loopback deployment) work without it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp


def server_app(app_dir: Any = None) -> ServerApp:
    """The ServerApp factory (see ``fedmtl.flower.server``)."""
    from fedmtl.flower.server import server_app as factory

    return factory(app_dir)


def client_app(extra_actions: Any = ()) -> ClientApp:
    """The ClientApp factory (see ``fedmtl.flower.client``)."""
    from fedmtl.flower.client import client_app as factory

    return factory(extra_actions)


__all__ = ["client_app", "server_app"]
