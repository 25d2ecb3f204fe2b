"""Poison messages: each bad record lands in its consumer's dead-letter topic and the stream goes on."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from crc_medai.kafka import Record, collect_records
from crc_medai.settings import REPO_ROOT, Settings
from schemas.messages import DetectionResult, Frame, PatientRecord, PrognosisResult, utc_now
from tests.conftest import RunningServices, isolated_settings, running_services, send_all

pytestmark = pytest.mark.integration

RECORDS = REPO_ROOT / "samples" / "records"


def jpeg(image: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".jpg", image)
    assert ok
    return buffer.tobytes()


def frame(sequence: int, image: bytes, width: int = 64, height: int = 48) -> bytes:
    return Frame(
        procedure_id="proc-poison", sequence=sequence, captured_at=utc_now(), width=width, height=height, image=image
    ).to_bytes()


COLOUR = np.random.default_rng(0).integers(0, 255, size=(48, 64, 3), dtype=np.uint8)

# (case, value, expected error type in the dead-letter headers)
BAD_FRAMES = [
    ("not json", b"\x00garbage", "ValidationError"),
    ("wrong schema", json.dumps({"schema_version": 1, "procedure_id": "x"}).encode(), "ValidationError"),
    ("corrupt jpeg", frame(1, b"\xff\xd8\xff\xe0 this is not a jpeg"), "FrameDecodeError"),
    ("zero-byte image", frame(2, b""), "FrameDecodeError"),
    ("grayscale image", frame(3, jpeg(COLOUR[:, :, 0])), "FrameDecodeError"),
    ("wrong dimensions", frame(4, jpeg(COLOUR), width=640, height=480), "FrameDecodeError"),
]


@pytest.fixture(scope="module")
def poison_settings(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return isolated_settings(stack, tmp_path_factory.mktemp("poison") / "out")


@pytest.fixture(scope="module")
def services(poison_settings: Settings) -> Iterator[RunningServices]:
    yield from running_services(
        poison_settings, poison_settings.output_dir / "logs", ("detection", "prognosis", "fhir-consumer")
    )


def test_poison_messages_are_dead_lettered(poison_settings: Settings, services: RunningServices) -> None:
    settings = poison_settings
    valid_record = PatientRecord(
        patient_id="pt-poison",
        source_name="sample",
        bundle=json.loads(sorted(path for path in RECORDS.glob("*.json") if "invalid" not in path.name)[0].read_text()),
    )
    outgoing = [("frames", b"proc-poison", value) for _, value, _ in BAD_FRAMES]
    outgoing.append(("frames", b"proc-poison", frame(10, jpeg(COLOUR))))
    outgoing += [
        ("patient-records", b"pt-poison", b"{}"),
        ("patient-records", b"pt-poison", valid_record.to_bytes()),
        ("findings", b"proc-poison", b"not a finding"),
    ]
    asyncio.run(send_all(settings, outgoing))

    def done(records: list[Record]) -> bool:
        topics = [record.topic for record in records]
        return services.any_stopped() or (
            topics.count(settings.topic("dlq.detection")) >= len(BAD_FRAMES)
            and settings.topic("detections") in topics
            and settings.topic("prognoses") in topics
            and settings.topic("dlq.prognosis") in topics
            and settings.topic("dlq.fhir-consumer") in topics
        )

    records = asyncio.run(
        collect_records(
            settings,
            ["detections", "prognoses", "dlq.detection", "dlq.prognosis", "dlq.fhir-consumer"],
            until=done,
            timeout_s=240,
        )
    )
    by_topic: dict[str, list[Record]] = {}
    for record in records:
        by_topic.setdefault(record.topic.removeprefix(settings.topic_prefix), []).append(record)

    dead_frames = by_topic.get("dlq.detection", [])
    assert [record.value for record in dead_frames] == [value for _, value, _ in BAD_FRAMES]
    assert [record.headers["crc-error-type"] for record in dead_frames] == [kind for _, _, kind in BAD_FRAMES]
    for record in dead_frames:
        assert record.headers["crc-origin-topic"] == settings.topic("frames")
        assert record.headers["crc-service"] == "detection"
        assert int(record.headers["crc-origin-offset"]) >= 0
        assert record.headers["crc-error"]

    results = [DetectionResult.from_bytes(record.value) for record in by_topic.get("detections", [])]
    assert [result.sequence for result in results] == [10]

    assert len(by_topic.get("dlq.prognosis", [])) == 1
    assert by_topic["dlq.prognosis"][0].value == b"{}"
    prognoses = [PrognosisResult.from_bytes(record.value) for record in by_topic.get("prognoses", [])]
    assert [result.patient_id for result in prognoses] == ["pt-poison"]

    assert [record.value for record in by_topic.get("dlq.fhir-consumer", [])] == [b"not a finding"]
    for name, process in services.processes.items():
        assert process.poll() is None, f"service {name} stopped after poison messages"


def test_error_messages_name_the_value(poison_settings: Settings, services: RunningServices) -> None:
    records = asyncio.run(
        collect_records(
            poison_settings,
            ["dlq.detection"],
            until=lambda received: len(received) >= len(BAD_FRAMES),
            timeout_s=120,
        )
    )
    errors = {record.headers["crc-error"] for record in records}

    assert any("640x480" in error and "64x48" in error for error in errors)
    assert any("0 bytes" in error for error in errors)
    assert any("1 channel" in error for error in errors)


def test_invalid_bundle_file_is_dead_lettered(settings: Settings) -> None:
    from producers.records import publish_records

    summary = asyncio.run(publish_records(settings, [RECORDS / "invalid-bundle.json"]))
    records = asyncio.run(
        collect_records(settings, ["dlq.record-producer"], until=lambda received: len(received) >= 1, timeout_s=60)
    )

    assert summary.published == []
    assert list(summary.rejected) == ["invalid-bundle.json"]
    assert "invalid-bundle.json" in summary.rejected["invalid-bundle.json"]
    assert len(records) == 1
    assert records[0].headers["crc-origin-source"] == "invalid-bundle.json"
    assert records[0].value == Path(RECORDS / "invalid-bundle.json").read_bytes()
