"""Runtimes move messages between an algorithm's server and client steps."""

from fedmtl.runtime.simulation import RoundResult, Simulator

__all__ = ["RoundResult", "Simulator"]
