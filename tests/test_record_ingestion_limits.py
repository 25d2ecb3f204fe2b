"""Record ingestion limits and error responses: Kafka record size, PHI in errors, gateway status codes, resends."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from redis.asyncio import Redis

from crc_medai.kafka import (
    HEADER_ORIGINAL_BYTES,
    HEADER_TRUNCATED,
    Record,
    collect_records,
    create_producer,
    ensure_topics,
    fit_dead_letter,
)
from crc_medai.settings import REPO_ROOT, Settings
from infra.layout import StackLayout
from infra.services.kafka import KafkaService
from producers.fhir_input import RecordRejected, incoming_resources, read_fhir_json
from producers.gateway import create_app as create_gateway
from producers.intake import RecordIntake, RecordTooLarge
from producers.records import RecordFileError, load_bundle, publish_records

SERVICE = "record-limits-test"
MIB = 1024 * 1024
BIRTH_DATE = "12/31/1960"
BAD_BIRTH_DATE = json.dumps({"resourceType": "Patient", "id": "pt-date", "birthDate": BIRTH_DATE}).encode()


def patient(patient_id: str, padding: int = 0) -> dict[str, Any]:
    """A Patient, with a string extension of ``padding`` characters to make it large."""
    resource: dict[str, Any] = {"resourceType": "Patient", "id": patient_id, "gender": "female"}
    if padding:
        resource["extension"] = [{"url": "http://example.org/padding", "valueString": "x" * padding}]
    return resource


def observation(observation_id: str, patient_id: str, padding: int = 0) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": observation_id,
        "status": "final",
        "code": {"text": "note"},
        "subject": {"reference": f"Patient/{patient_id}"},
        "valueString": "y" * max(padding, 1),
    }
    return resource


def encode(resource: dict[str, Any]) -> bytes:
    return json.dumps(resource).encode("utf-8")


def small_limit(settings: Settings) -> Settings:
    """Settings with the smallest Kafka limit allowed, below the broker's default of about 1 MiB."""
    return settings.model_copy(update={"kafka_max_message_bytes": MIB})


async def read_topic(settings: Settings, topic: str, count: int) -> list[Record]:
    return await collect_records(settings, [topic], until=lambda received: len(received) >= count, timeout_s=60)


# Configuration of the limit


def test_broker_config_has_message_limit(tmp_path: Path) -> None:
    settings = Settings(kafka_max_message_bytes=12 * MIB)
    layout = StackLayout(cache_root=tmp_path / "cache", run_root=tmp_path / "run")

    config = KafkaService(settings, layout).render_config()

    assert f"message.max.bytes={12 * MIB}" in config.splitlines()


def test_compose_broker_limit_matches_default() -> None:
    compose = yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())

    kafka_environment = compose["services"]["kafka"]["environment"]

    assert int(kafka_environment["KAFKA_MESSAGE_MAX_BYTES"]) == Settings().kafka_max_message_bytes


async def test_producer_uses_message_limit() -> None:
    producer = create_producer(Settings(kafka_max_message_bytes=3 * MIB))

    assert producer._max_request_size == 3 * MIB


def test_dead_letter_value_truncated() -> None:
    headers = [("crc-error", b"bad")]

    value, marked = fit_dead_letter(b"a" * 10, headers, 4)

    assert value == b"aaaa"
    assert (HEADER_TRUNCATED, b"true") in marked
    assert (HEADER_ORIGINAL_BYTES, b"10") in marked
    assert ("crc-error", b"bad") in marked


def test_dead_letter_value_within_limit_kept() -> None:
    headers = [("crc-error", b"bad")]

    assert fit_dead_letter(b"abc", headers, 3) == (b"abc", headers)


# PHI in validation errors


def test_birth_date_not_in_error() -> None:
    with pytest.raises(RecordRejected) as caught:
        incoming_resources(read_fhir_json(BAD_BIRTH_DATE))

    assert caught.value.element == "Patient.birthDate"
    assert "does not match" in caught.value.reason
    assert BIRTH_DATE not in str(caught.value)


@pytest.mark.parametrize("value", ["a); (value b; the Bundle must be valid FHIR R4", "unknown-gender"])
def test_gender_value_not_in_error(value: str) -> None:
    with pytest.raises(RecordRejected) as caught:
        incoming_resources({"resourceType": "Patient", "id": "p", "gender": value})

    assert caught.value.element == "Patient.gender"
    assert value not in str(caught.value)
    assert "(value" not in str(caught.value)


def test_bundle_file_error_hides_value(tmp_path: Path) -> None:
    path = tmp_path / "bad-date.json"
    entry = {"fullUrl": "urn:uuid:pt-date", "resource": json.loads(BAD_BIRTH_DATE)}
    path.write_text(json.dumps({"resourceType": "Bundle", "type": "collection", "entry": [entry]}))

    with pytest.raises(RecordFileError) as caught:
        load_bundle(path)

    assert "entry[0].resource.birthDate" in str(caught.value)
    assert BIRTH_DATE not in str(caught.value)


# Against the real Kafka and Redis


