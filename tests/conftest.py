"""Fixtures shared by the test suite: the real local stack and isolated settings."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from crc_medai.kafka import create_producer, ensure_topics
from crc_medai.services import start_service, stop_service
from crc_medai.settings import Settings, get_settings


@pytest.fixture(scope="session")
def stack() -> Settings:
    """Start (or reuse) the local Kafka, MinIO and Redis once per test session."""
    from infra.stack import ensure_up

    settings = get_settings()
    ensure_up(settings)
    return settings


def isolated_settings(stack: Settings, output_dir: Path) -> Settings:
    """Return settings with a topic prefix, consumer groups and a bucket of their own."""
    tag = uuid.uuid4().hex[:10]
    return stack.model_copy(
        update={"topic_prefix": f"test-{tag}.", "heatmap_bucket": f"test-{tag}", "output_dir": output_dir}
    )


@pytest.fixture
def settings(stack: Settings, tmp_path: Path) -> Settings:
    """Settings isolated for one test."""
    return isolated_settings(stack, tmp_path / "out")


class RunningServices:
    """Services started for a test; their logs are shown when a test fails."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.processes = {}

    def start(self, *names: str) -> None:
        for name in names:
            self.processes[name] = start_service(name, self.settings, self.log_dir / f"{name}.log")

    def stop(self) -> None:
        for name, process in self.processes.items():
            stop_service(process, name)

    def any_stopped(self) -> bool:
        """Tell whether a service has exited, so a test can stop waiting for its results."""
        return any(process.poll() is not None for process in self.processes.values())

    def logs(self) -> str:
        parts = []
        for name in self.processes:
            path = self.log_dir / f"{name}.log"
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"--- {name} ({path}) ---\n{text[-4000:]}")
        return "\n".join(parts)


def running_services(settings: Settings, log_dir: Path, names: tuple[str, ...]) -> Iterator[RunningServices]:
    """Start ``names`` with ``settings`` and stop them afterwards, printing their logs."""
    services = RunningServices(settings, log_dir)
    services.start(*names)
    try:
        yield services
    finally:
        services.stop()
        print(services.logs())


async def send_all(settings: Settings, records: list[tuple[str, bytes, bytes | None]]) -> None:
    """Publish ``(logical topic, key, value)`` records in order, creating the topics first."""
    await ensure_topics(settings)
    producer = create_producer(settings)
    await producer.start()
    try:
        for topic, key, value in records:
            await producer.send_and_wait(settings.topic(topic), value=value, key=key)
    finally:
        await producer.stop()
