"""Local stack launcher: Kafka (KRaft), MinIO and Redis as real servers, without Docker.

``up`` provisions each server once into ``CRC_STACK_HOME`` (default
``~/.cache/crc-medai``), starts it detached, and waits until it responds to a real
request. It is idempotent: a service that this launcher started and that is
ready is left alone. ``down`` stops what ``up`` started, found by pidfile.
Addresses come from :class:`crc_medai.settings.Settings`.

Usage::

    python -m infra.stack up [--only kafka redis]
    python -m infra.stack status [--json]
    python -m infra.stack down
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from crc_medai.logs import configure_logging
from crc_medai.settings import Settings, get_settings
from infra import lifecycle
from infra.errors import ConfigurationError, StackError
from infra.layout import StackLayout
from infra.lifecycle import ServiceInfo
from infra.services import SERVICE_CLASSES, LocalService

logger = logging.getLogger(__name__)

SERVICE_NAMES: tuple[str, ...] = tuple(SERVICE_CLASSES)


@dataclass(frozen=True)
class StackInfo:
    """The running local stack after ``up``: one :class:`ServiceInfo` per service."""

    layout: StackLayout
    services: dict[str, ServiceInfo]

    def address(self, service: str) -> str:
        """Return the address of one service, for example ``address("kafka")``."""
        return self.services[service].address


def ensure_up(
    settings: Settings | None = None,
    *,
    layout: StackLayout | None = None,
    services: Iterable[str] | None = None,
) -> StackInfo:
    """Provision and start the local stack; return once every service is ready.

    Args:
        settings: Addresses and MinIO credentials; ``get_settings()`` when None.
        layout: Cache and run folders; ``CRC_STACK_HOME`` when None.
        services: Names to start (``kafka``, ``minio``, ``redis``); all when None.

    Raises:
        StackError: A tool is missing, a port is taken, provisioning failed or
            a service did not come up; the message states what to do.
    """
    layout = layout or StackLayout.from_env()
    selected = _build_services(settings or get_settings(), layout, services)
    started_at = time.monotonic()

    with _stack_lock(layout):
        running = {service.name: lifecycle.running_pid(service) for service in selected}
        to_start = [service for service in selected if running[service.name] is None]

        # Check every port before any long download or build, so a conflict fails fast.
        for service in to_start:
            lifecycle.check_ports(service)
        for service in to_start:
            _provision(service)

        spawned = {service.name: lifecycle.start(service) for service in to_start}
        infos = {service.name: _wait(service, running[service.name], spawned.get(service.name)) for service in selected}

    logger.info("stack up services=%s seconds=%.1f", ",".join(infos), time.monotonic() - started_at)
    return StackInfo(layout=layout, services=infos)


def stop(
    settings: Settings | None = None,
    *,
    layout: StackLayout | None = None,
    services: Iterable[str] | None = None,
) -> list[str]:
    """Stop the services this launcher started; return the names of those stopped."""
    layout = layout or StackLayout.from_env()
    selected = _build_services(settings or get_settings(), layout, services)

    with _stack_lock(layout):
        return [service.name for service in reversed(selected) if lifecycle.stop(service)]


def status(
    settings: Settings | None = None,
    *,
    layout: StackLayout | None = None,
    services: Iterable[str] | None = None,
) -> dict[str, dict[str, object]]:
    """Return each service's version, address, pid, whether it runs and whether it is ready."""
    layout = layout or StackLayout.from_env()
    selected = _build_services(settings or get_settings(), layout, services)
    return {service.name: lifecycle.probe(service) for service in selected}


def _build_services(settings: Settings, layout: StackLayout, names: Iterable[str] | None) -> list[LocalService]:
    requested = list(SERVICE_NAMES if names is None else names)
    unknown = sorted(set(requested) - set(SERVICE_NAMES))
    if unknown:
        raise ConfigurationError(f"unknown service(s) {', '.join(unknown)}; choose from {', '.join(SERVICE_NAMES)}")
    return [SERVICE_CLASSES[name](settings, layout) for name in SERVICE_NAMES if name in requested]


