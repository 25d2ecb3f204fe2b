"""Interface of one local service: provisioning, start command, ports and readiness probe."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from crc_medai.settings import Settings
from infra.errors import ConfigurationError, ProvisionError, ToolMissingError
from infra.layout import StackLayout
from infra.processes import tail

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Listener:
    """One TCP port a service listens on, and the setting that chooses it."""

    host: str
    port: int
    setting: str
    role: str


class LocalService(ABC):
    """A server of the local stack: how to provision, start and probe it.

    Subclasses set the class attributes and implement the abstract methods;
    :mod:`infra.lifecycle` runs them in order.
    """

    #: Short name used for folders, pidfiles and log lines.
    name: str
    #: Token that must appear in the command line of a pid read from the pidfile,
    #: so that a reused pid of an unrelated process is never taken for ours.
    process_marker: str
    #: Seconds from spawn until the readiness probe must succeed.
    start_timeout_s: float = 60.0
    #: Seconds between SIGTERM and SIGKILL on stop.
    stop_timeout_s: float = 20.0

    def __init__(self, settings: Settings, layout: StackLayout) -> None:
        self.settings = settings
        self.layout = layout

    @property
    @abstractmethod
    def version(self) -> str:
        """Version of the server, as pinned or as installed."""

    @property
    @abstractmethod
    def address(self) -> str:
        """Address clients connect to, in the form the settings use."""

    @abstractmethod
    def listeners(self) -> list[Listener]:
        """Return every port the service binds, each with the setting that chooses it."""

    @abstractmethod
    def provision(self) -> bool:
        """Download, build or install the server unless already done; return whether work was done."""

    @abstractmethod
    def command(self) -> list[str]:
        """Return the command line that runs the server in the foreground."""

    @abstractmethod
    def is_ready(self) -> bool:
        """Send one real request to the server; return whether it responded as expected."""

    def prepare_run(self) -> None:
        """Create data folders and config files before a start."""
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def environment(self) -> dict[str, str]:
        """Return the environment of the server process."""
        return dict(os.environ)

    @property
    def run_dir(self) -> Path:
        """Folder for this service's data, log and pidfile."""
        return self.layout.run_dir(self.name)

    @property
    def data_dir(self) -> Path:
        """Folder for the data the server writes."""
        return self.run_dir / "data"

    @property
    def log_path(self) -> Path:
        """File that receives the server's stdout and stderr."""
        return self.layout.log_path(self.name)

    @property
    def pid_path(self) -> Path:
        """Pidfile written when the launcher starts the server."""
        return self.layout.pid_path(self.name)


def split_host_port(address: str, *, setting: str) -> tuple[str, int]:
    """Split ``host:port`` from a setting into its parts.

    Raises:
        ConfigurationError: The value is a list, has no port, or the port is not a number.
    """
    if "," in address:
        raise ConfigurationError(
            f"{setting}={address!r} lists several servers; the local stack runs one, so set one host:port"
        )

    host, separator, port_text = address.strip().rpartition(":")
    if not separator or not host or not port_text.isdigit():
        raise ConfigurationError(f"{setting}={address!r} is not host:port; set it like 127.0.0.1:19092")

    return host.strip("[]"), int(port_text)


def require_tool(executable: str, *, install_hint: str) -> str:
    """Return the path of ``executable`` on PATH.

    Raises:
        ToolMissingError: It is not on PATH; the message states how to install it.
    """
    path = shutil.which(executable)
    if path is None:
        raise ToolMissingError(f"{executable} not found on PATH; {install_hint}")
    return path


def run_build_step(
    argv: Sequence[str],
    *,
    service: str,
    log_path: Path,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout_s: float,
) -> None:
    """Run one download or build command, output appended to ``log_path``.

    Raises:
        ProvisionError: The command failed or ran past ``timeout_s``; the message
            contains the last lines of its output.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    offset = log_path.stat().st_size if log_path.exists() else 0

    with log_path.open("ab") as log_file:
        log_file.write(f"--- crc-medai stack: {' '.join(argv)}\n".encode())
        log_file.flush()
        try:
            completed = subprocess.run(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            raise ProvisionError(
                f"provisioning {service} timed out after {timeout_s:.0f} s running {' '.join(argv)}; "
                f"output in {log_path}:\n{tail(log_path, offset=offset)}"
            ) from error

    if completed.returncode != 0:
        raise ProvisionError(
            f"provisioning {service} failed (exit code {completed.returncode}) running {' '.join(argv)}; "
            f"output in {log_path}:\n{tail(log_path, offset=offset)}"
        )
    logger.info("service=%s step=%s seconds=%.1f", service, argv[0], time.monotonic() - started)
