"""Settings read from the environment: invalid values stop a command with the variable named."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from crc_medai.cli import main
from crc_medai.errors import SettingsError
from crc_medai.settings import Settings, describe_invalid_settings, get_settings


@pytest.fixture(autouse=True)
def fresh_settings() -> Iterator[None]:
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_invalid_number_names_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRC_DETECTION_TRACK_MAX_GAP_S", "abc")

    with pytest.raises(SettingsError, match="CRC_DETECTION_TRACK_MAX_GAP_S='abc': Input should be a valid number"):
        get_settings()


def test_every_invalid_variable_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRC_DETECTION_TRACK_MAX_GAP_S", "abc")
    monkeypatch.setenv("CRC_TOPIC_PARTITIONS", "many")

    with pytest.raises(SettingsError) as caught:
        get_settings()

    lines = str(caught.value).splitlines()
    assert len(lines) == 3
    assert lines[0] == "invalid settings in the environment. Fix these variables and start again:"
    assert any(line.startswith("  CRC_TOPIC_PARTITIONS='many'") for line in lines)
    assert any(line.startswith("  CRC_DETECTION_TRACK_MAX_GAP_S='abc'") for line in lines)


def test_cross_field_check_keeps_its_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRC_DETECTION_TRACK_IDLE_CLOSE_S", "0.5")

    with pytest.raises(SettingsError, match="\n  detection_track_idle_close_s=0.5 is invalid because"):
        get_settings()


def test_secret_value_left_out() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(minio_secret_key=987654321)

    message = describe_invalid_settings(caught.value)

    assert "CRC_MINIO_SECRET_KEY:" in message
    assert "987654321" not in message


def test_command_stops_with_exit_code_2(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CRC_DETECTION_BATCH_SIZE", "0")

    with caplog.at_level(logging.ERROR):
        code = main(["detection"])

    assert code == 2
    assert "CRC_DETECTION_BATCH_SIZE='0': Input should be greater than or equal to 1" in caplog.text
