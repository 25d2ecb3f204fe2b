"""Local stack launcher: real Kafka, MinIO and Redis processes.

Tests that start or stop servers use a run folder and ports of their own, so
the shared stack (``CRC_STACK_HOME``, default ports) is never stopped here.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydantic import SecretStr

from crc_medai.settings import Settings
from infra.errors import ConfigurationError, PortInUseError, ServiceStartError, ToolMissingError
from infra.layout import StackLayout
from infra.processes import is_alive, write_pidfile
from infra.services.base import split_host_port
from infra.services.kafka import new_cluster_id
from infra.stack import SERVICE_NAMES, ensure_up, main, status, stop


def free_port() -> int:
    """Return a TCP port that is free now on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_port_pair() -> int:
    """Return a port that is free now, with the next port free too (Kafka client + controller)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports found on 127.0.0.1")


def private_settings(base: Settings) -> Settings:
    """Return settings that point every service at free ports of its own."""
    return base.model_copy(
        update={
            "kafka_bootstrap_servers": f"127.0.0.1:{free_port_pair()}",
            "minio_endpoint": f"127.0.0.1:{free_port_pair()}",
            "redis_url": f"redis://127.0.0.1:{free_port()}/0",
        }
    )


def private_layout(tmp_path: Path) -> StackLayout:
    """Return a layout that shares the download cache but has its own run folder."""
    return StackLayout(cache_root=StackLayout.from_env().cache_root, run_root=tmp_path / "run")


@contextmanager
def listening_socket(port: int) -> Iterator[socket.socket]:
    """Listen on 127.0.0.1:``port`` as a process that is not a stack service."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))
        server.listen()
        yield server


# Unit cases: no servers.


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:19092", ("127.0.0.1", 19092)),
        ("localhost:1", ("localhost", 1)),
        ("[::1]:9000", ("::1", 9000)),
    ],
)
def test_split_host_port_valid(value: str, expected: tuple[str, int]) -> None:
    assert split_host_port(value, setting="CRC_X") == expected


@pytest.mark.parametrize("value", ["127.0.0.1", "127.0.0.1:port", ":9092", "a:1,b:2"])
def test_split_host_port_invalid(value: str) -> None:
    with pytest.raises(ConfigurationError, match="CRC_X"):
        split_host_port(value, setting="CRC_X")


def test_cluster_id_format() -> None:
    ids = {new_cluster_id() for _ in range(200)}

    assert len(ids) == 200
    for cluster_id in ids:
        assert len(cluster_id) == 22
        assert set(cluster_id) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")


def test_unknown_service_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="postgres"):
        ensure_up(Settings(), layout=private_layout(tmp_path), services=["postgres"])


# The shared stack: started once per session by the `stack` fixture in conftest.py.


@pytest.mark.integration
def test_shared_stack_all_ready(stack: Settings) -> None:
    report = status(stack)

    assert set(report) == set(SERVICE_NAMES)
    for name, entry in report.items():
        assert entry["ready"] is True, f"{name} is not ready: {entry}"
        assert entry["running"] is True, f"{name} was not started by the launcher: {entry}"
        assert isinstance(entry["pid"], int)


@pytest.mark.integration
def test_up_again_is_noop(stack: Settings) -> None:
    before = status(stack)

    info = ensure_up(stack)

    for name, service in info.services.items():
        assert service.started is False, f"{name} was started again"
        assert service.pid == before[name]["pid"]
    assert info.address("kafka") == stack.kafka_bootstrap_servers
    assert info.address("minio") == stack.minio_endpoint


