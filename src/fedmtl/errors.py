"""Errors that reach the user as one line and exit status 2, never as a traceback."""

from __future__ import annotations


class FedmtlError(Exception):
    """Base class for problems caused by the user's input (config, data files, CLI arguments)."""

    exit_code = 2


class ConfigError(FedmtlError):
    """A config key has a bad value, or is unknown."""


class DataError(FedmtlError):
    """A dataset file is missing, truncated or malformed."""


class RunDirError(FedmtlError):
    """A run directory cannot be created, resumed or read."""


class ProtocolError(FedmtlError):
    """A client message does not have the shape or keys the server expects."""