@pytest.fixture
async def intake(settings: Settings) -> AsyncIterator[RecordIntake]:
    await ensure_topics(settings, ("patient-records", f"dlq.{SERVICE}"))
    producer = create_producer(settings)
    await producer.start()
    intake = RecordIntake(settings, producer, service=SERVICE)
    try:
        yield intake
    finally:
        await intake.close()
        await producer.stop()


@pytest.mark.integration
async def test_birth_date_not_dead_lettered_or_logged(
    settings: Settings, intake: RecordIntake, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    with pytest.raises(RecordRejected):
        await intake.accept_bytes(BAD_BIRTH_DATE, source_name="bad-date.json")
    (dead,) = await read_topic(settings, f"dlq.{SERVICE}", 1)

    assert "Patient.birthDate" in dead.headers["crc-error"]
    assert BIRTH_DATE not in dead.headers["crc-error"]
    # aiokafka's DEBUG log prints the record bytes, so only the project's own loggers are checked.
    own = "\n".join(record.getMessage() for record in caplog.records if record.name.startswith("producers."))
    assert "record rejected" in own
    assert BIRTH_DATE not in own


@pytest.mark.integration
async def test_record_over_limit_rejected(settings: Settings) -> None:
    limited = small_limit(settings)
    raw = encode(patient("pt-large", padding=MIB + 1000))
    await ensure_topics(limited, ("patient-records", f"dlq.{SERVICE}"))
    producer = create_producer(limited)
    await producer.start()
    intake = RecordIntake(limited, producer, service=SERVICE)
    try:
        with pytest.raises(RecordTooLarge) as caught:
            await intake.accept_bytes(raw, source_name="large.json")
    finally:
        await intake.close()
        await producer.stop()
    (dead,) = await read_topic(limited, f"dlq.{SERVICE}", 1)

    assert caught.value.limit < MIB
    assert "split the Bundle" in str(caught.value)
    assert "send NDJSON" in str(caught.value)
    assert dead.headers["crc-error-type"] == "RecordTooLarge"
    assert dead.headers[HEADER_TRUNCATED] == "true"
    assert dead.headers[HEADER_ORIGINAL_BYTES] == str(len(raw))
    assert dead.value == raw[: len(dead.value)]
    assert len(dead.value) < MIB


@pytest.mark.integration
async def test_same_input_reported_unchanged(
    settings: Settings, intake: RecordIntake, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="producers.intake")
    raw = encode(patient("pt-same"))

    first = await intake.accept_bytes(raw, source_name="first.json")
    second = await intake.accept_bytes(raw, source_name="second.json")

    assert not first.unchanged
    assert second.unchanged
    assert second.record.event_id == first.record.event_id
    published = [record.getMessage() for record in caplog.records if record.name == "producers.intake"]
    assert "changed=1" in published[0]
    assert "changed=0" in published[1]


@pytest.mark.integration
async def test_changed_precision_is_a_change(settings: Settings, intake: RecordIntake) -> None:
    await intake.accept_bytes(encode(patient("pt-decimal")), source_name="patient.json")
    text = b'{"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "n"}, '
    text += b'"subject": {"reference": "Patient/pt-decimal"}, "valueQuantity": {"value": VALUE}}'

    first = await intake.accept_bytes(text.replace(b"VALUE", b"5.0"), source_name="first.json")
    second = await intake.accept_bytes(text.replace(b"VALUE", b"5.000"), source_name="second.json")

    assert not first.unchanged
    assert not second.unchanged
    assert second.record.event_id != first.record.event_id


@pytest.mark.integration
def test_produce_records_goes_on_after_broker_error(settings: Settings, tmp_path: Path) -> None:
    # The settings allow 64 MiB, the broker does not (1 MiB by default, 8 MiB as configured here), so the send fails.
    unlimited = settings.model_copy(update={"kafka_max_message_bytes": 64 * MIB})
    (tmp_path / "a-huge.json").write_bytes(encode(patient("pt-huge", padding=9 * MIB)))
    (tmp_path / "b-small.json").write_bytes(encode(patient("pt-small")))

    summary = asyncio.run(publish_records(unlimited, [tmp_path]))
    records = asyncio.run(read_topic(unlimited, "patient-records", 1))

    assert summary.published == ["b-small.json"]
    assert "MessageSizeTooLargeError" in summary.rejected["a-huge.json"]
    assert [record.key for record in records] == [b"pt-small"]


@pytest.mark.integration
def test_produce_records_dead_letters_large_record(settings: Settings, tmp_path: Path) -> None:
    limited = small_limit(settings)
    (tmp_path / "a-large.json").write_bytes(encode(patient("pt-large", padding=MIB)))
    (tmp_path / "b-small.json").write_bytes(encode(patient("pt-small")))

    summary = asyncio.run(publish_records(limited, [tmp_path]))
    dead = asyncio.run(read_topic(limited, "dlq.record-producer", 1))

    assert summary.published == ["b-small.json"]
    assert "more than the Kafka limit" in summary.rejected["a-large.json"]
    assert dead[0].headers["crc-origin-source"] == "a-large.json"
    assert dead[0].headers[HEADER_TRUNCATED] == "true"


# Gateway


def issues_of(response: Any) -> list[dict[str, Any]]:
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    return body["issue"]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        (None, 200),
        ("application/fhir+json", 200),
        ("application/json; charset=utf-8", 200),
        ("application/fhir+xml", 415),
        ("application/xml", 415),
        ("text/xml", 415),
        ("text/plain", 415),
    ],
)
def test_gateway_content_types(settings: Settings, content_type: str | None, status: int) -> None:
    asyncio.run(ensure_topics(settings, ("patient-records", "dlq.record-gateway")))
    headers = {"content-type": content_type} if content_type else {}
    with TestClient(create_gateway(settings)) as client:
        response = client.post("/fhir", content=encode(patient("pt-type")), headers=headers)

    assert response.status_code == status
    assert issues_of(response)
    if "xml" in (content_type or ""):
        assert "only FHIR JSON is supported" in issues_of(response)[0]["diagnostics"]