@pytest.mark.integration
def test_cli_status_json(stack: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    exit_code = main(["status", "--json"])

    report = json.loads(capsys.readouterr().out)
    assert exit_code == 0
    assert set(report) == set(SERVICE_NAMES)
    assert all(entry["ready"] for entry in report.values())


# Private stacks: own run folder and ports.


@pytest.mark.integration
@pytest.mark.parametrize(
    ("service", "setting", "update", "port_offset"),
    [
        ("redis", "CRC_REDIS_URL", "redis_url", 0),
        ("minio", "CRC_MINIO_ENDPOINT", "minio_endpoint", 0),
        ("minio", "CRC_MINIO_ENDPOINT", "minio_endpoint", 1),
        ("kafka", "CRC_KAFKA_BOOTSTRAP_SERVERS", "kafka_bootstrap_servers", 0),
        ("kafka", "CRC_KAFKA_BOOTSTRAP_SERVERS", "kafka_bootstrap_servers", 1),
    ],
)
def test_port_in_use_named(tmp_path: Path, service: str, setting: str, update: str, port_offset: int) -> None:
    port = free_port_pair()
    address = f"redis://127.0.0.1:{port}/0" if service == "redis" else f"127.0.0.1:{port}"
    settings = Settings().model_copy(update={update: address})
    taken = port + port_offset

    with listening_socket(taken), pytest.raises(PortInUseError) as raised:
        ensure_up(settings, layout=private_layout(tmp_path), services=[service])

    message = str(raised.value)
    assert raised.value.port == taken
    assert raised.value.setting == setting
    assert f"port {taken}" in message
    assert setting in message
    assert f"pid {os.getpid()}" in message


@pytest.mark.integration
def test_host_not_local_rejected(tmp_path: Path) -> None:
    # 192.0.2.0/24 is reserved for documentation (RFC 5737), so no machine has it.
    settings = Settings().model_copy(update={"redis_url": "redis://192.0.2.1:16379/0"})

    with pytest.raises(ConfigurationError, match="CRC_REDIS_URL"):
        ensure_up(settings, layout=private_layout(tmp_path), services=["redis"])


@pytest.mark.parametrize(("service", "tool"), [("kafka", "java"), ("minio", "go")])
def test_missing_tool_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, service: str, tool: str) -> None:
    # An empty cache forces provisioning, and an empty PATH hides every tool.
    layout = StackLayout(cache_root=tmp_path / "cache", run_root=tmp_path / "run")
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))

    with pytest.raises(ToolMissingError) as raised:
        ensure_up(private_settings(Settings()), layout=layout, services=[service])

    message = str(raised.value)
    assert message.startswith(f"{tool} not found on PATH")
    assert "install" in message


@pytest.mark.integration
def test_stale_pidfile_replaced(tmp_path: Path) -> None:
    settings = private_settings(Settings())
    layout = private_layout(tmp_path)
    # A live pid that is not redis-server, as after a pid is reused.
    write_pidfile(layout.pid_path("redis"), os.getpid())

    try:
        info = ensure_up(settings, layout=layout, services=["redis"])
        assert info.services["redis"].started is True
        assert info.services["redis"].pid != os.getpid()
    finally:
        stop(settings, layout=layout, services=["redis"])


@pytest.mark.integration
def test_start_failure_shows_log(stack: Settings, tmp_path: Path) -> None:
    # MinIO exits at once when the root password is shorter than 8 characters.
    settings = private_settings(stack).model_copy(update={"minio_secret_key": SecretStr("short")})
    layout = private_layout(tmp_path)

    with pytest.raises(ServiceStartError) as raised:
        ensure_up(settings, layout=layout, services=["minio"])

    message = str(raised.value)
    assert "exited during start-up" in message
    assert "MINIO_ROOT_PASSWORD" in message
    assert str(layout.log_path("minio")) in message
    assert not layout.pid_path("minio").exists()


@pytest.mark.integration
def test_down_then_up_private_stack(stack: Settings, tmp_path: Path) -> None:
    settings = private_settings(stack)
    layout = private_layout(tmp_path)

    try:
        first = ensure_up(settings, layout=layout)
        assert all(service.started for service in first.services.values())
        assert all(entry["ready"] for entry in status(settings, layout=layout).values())

        stopped = stop(settings, layout=layout)
        assert sorted(stopped) == sorted(SERVICE_NAMES)
        for name, entry in status(settings, layout=layout).items():
            assert entry["running"] is False, name
            assert entry["ready"] is False, name
            assert not layout.pid_path(name).exists()
            assert not is_alive(first.services[name].pid)

        # A second start reuses the formatted Kafka storage and the MinIO data folder.
        second = ensure_up(settings, layout=layout)
        assert all(service.started for service in second.services.values())
        assert all(entry["ready"] for entry in status(settings, layout=layout).values())
    finally:
        stop(settings, layout=layout)
