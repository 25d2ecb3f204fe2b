"""Redis from the Debian ``redis-server`` package, without persistence."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import redis

from infra.errors import ConfigurationError, ToolMissingError
from infra.services.base import Listener, LocalService, run_build_step

logger = logging.getLogger(__name__)

SETTING = "CRC_REDIS_URL"
INSTALL_COMMAND = "apt-get update && apt-get install -y redis-server"
PROBE_TIMEOUT_S = 2.0

_REDIS_VERSION = re.compile(r"v=(\S+)")


class RedisService(LocalService):
    """Redis on the host and port of ``CRC_REDIS_URL``; a password in the URL is required on connect."""

    name = "redis"
    process_marker = "redis-server"
    start_timeout_s = 30.0
    stop_timeout_s = 10.0

    @property
    def version(self) -> str:
        """Version of the installed ``redis-server``, or "not installed"."""
        executable = shutil.which("redis-server")
        if executable is None:
            return "not installed"
        output = subprocess.run([executable, "--version"], capture_output=True, text=True, check=False).stdout
        match = _REDIS_VERSION.search(output)
        return match.group(1) if match else "unknown"

    @property
    def host_port(self) -> tuple[str, int]:
        """Host and port from the Redis URL."""
        url = urlsplit(self.settings.redis_url)
        if url.scheme != "redis":
            raise ConfigurationError(
                f"{SETTING} has scheme {url.scheme!r}, but the local Redis serves plain redis:// only; "
                "set it like redis://127.0.0.1:16379/0"
            )
        if url.hostname is None or url.port is None:
            raise ConfigurationError(f"{SETTING} names no host and port; set it like redis://127.0.0.1:16379/0")
        return url.hostname, url.port

    @property
    def address(self) -> str:
        """Host and port clients connect to."""
        host, port = self.host_port
        return f"{host}:{port}"

    def listeners(self) -> list[Listener]:
        """Return the one Redis port."""
        host, port = self.host_port
        return [Listener(host, port, SETTING, "Redis")]

    def provision(self) -> bool:
        """Install ``redis-server`` with apt-get when it is missing and this process runs as root."""
        if shutil.which("redis-server") is not None:
            return False

        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise ToolMissingError(f"redis-server not found on PATH; install it with `sudo sh -c '{INSTALL_COMMAND}'`")

        logger.info("service=redis installing package=redis-server with apt-get")
        log_path = self.run_dir / "provision.log"
        environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "redis-server"]):
            run_build_step(argv, service=self.name, log_path=log_path, cwd=Path("/"), env=environment, timeout_s=900)
        return True

    def prepare_run(self) -> None:
        """Write ``redis.conf`` (owner-only, because it may hold the password)."""
        super().prepare_run()
        host, port = self.host_port
        lines = [
            f"bind {host}",
            f"port {port}",
            "daemonize no",
            'save ""',
            "appendonly no",
            f"dir {self.data_dir}",
            'logfile ""',
        ]
        password = urlsplit(self.settings.redis_url).password
        if password:
            lines.append(f"requirepass {password}")

        self.config_path.touch(mode=0o600)
        self.config_path.chmod(0o600)
        self.config_path.write_text("\n".join(lines) + "\n")

    @property
    def config_path(self) -> Path:
        """Config file written at each start."""
        return self.run_dir / "redis.conf"

    def command(self) -> list[str]:
        """Return the server command line."""
        return ["redis-server", str(self.config_path)]

    def is_ready(self) -> bool:
        """Return whether the server replies to PING."""
        client = redis.Redis.from_url(
            self.settings.redis_url,
            socket_timeout=PROBE_TIMEOUT_S,
            socket_connect_timeout=PROBE_TIMEOUT_S,
        )
        try:
            return bool(client.ping())
        except redis.RedisError as error:
            logger.debug("service=redis probe failed error=%s", error)
            return False
        finally:
            client.close()
