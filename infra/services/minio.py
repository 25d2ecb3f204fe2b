"""MinIO object store, built once with ``go install`` at a pinned version."""

from __future__ import annotations

import logging
import os
import shutil
import urllib.error
import urllib.request
from http import HTTPStatus
from pathlib import Path

from infra.errors import ConfigurationError
from infra.services.base import Listener, LocalService, require_tool, run_build_step, split_host_port

logger = logging.getLogger(__name__)

MODULE = "github.com/minio/minio"
# MinIO publishes no Go module release tags; this pseudo-version is the commit
# that `go install github.com/minio/minio@latest` resolved to on the proxy.
MINIO_VERSION = "v0.0.0-20260212201848-7aac2a2c5b7c"
SETTING = "CRC_MINIO_ENDPOINT"
BUILD_TIMEOUT_S = 3600
PROBE_TIMEOUT_S = 3.0


class MinioService(LocalService):
    """Single-drive MinIO server; the web console listens on the API port plus one."""

    name = "minio"
    process_marker = "minio"
    start_timeout_s = 60.0

    @property
    def version(self) -> str:
        """Pinned Go module version of MinIO."""
        return MINIO_VERSION

    @property
    def host_port(self) -> tuple[str, int]:
        """Host and port of the S3 API."""
        return split_host_port(self.settings.minio_endpoint, setting=SETTING)

    @property
    def address(self) -> str:
        """S3 endpoint for clients."""
        host, port = self.host_port
        return f"{host}:{port}"

    @property
    def binary(self) -> Path:
        """The ``minio`` executable in the cache."""
        return self.layout.cache_dir(self.name, self.version) / "bin" / "minio"

    def listeners(self) -> list[Listener]:
        """Return the S3 API and console listeners."""
        host, port = self.host_port
        return [
            Listener(host, port, SETTING, "S3 API"),
            Listener(host, port + 1, SETTING, "web console (API port + 1)"),
        ]

    def provision(self) -> bool:
        """Build the pinned MinIO with ``go install`` unless the binary is cached."""
        if self.settings.minio_secure:
            raise ConfigurationError(
                "CRC_MINIO_SECURE=true, but the local MinIO serves plain HTTP; set CRC_MINIO_SECURE=false"
            )
        if self.binary.is_file():
            return False

        go = require_tool("go", install_hint="install Go 1.24 or newer from https://go.dev/dl/")
        cache_dir = self.binary.parent.parent
        partial = cache_dir / "bin.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)

        logger.info(
            "service=minio building module=%s version=%s into=%s (several minutes on a first build)",
            MODULE,
            self.version,
            self.binary,
        )
        run_build_step(
            [go, "install", f"{MODULE}@{self.version}"],
            service=self.name,
            log_path=cache_dir / "provision.log",
            cwd=cache_dir,
            env={**os.environ, "GOBIN": str(partial)},
            timeout_s=BUILD_TIMEOUT_S,
        )
        shutil.rmtree(self.binary.parent, ignore_errors=True)
        partial.replace(self.binary.parent)
        return True

    def command(self) -> list[str]:
        """Return the server command line."""
        host, port = self.host_port
        return [
            str(self.binary),
            "server",
            str(self.data_dir),
            "--address",
            f"{host}:{port}",
            "--console-address",
            f"{host}:{port + 1}",
        ]

    def environment(self) -> dict[str, str]:
        """Return the environment with the root credentials from the settings."""
        return {
            **os.environ,
            "MINIO_ROOT_USER": self.settings.minio_access_key,
            "MINIO_ROOT_PASSWORD": self.settings.minio_secret_key.get_secret_value(),
        }

    def is_ready(self) -> bool:
        """Return whether ``GET /minio/health/live`` returns 200."""
        url = f"http://{self.address}/minio/health/live"
        try:
            with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as response:
                return response.status == HTTPStatus.OK
        except (urllib.error.URLError, OSError) as error:
            logger.debug("service=minio probe failed url=%s error=%s", url, error)
            return False
