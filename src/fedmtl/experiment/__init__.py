"""Experiments: the round loop, run directories, reports."""
