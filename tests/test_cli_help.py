"""Help texts of the crc-medai subcommands and the OpenCV log level of the frame producer."""

from __future__ import annotations

import os

import cv2
import pytest

from crc_medai.cli import SERVICES, build_parser, main


def help_text(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", ["what-if", "fhir-view", "fhir-api", "fhir-delivery"])
def test_tool_help_names_subcommand(capsys: pytest.CaptureFixture[str], command: str) -> None:
    text = help_text(capsys, command)

    assert text.startswith(f"usage: crc-medai {command} ")
    assert "``" not in text
    assert "Entry point" not in text


@pytest.mark.parametrize("command", [*SERVICES, "fhir-view", "fhir-delivery"])
def test_worker_help_points_to_settings(capsys: pytest.CaptureFixture[str], command: str) -> None:
    text = " ".join(help_text(capsys, command).split())

    assert "CRC_* environment variables" in text
    assert "crc_medai/settings.py" in text


def test_worker_descriptions_differ() -> None:
    commands = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse has no public accessor

    descriptions = [commands[service].description for service in SERVICES]

    assert all(descriptions)
    assert len(set(descriptions)) == len(SERVICES)


def test_demo_options_have_help(capsys: pytest.CaptureFixture[str]) -> None:
    text = " ".join(help_text(capsys, "demo").split())

    assert "--video VIDEO video file of the procedure" in text
    assert "--records RECORDS folder or file of FHIR R4 patient Bundles" in text


def test_frame_producer_quiets_opencv() -> None:
    import producers.frames  # noqa: F401 - the import sets the log levels

    assert cv2.utils.logging.getLogLevel() == cv2.utils.logging.LOG_LEVEL_ERROR
    assert "OPENCV_FFMPEG_LOGLEVEL" in os.environ
