"""Where the local stack keeps its downloads, builds, data, logs and pidfiles.

``CRC_STACK_HOME`` (default ``~/.cache/crc-medai``) contains one folder per
service and version (``kafka-3.9.1/``, ``minio-<version>/``) and ``run/`` with
one folder per service for its data, log and pidfile.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

STACK_HOME_ENV = "CRC_STACK_HOME"
DEFAULT_STACK_HOME = Path.home() / ".cache" / "crc-medai"


@dataclass(frozen=True)
class StackLayout:
    """Cache and run folders of one local stack.

    Args:
        cache_root: Downloads and builds, shared by every stack that uses it.
        run_root: Data, logs and pidfiles of one running stack.
    """

    cache_root: Path
    run_root: Path

    @classmethod
    def from_env(cls) -> StackLayout:
        """Build the layout under ``CRC_STACK_HOME``, read at every call."""
        home = Path(os.environ.get(STACK_HOME_ENV) or DEFAULT_STACK_HOME).expanduser().resolve()
        return cls(cache_root=home, run_root=home / "run")

    def cache_dir(self, service: str, version: str) -> Path:
        """Return the cache folder of one service version, for example ``kafka-3.9.1``."""
        return self.cache_root / f"{service}-{version}"

    def run_dir(self, service: str) -> Path:
        """Return the folder for a service's data, log and pidfile."""
        return self.run_root / service

    def log_path(self, service: str) -> Path:
        """Return the file that receives a service's stdout and stderr."""
        return self.run_dir(service) / f"{service}.log"

    def pid_path(self, service: str) -> Path:
        """Return the pidfile that marks a service as started by this launcher."""
        return self.run_dir(service) / f"{service}.pid"

    @property
    def lock_path(self) -> Path:
        """File locked while ``up`` or ``down`` changes this stack."""
        return self.run_root / "stack.lock"
