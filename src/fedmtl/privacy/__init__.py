"""Differential privacy: client-level DP-FedAvg (fixed or adaptive clipping, noise at the server
or in shares at the clients), sample-level DP-SGD, and a ``dp_accounting`` accountant with a hard
budget. See docs/privacy.md."""

from fedmtl.privacy.accountant import epsilon
from fedmtl.privacy.client_dp import ClientDP, privatize_update

__all__ = ["ClientDP", "epsilon", "privatize_update"]
