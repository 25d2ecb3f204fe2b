"""Errors of the local stack launcher, all under :class:`StackError`."""

from __future__ import annotations

from pathlib import Path

from crc_medai.errors import CrcMedAiError


class StackError(CrcMedAiError):
    """Root of every error the local stack launcher raises."""


class ToolMissingError(StackError):
    """A program the launcher needs (java, mvn, go, redis-server) is not installed."""


class ProvisionError(StackError):
    """Downloading or building a service into the cache failed."""


class ConfigurationError(StackError):
    """A setting cannot be used for a local service, for example a remote host."""


class PortInUseError(StackError):
    """A port a service needs is taken by a process the launcher did not start."""

    def __init__(self, message: str, *, port: int, setting: str) -> None:
        super().__init__(message)
        self.port = port
        self.setting = setting


class ServiceStartError(StackError):
    """A service exited during start-up or was not ready in time."""

    def __init__(self, message: str, *, service: str, log_path: Path) -> None:
        super().__init__(message)
        self.service = service
        self.log_path = log_path


class ServiceStopError(StackError):
    """A service did not stop, even after SIGKILL."""
