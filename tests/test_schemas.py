"""Message contracts: round trip, JSON Schema export and rejection of malformed messages."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from schemas.export import export_json_schemas
from schemas.messages import (
    MESSAGE_TYPES,
    DetectionResult,
    FeatureContribution,
    FhirResourceEvent,
    Frame,
    ModelRef,
    PatientRecord,
    PolypFinding,
    PrognosisResult,
    Region,
    utc_now,
)

MODEL = ModelRef(name="polyp-unet", version="1")


def sample_messages() -> list:
    now = utc_now()
    return [
        Frame(procedure_id="proc-1", sequence=3, captured_at=now, width=4, height=2, image=b"\xff\xd8\x00\x01jpeg"),
        PatientRecord(
            patient_id="pt-0001", source_name="a.json", bundle={"resourceType": "Bundle", "type": "collection"}
        ),
        DetectionResult(
            frame_event_id=uuid.uuid4(),
            procedure_id="proc-1",
            sequence=3,
            captured_at=now,
            polyp_probability=0.91,
            flagged=True,
            region=Region(x=1, y=2, width=3, height=4),
            heatmap_key="heatmaps/proc-1/000003.png",
            heatmap_bucket="crc-heatmaps",
            explanation_method="Grad-CAM",
            model=MODEL,
            inference_ms=12.5,
        ),
        PolypFinding(
            finding_id=uuid.uuid4(),
            procedure_id="proc-1",
            status="open",
            first_sequence=3,
            last_sequence=3,
            first_seen=now,
            last_seen=now,
            frames_flagged=1,
            peak_probability=0.91,
            representative_sequence=3,
            model=MODEL,
        ),
        PrognosisResult(
            record_event_id=uuid.uuid4(),
            patient_id="pt-0001",
            horizon_years=5,
            recurrence_probability=0.42,
            risk_group="intermediate",
            base_value=-0.3,
            contributions=[
                FeatureContribution(
                    feature="nodes", label="Positive lymph nodes", value=5, display_value="5", contribution=0.4
                )
            ],
            missing_features=["differ"],
            model=MODEL,
            inference_ms=3.0,
        ),
        FhirResourceEvent(
            source_event_id=uuid.uuid4(),
            resource_type="Observation",
            resource_id="abc",
            resource={"resourceType": "Observation", "id": "abc"},
        ),
    ]


@pytest.mark.parametrize("message", sample_messages(), ids=lambda message: type(message).__name__)
def test_message_round_trip(message) -> None:
    parsed = type(message).from_bytes(message.to_bytes())

    assert parsed == message
    assert parsed.schema_version == 1


def test_frame_image_is_base64_in_json() -> None:
    frame = sample_messages()[0]

    document = json.loads(frame.to_bytes())

    assert document["image"] == "/9gAAWpwZWc="


def test_every_message_type_is_exported(tmp_path) -> None:
    paths = export_json_schemas(tmp_path)

    assert len(paths) == len(MESSAGE_TYPES)
    for path in paths:
        schema = json.loads(path.read_text())
        assert "event_id" in schema["properties"]
        assert "schema_version" in schema["properties"]


def frame_document(**changes) -> bytes:
    document = json.loads(sample_messages()[0].to_bytes())
    document.update(changes)
    return json.dumps(document).encode()


@pytest.mark.parametrize(
    ("case", "value"),
    [
        ("not json", b"\x00\x01garbage"),
        ("empty", b""),
        ("unknown schema version", frame_document(schema_version=2)),
        ("unknown field", frame_document(colour="red")),
        ("negative sequence", frame_document(sequence=-1)),
        ("naive capture time", frame_document(captured_at="2026-01-01T10:00:00")),
        ("procedure id with spaces", frame_document(procedure_id="a b")),
        ("image not base64", frame_document(image="not base64!")),
        ("zero width", frame_document(width=0)),
    ],
)
def test_frame_rejects_malformed(case: str, value: bytes) -> None:
    with pytest.raises(ValidationError):
        Frame.from_bytes(value)


def test_tombstone_is_rejected() -> None:
    with pytest.raises(ValueError, match="tombstone"):
        Frame.from_bytes(None)


def test_probability_out_of_range_rejected() -> None:
    document = json.loads(sample_messages()[2].to_bytes())
    document["polyp_probability"] = 1.5

    with pytest.raises(ValidationError, match="polyp_probability"):
        DetectionResult.model_validate(document)


def test_risk_group_outside_set_rejected() -> None:
    document = json.loads(sample_messages()[4].to_bytes())
    document["risk_group"] = "medium"

    with pytest.raises(ValidationError, match="risk_group"):
        PrognosisResult.model_validate(document)


def test_event_ids_are_unique() -> None:
    first = PatientRecord(patient_id="pt-1", source_name="a", bundle={})
    second = PatientRecord(patient_id="pt-1", source_name="a", bundle={})

    assert first.event_id != second.event_id
    assert first.source_ts.tzinfo is not None
    assert first.source_ts <= datetime.now(UTC)
