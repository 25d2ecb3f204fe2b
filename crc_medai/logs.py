"""Logging set-up: one format for every service, key=value context in messages."""

from __future__ import annotations

import hashlib
import logging
import os

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str | None = None) -> None:
    """Configure the root logger once; ``CRC_LOG_LEVEL`` sets the default level."""
    logging.basicConfig(level=(level or os.environ.get("CRC_LOG_LEVEL", "INFO")).upper(), format=LOG_FORMAT)


def pseudonym(identifier: str) -> str:
    """Return a short stable hash of an identifier, safe to write in logs."""
    return hashlib.sha256(identifier.encode("utf-8")).hexdigest()[:12]
