"""Detached processes, pidfiles, port checks and log tails for the local stack.

Linux only: port owners and command lines are read from ``/proc``.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from infra.errors import ConfigurationError, ServiceStopError

logger = logging.getLogger(__name__)

# Children started by this interpreter, kept so that they can be reaped (because
# os.kill(pid, 0) succeeds on a zombie) and so that exit codes can be read.
_children: dict[int, subprocess.Popen[bytes]] = {}

_TCP_LISTEN_STATE = "0A"


def spawn_detached(
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str],
    cwd: Path,
) -> int:
    """Start a process in its own session, stdout and stderr appended to ``log_path``.

    The process outlives the launcher. Returns its pid, which is also its
    process group id.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        log_file.write(f"--- crc-medai stack: starting at {stamp}: {' '.join(argv)}\n".encode())
        log_file.flush()
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=dict(env),
            start_new_session=True,
            close_fds=True,
        )
    _children[process.pid] = process
    return process.pid


def exit_code(pid: int) -> int | None:
    """Return the exit code of a child this interpreter started, if it has exited."""
    process = _children.get(pid)
    if process is None:
        return None
    return process.poll()


def is_alive(pid: int) -> bool:
    """Return whether ``pid`` runs and is not a zombie."""
    process = _children.get(pid)
    if process is not None:
        return process.poll() is None

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True

    return _process_state(pid) not in ("Z", "X", None)


def _process_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name in brackets may contain spaces, so split after its closing bracket.
    return stat.rpartition(")")[2].split()[0]


def command_line(pid: int) -> str:
    """Return the command line of ``pid`` with spaces between arguments, or "" if unknown."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def read_pidfile(path: Path) -> int | None:
    """Return the pid stored in ``path``, or None when the file is missing or invalid."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    if not text.isdigit():
        logger.warning("ignoring invalid pidfile path=%s content=%r", path, text[:40])
        return None
    return int(text)


def write_pidfile(path: Path, pid: int) -> None:
    """Write ``pid`` to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".pid.partial")
    partial.write_text(f"{pid}\n")
    partial.replace(path)


def terminate(pid: int, *, timeout_s: float, name: str) -> None:
    """Send SIGTERM to the process group of ``pid``, then SIGKILL after ``timeout_s``.

    Raises:
        ServiceStopError: The process still runs 5 s after SIGKILL.
    """
    if _signal_group(pid, signal.SIGTERM) and _wait_for_exit(pid, timeout_s):
        return

    if is_alive(pid):
        logger.warning("service=%s pid=%d ignored SIGTERM for %.0f s, sending SIGKILL", name, pid, timeout_s)
        _signal_group(pid, signal.SIGKILL)
        if not _wait_for_exit(pid, 5.0):
            raise ServiceStopError(
                f"{name} (pid {pid}) still runs after SIGKILL; check it with `ps -o pid,stat,args -p {pid}`"
            )


def _signal_group(pid: int, sig: signal.Signals) -> bool:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        # The process is not a group leader we may signal; fall back to the process itself.
        os.kill(pid, sig)
    return True


def _wait_for_exit(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not is_alive(pid):
            return True
        time.sleep(0.1)
    return not is_alive(pid)


def port_is_free(host: str, port: int, *, setting: str) -> bool:
    """Return whether ``host:port`` can be bound now.

    Raises:
        ConfigurationError: ``host`` is not an address of this machine.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return False
            if error.errno == errno.EADDRNOTAVAIL:
                raise ConfigurationError(
                    f"host {host!r} in {setting} is not an address of this machine, so the local stack "
                    f"cannot listen on it; set {setting} to 127.0.0.1:{port}"
                ) from error
            raise
    return True


def accepts_connections(host: str, port: int, *, timeout_s: float = 1.0) -> bool:
    """Return whether a TCP connect to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def port_owner(port: int) -> str | None:
    """Describe the process listening on TCP ``port`` ("pid 123 (java ...)"), or None."""
    inodes = _listening_inodes(port)
    if not inodes:
        return None

    sockets = {f"socket:[{inode}]" for inode in inodes}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and sockets & _open_files(proc):
            pid = int(proc.name)
            return f"pid {pid} ({command_line(pid)[:160]})"
    return None


def _open_files(proc: Path) -> set[str]:
    """Return the targets of a process's file descriptors that can be read."""
    targets = set()
    try:
        descriptors = list((proc / "fd").iterdir())
    except OSError:
        return targets
    for descriptor in descriptors:
        # A descriptor can close between listing and reading (the listing's own one always does).
        try:
            targets.add(os.readlink(descriptor))
        except OSError:
            continue
    return targets


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == _TCP_LISTEN_STATE:
                inodes.add(fields[9])
    return inodes


def log_size(path: Path) -> int:
    """Return the size of a log file in bytes, 0 when it does not exist yet."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def tail(path: Path, *, offset: int = 0, lines: int = 20) -> str:
    """Return the last ``lines`` lines of ``path`` written after byte ``offset``."""
    try:
        with path.open("rb") as log_file:
            log_file.seek(offset)
            text = log_file.read().decode(errors="replace")
    except FileNotFoundError:
        return "(log file not written yet)"
    return "\n".join(text.splitlines()[-lines:])
