"""Aggregation of client updates: weighted means and server-side optimizers."""

from fedmtl.aggregation.mean import weighted_mean
from fedmtl.aggregation.server_opt import ServerOptParams, server_opt_init, server_opt_step

__all__ = ["ServerOptParams", "server_opt_init", "server_opt_step", "weighted_mean"]
