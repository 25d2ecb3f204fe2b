"""Start and stop CRC-MedAI services as child processes (demo, tests, benchmarks)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from crc_medai.settings import Settings

logger = logging.getLogger(__name__)

# Seconds a service gets to shut down cleanly after SIGTERM before it is killed.
STOP_TIMEOUT_S = 20.0


def settings_env(settings: Settings) -> dict[str, str]:
    """Return the ``CRC_*`` environment variables that reproduce ``settings`` in a child process."""
    env = {}
    for name, value in settings.model_dump().items():
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"CRC_{name.upper()}"] = str(value)
    return env


def start_service(name: str, settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``crc-medai NAME`` with ``settings``; its output goes to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **settings_env(settings)}
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "crc_medai.cli", name],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    logger.info("started service=%s pid=%d log=%s", name, process.pid, log_path)
    return process


def stop_service(process: subprocess.Popen[bytes], name: str = "service") -> int:
    """Stop a service with SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT_S`; return its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning(
                "service did not stop in %.0f s, killing service=%s pid=%d", STOP_TIMEOUT_S, name, process.pid
            )
            process.kill()
            process.wait()
    logger.info("stopped service=%s pid=%d returncode=%s", name, process.pid, process.returncode)
    return process.returncode


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_ready(processes: dict[str, tuple[subprocess.Popen[bytes], str]], timeout_s: float) -> list[str]:
    """Poll each service's /readyz until it returns 200; return the names that never did.

    ``processes`` maps a service name to its process and the base URL of its metrics
    server. A service that exits while waiting counts as not ready.
    """
    deadline = time.monotonic() + timeout_s
    waiting = dict(processes)
    while waiting and time.monotonic() < deadline:
        for name, (process, url) in list(waiting.items()):
            if process.poll() is not None or _answers_ready(url):
                waiting.pop(name)
        time.sleep(0.2)
    not_ready = [name for name, (process, _) in processes.items() if name in waiting or process.poll() is not None]
    for name in not_ready:
        logger.warning("service not ready service=%s timeout_s=%.0f", name, timeout_s)
    return not_ready


def _answers_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=1.0) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False