@pytest.mark.integration
@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/fhir", 405), ("GET", "/nowhere", 404)])
def test_gateway_http_errors_are_outcomes(settings: Settings, method: str, path: str, status: int) -> None:
    with TestClient(create_gateway(settings)) as client:
        response = client.request(method, path)

    assert response.status_code == status
    assert response.headers["content-type"] == "application/fhir+json"
    assert issues_of(response)[0]["severity"] == "error"


@pytest.mark.integration
def test_gateway_record_too_large_413(settings: Settings) -> None:
    limited = small_limit(settings)
    asyncio.run(ensure_topics(limited, ("patient-records", "dlq.record-gateway")))
    with TestClient(create_gateway(limited)) as client:
        first = client.post("/fhir", content=encode(patient("pt-grow", padding=600_000)))
        second = client.post("/fhir", content=encode(observation("o-grow", "pt-grow", padding=600_000)))

    assert first.status_code == 200
    assert second.status_code == 413
    assert "more than the Kafka limit" in issues_of(second)[0]["diagnostics"]


@pytest.mark.integration
def test_gateway_redis_failure_503(settings: Settings) -> None:
    with TestClient(create_gateway(settings)) as client:
        # Nothing listens on port 1, so every Redis call fails with a connection error.
        client.app.state.intake.redis = Redis.from_url("redis://127.0.0.1:1/0")
        response = client.post("/fhir", content=encode(patient("pt-down")))

    assert response.status_code == 503
    assert "send the input again later" in issues_of(response)[0]["diagnostics"]


@pytest.mark.integration
def test_gateway_unexpected_error_500(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    async def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    with TestClient(create_gateway(settings), raise_server_exceptions=False) as client:
        monkeypatch.setattr(client.app.state.intake, "accept_bytes", fail)
        response = client.post("/fhir", content=encode(patient("pt-bug")))

    assert response.status_code == 500
    assert issues_of(response)[0]["code"] == "exception"
    assert "boom" not in response.text


@pytest.mark.integration
def test_gateway_partial_ndjson_200(settings: Settings) -> None:
    lines = [encode(patient("pt-nd-1")), BAD_BIRTH_DATE, encode(patient("pt-nd-2"))]
    asyncio.run(ensure_topics(settings, ("patient-records", "dlq.record-gateway")))
    with TestClient(create_gateway(settings)) as client:
        response = client.post("/fhir/$ndjson", content=b"\n".join(lines))

    issues = issues_of(response)
    errors = [issue for issue in issues if issue["severity"] == "error"]
    assert response.status_code == 200
    assert issues[0]["severity"] == "information"
    assert issues[0]["diagnostics"].startswith("2 record(s) accepted, 1 part(s) rejected")
    assert [issue["expression"] for issue in errors] == [["line 2: Patient.birthDate"]]
    assert BIRTH_DATE not in response.text


@pytest.mark.integration
def test_gateway_rejected_ndjson_400(settings: Settings) -> None:
    asyncio.run(ensure_topics(settings, ("patient-records", "dlq.record-gateway")))
    with TestClient(create_gateway(settings)) as client:
        response = client.post("/fhir/$ndjson", content=BAD_BIRTH_DATE + b"\nnot json\n")

    errors = [issue for issue in issues_of(response) if issue["severity"] == "error"]
    assert response.status_code == 400
    assert len(errors) == 2


@pytest.mark.integration
def test_gateway_broker_too_large_413(settings: Settings) -> None:
    # The settings allow 64 MiB, the broker does not (1 MiB by default, 8 MiB as configured here).
    unlimited = settings.model_copy(update={"kafka_max_message_bytes": 64 * MIB})
    asyncio.run(ensure_topics(unlimited, ("patient-records", "dlq.record-gateway")))
    with TestClient(create_gateway(unlimited)) as client:
        response = client.post("/fhir", content=encode(patient("pt-broker", padding=9 * MIB)))

    assert response.status_code == 413
    assert "message.max.bytes" in issues_of(response)[0]["diagnostics"]


@pytest.mark.integration
def test_gateway_405_allows_post(settings: Settings) -> None:
    with TestClient(create_gateway(settings)) as client:
        response = client.get("/fhir")

    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
