"""Describe the machine a measurement ran on, for the evaluation and benchmark pages."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """Return the CPU model from ``/proc/cpuinfo``, or what ``platform`` reports elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def usable_cores() -> int:
    """Return the number of CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine_description() -> str:
    """Return one line: architecture, CPU, cores, Python and the versions of the model libraries."""
    versions = ", ".join(
        f"{package} {importlib.metadata.version(package)}" for package in ("catboost", "lifelines", "scikit-learn")
    )
    return f"{platform.machine()}, {cpu_name()}, {usable_cores()} cores, Python {platform.python_version()}, {versions}"