def _provision(service: LocalService) -> None:
    started_at = time.monotonic()
    if service.provision():
        logger.info(
            "service=%s provisioned version=%s seconds=%.1f",
            service.name,
            service.version,
            time.monotonic() - started_at,
        )
    else:
        logger.info("service=%s cached version=%s", service.name, service.version)


def _wait(service: LocalService, running_pid: int | None, spawned: lifecycle.StartedProcess | None) -> ServiceInfo:
    """Wait for a service spawned by this call (``spawned``) or one that already ran (``running_pid``)."""
    if spawned is not None:
        pid = spawned.pid
        seconds = lifecycle.wait_until_ready(
            service, pid, started_at=spawned.started_at, log_offset=spawned.log_offset, stop_on_timeout=True
        )
        logger.info("service=%s ready address=%s pid=%d seconds=%.1f", service.name, service.address, pid, seconds)
    else:
        assert running_pid is not None, "a service not spawned by this call was running before it"
        pid = running_pid
        lifecycle.wait_until_ready(service, pid, started_at=time.monotonic(), log_offset=0, stop_on_timeout=False)
        logger.info("service=%s already running address=%s pid=%d", service.name, service.address, pid)

    return ServiceInfo(
        name=service.name,
        version=service.version,
        address=service.address,
        pid=pid,
        started=spawned is not None,
        log_path=service.log_path,
    )


@contextmanager
def _stack_lock(layout: StackLayout) -> Iterator[None]:
    """Hold an exclusive lock on the run folder, so that two launchers never start the same service."""
    layout.run_root.mkdir(parents=True, exist_ok=True)
    with layout.lock_path.open("a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for lock=%s, held by another launcher", layout.lock_path)
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _format_table(rows: list[dict[str, object]]) -> str:
    columns = ["service", "address", "pid", "state", "log"]
    widths = {column: max(len(column), *(len(str(row[column])) for row in rows)) for column in columns}
    lines = ["  ".join(column.ljust(widths[column]) for column in columns)]
    lines += ["  ".join(str(row[column]).ljust(widths[column]) for column in columns) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def _status_rows(report: dict[str, dict[str, object]]) -> list[dict[str, object]]:
    rows = []
    for name, entry in report.items():
        if entry["ready"]:
            state = "ready" if entry["running"] else "ready (not started by this launcher)"
        else:
            state = "not ready" if entry["running"] else "stopped"
        rows.append(
            {
                "service": name,
                "address": entry["address"],
                "pid": entry["pid"] or "-",
                "state": state,
                "log": entry["log"],
            }
        )
    return rows


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="crc-medai stack",
        description=(
            "Start, stop or inspect the local Kafka, MinIO and Redis. Downloads, builds, data and logs "
            "live under CRC_STACK_HOME (default ~/.cache/crc-medai); addresses come from CRC_* settings."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("up", "provision and start the services, then wait until each is ready (idempotent)"),
        ("down", "stop the services this launcher started"),
        ("status", "print each service's address, pid and whether it is ready; exit code 1 unless all are ready"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument(
            "--only", nargs="+", choices=SERVICE_NAMES, metavar="SERVICE", help="services to act on (default: all)"
        )
    commands.choices["status"].add_argument("--json", action="store_true", help="print the status as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run ``up``, ``down`` or ``status``; return the process exit code."""
    args = _parse_args(argv)
    configure_logging()

    try:
        if args.command == "up":
            ensure_up(services=args.only)
            report = status(services=args.only)
        elif args.command == "down":
            stop(services=args.only)
            report = status(services=args.only)
        else:
            report = status(services=args.only)
    except StackError as error:
        print(f"crc-medai stack {args.command}: {error}", file=sys.stderr)
        return 1

    if getattr(args, "json", False):
        print(json.dumps(report, indent=2))
    else:
        print(_format_table(_status_rows(report)))

    if args.command == "status":
        return 0 if all(entry["ready"] for entry in report.values()) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
