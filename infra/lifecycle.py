"""Start, wait for, stop and probe one local service."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from infra.errors import PortInUseError, ServiceStartError
from infra.processes import (
    command_line,
    exit_code,
    is_alive,
    log_size,
    port_is_free,
    port_owner,
    read_pidfile,
    spawn_detached,
    tail,
    terminate,
    write_pidfile,
)
from infra.services.base import LocalService

logger = logging.getLogger(__name__)

MAX_PROBE_INTERVAL_S = 1.0


@dataclass(frozen=True)
class ServiceInfo:
    """A service of the local stack after ``up``.

    Attributes:
        started: True when this ``up`` started the process, False when it already ran.
    """

    name: str
    version: str
    address: str
    pid: int
    started: bool
    log_path: Path


def running_pid(service: LocalService) -> int | None:
    """Return the pid from the service's pidfile if that process still runs; drop a stale pidfile."""
    pid = read_pidfile(service.pid_path)
    if pid is None:
        return None

    if is_alive(pid) and service.process_marker in command_line(pid):
        return pid

    logger.info("service=%s removing stale pidfile pid=%d path=%s", service.name, pid, service.pid_path)
    service.pid_path.unlink(missing_ok=True)
    return None


def check_ports(service: LocalService) -> None:
    """Check that every port of a service that is not running can be bound.

    Raises:
        PortInUseError: A port is taken; the message names the port, its owner
            if visible, and the setting that moves it.
    """
    for listener in service.listeners():
        if port_is_free(listener.host, listener.port, setting=listener.setting):
            continue

        owner = port_owner(listener.port) or "a process this user cannot see"
        raise PortInUseError(
            f"port {listener.port} on {listener.host} ({service.name} {listener.role}) is in use by {owner}, "
            f"which this launcher did not start (no pidfile at {service.pid_path}); stop that process "
            f"or set {listener.setting} to a free port",
            port=listener.port,
            setting=listener.setting,
        )


@dataclass(frozen=True)
class StartedProcess:
    """A process spawned by :func:`start`.

    Attributes:
        log_offset: Size of the log file before the start, so that an error
            shows only this start's lines.
        started_at: ``time.monotonic()`` at spawn.
    """

    pid: int
    log_offset: int
    started_at: float


def start(service: LocalService) -> StartedProcess:
    """Write the service's config and spawn it detached; write its pidfile."""
    service.prepare_run()
    log_offset = log_size(service.log_path)
    started_at = time.monotonic()
    pid = spawn_detached(
        service.command(),
        log_path=service.log_path,
        env=service.environment(),
        cwd=service.run_dir,
    )
    write_pidfile(service.pid_path, pid)
    logger.info("service=%s started pid=%d address=%s log=%s", service.name, pid, service.address, service.log_path)
    return StartedProcess(pid=pid, log_offset=log_offset, started_at=started_at)


def wait_until_ready(
    service: LocalService,
    pid: int,
    *,
    started_at: float,
    log_offset: int,
    stop_on_timeout: bool,
) -> float:
    """Probe the service until it is ready; return the seconds since ``started_at``.

    Raises:
        ServiceStartError: The process exited, or was not ready within the
            service's start timeout counted from ``started_at``. With
            ``stop_on_timeout`` the process is stopped first, so that the next
            ``up`` starts clean.
    """
    deadline = started_at + service.start_timeout_s
    interval = 0.1

    while not service.is_ready():
        if not is_alive(pid):
            service.pid_path.unlink(missing_ok=True)
            raise _start_error(service, f"exited during start-up (exit code {exit_code(pid)})", log_offset)

        if time.monotonic() > deadline:
            reason = f"did not respond at {service.address} within {service.start_timeout_s:.0f} s"
            if stop_on_timeout:
                terminate(pid, timeout_s=service.stop_timeout_s, name=service.name)
                service.pid_path.unlink(missing_ok=True)
                reason += ", so it was stopped"
            else:
                reason += f"; stop it with `crc-medai stack down` (pid {pid})"
            raise _start_error(service, reason, log_offset)

        time.sleep(interval)
        interval = min(interval * 1.5, MAX_PROBE_INTERVAL_S)

    return time.monotonic() - started_at


def _start_error(service: LocalService, reason: str, log_offset: int) -> ServiceStartError:
    return ServiceStartError(
        f"{service.name} {reason}; last lines of {service.log_path}:\n{tail(service.log_path, offset=log_offset)}",
        service=service.name,
        log_path=service.log_path,
    )


def stop(service: LocalService) -> bool:
    """Stop the service if this launcher started it; return whether a process was stopped."""
    pid = running_pid(service)
    if pid is None:
        logger.info("service=%s not running (no live pidfile at %s)", service.name, service.pid_path)
        return False

    started_at = time.monotonic()
    terminate(pid, timeout_s=service.stop_timeout_s, name=service.name)
    service.pid_path.unlink(missing_ok=True)
    logger.info("service=%s stopped pid=%d seconds=%.1f", service.name, pid, time.monotonic() - started_at)
    return True


def probe(service: LocalService) -> dict[str, object]:
    """Return the status of one service: address, pid, whether it runs and is ready, log path."""
    pid = running_pid(service)
    return {
        "version": service.version,
        "address": service.address,
        "pid": pid,
        "running": pid is not None,
        "ready": service.is_ready(),
        "log": str(service.log_path),
    }
