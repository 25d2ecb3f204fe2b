"""Record ingestion against the real Kafka and Redis: intake, gateway, ehr-inbound worker, prognosis gate."""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis.asyncio import Redis

from crc_medai.kafka import Record, collect_records, create_producer, ensure_topics
from crc_medai.settings import Settings
from processors.prognosis.agent import RecordGate, RecordScorer
from producers.fhir_input import read_fhir_json
from producers.gateway import create_app as create_gateway
from producers.intake import RecordIntake, RecordRejected
from schemas.messages import PatientRecord, PrognosisResult
from tests.conftest import RunningServices, running_services

pytestmark = pytest.mark.integration

INPUTS = Path(__file__).resolve().parent / "data" / "fhir-inputs"
SERVICE = "record-test"


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


async def read_topic(settings: Settings, topic: str, count: int) -> list[Record]:
    return await collect_records(settings, [topic], until=lambda received: len(received) >= count, timeout_s=60)


def nodes_value(record: PatientRecord) -> int:
    resources = [entry["resource"] for entry in record.bundle["entry"]]
    return next(resource["valueInteger"] for resource in resources if resource["id"] == "pt-in-01-nodes")


async def test_intake_publishes_record(settings: Settings, intake: RecordIntake) -> None:
    raw = (INPUTS / "decimal-precision.json").read_bytes()

    accepted = await intake.accept_bytes(raw, source_name="decimal-precision.json")
    records = await read_topic(settings, "patient-records", 1)

    assert accepted.patient_id == "pt-in-01"
    assert accepted.missing == {}
    assert len(records) == 1
    assert records[0].key == b"pt-in-01"
    assert b'"value":72.500' in records[0].value
    record = PatientRecord.from_bytes(records[0].value)
    assert record.event_id == accepted.record.event_id
    assert record.source_ts == datetime(2024, 5, 2, 7, 30, tzinfo=UTC)
    assert len(record.bundle["entry"]) == 11


async def test_intake_rejection_dead_lettered(settings: Settings, intake: RecordIntake) -> None:
    raw = (INPUTS / "datetime-without-timezone.json").read_bytes()

    with pytest.raises(RecordRejected) as caught:
        await intake.accept_bytes(raw, source_name="datetime-without-timezone.json")
    dead = await read_topic(settings, f"dlq.{SERVICE}", 1)

    assert caught.value.element == "Bundle.entry[3].resource.effectiveDateTime"
    assert len(dead) == 1
    assert dead[0].value == raw
    assert dead[0].headers["crc-origin-source"] == "datetime-without-timezone.json"
    assert dead[0].headers["crc-error-type"] == "RecordRejected"
    assert dead[0].headers["crc-error"].startswith("Bundle.entry[3].resource.effectiveDateTime:")


async def test_intake_merges_single_resources(settings: Settings, intake: RecordIntake) -> None:
    await intake.accept(read_fhir_json((INPUTS / "single-patient.json").read_bytes()), source_name="patient")
    accepted = await intake.accept(
        read_fhir_json((INPUTS / "single-observation.json").read_bytes()), source_name="observation"
    )

    keys = [
        f"{entry['resource']['resourceType']}/{entry['resource']['id']}" for entry in accepted.record.bundle["entry"]
    ]
    assert keys == ["Patient/pt-in-04", "Observation/pt-in-04-nodes"]
    assert "nodes" not in accepted.missing
    assert "age" in accepted.missing


async def test_intake_leaves_input_unchanged(settings: Settings, intake: RecordIntake) -> None:
    data = read_fhir_json((INPUTS / "transaction-bundle.json").read_bytes())
    before = copy.deepcopy(data)

    accepted = await intake.accept(data, source_name="transaction")

    assert data == before
    assert accepted.patient_id == "pt-in-02"


async def test_observation_before_patient_rejected(settings: Settings, intake: RecordIntake) -> None:
    raw = (INPUTS / "single-observation.json").read_bytes()

    with pytest.raises(RecordRejected, match="Patient/pt-in-04 has not been received"):
        await intake.accept_bytes(raw, source_name="observation")
    dead = await read_topic(settings, f"dlq.{SERVICE}", 1)

    assert [record.value for record in dead] == [raw]


async def test_newer_resource_supersedes_older(settings: Settings, intake: RecordIntake) -> None:
    first = await intake.accept_bytes((INPUTS / "collection-bundle.json").read_bytes(), source_name="first")
    later = await intake.accept_bytes((INPUTS / "later-nodes.json").read_bytes(), source_name="later")
    older = await intake.accept_bytes((INPUTS / "older-nodes.json").read_bytes(), source_name="older")

    assert nodes_value(first.record) == 2
    assert nodes_value(later.record) == 7
    assert nodes_value(older.record) == 7
    assert older.stale == ["Observation/pt-in-01-nodes"]
    assert later.record.source_ts == datetime(2024, 6, 10, 12, 0, tzinfo=UTC)
    assert older.record.event_id == later.record.event_id


async def test_two_patients_in_one_bundle_rejected(settings: Settings, intake: RecordIntake) -> None:
    with pytest.raises(RecordRejected, match="covers 2 patients"):
        await intake.accept_bytes((INPUTS / "two-patients.json").read_bytes(), source_name="two")


async def test_ndjson_groups_patients(settings: Settings, intake: RecordIntake) -> None:
    raw = (INPUTS / "bulk-export.ndjson").read_bytes() + b'{"resourceType": "Observation", "status": "final"}\n'

    outcome = await intake.accept_ndjson(raw, source_name="bulk-export.ndjson")
    records = await read_topic(settings, "patient-records", 2)
    dead = await read_topic(settings, f"dlq.{SERVICE}", 1)

    assert sorted(accepted.patient_id for accepted in outcome.accepted) == ["pt-in-05", "pt-in-06"]
    assert sorted(record.key for record in records) == [b"pt-in-05", b"pt-in-06"]
    assert [error.element for error in outcome.rejected] == ["line 21: Observation.code"]
    assert dead[0].value == b'{"resourceType": "Observation", "status": "final"}'
    assert dead[0].headers["crc-origin-source"] == "bulk-export.ndjson:21"


def test_gateway_answers_operation_outcome(settings: Settings) -> None:
    asyncio.run(ensure_topics(settings, ("patient-records", "dlq.record-gateway")))
    with TestClient(create_gateway(settings)) as client:
        accepted = client.post("/fhir", content=(INPUTS / "data-absent-reason.json").read_bytes())
        rejected = client.post("/fhir", content=(INPUTS / "unknown-element.json").read_bytes())
        ndjson = client.post("/fhir/$ndjson", content=(INPUTS / "bulk-export.ndjson").read_bytes())
        too_large = client.post("/fhir", content=b" " * (8 * 1024 * 1024 + 1))

    assert accepted.status_code == 200
    assert accepted.headers["content-type"] == "application/fhir+json"
    issues = accepted.json()["issue"]
    assert issues[0]["severity"] == "information"
    assert "record accepted for Patient/pt-in-01" in issues[0]["diagnostics"]
    assert sorted(issue["severity"] for issue in issues[1:]) == ["warning"] * 3
    assert any("data-absent-reason 'asked-declined'" in issue["diagnostics"] for issue in issues)

    assert rejected.status_code == 400
    body = rejected.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["severity"] == "error"
    assert body["issue"][0]["expression"] == ["Bundle.entry[0].resource.favouriteColour"]

    assert ndjson.status_code == 200
    assert len([issue for issue in ndjson.json()["issue"] if "record accepted" in issue["diagnostics"]]) == 2
    assert too_large.status_code == 413

    dead = asyncio.run(read_topic(settings, "dlq.record-gateway", 1))
    assert [record.value for record in dead] == [(INPUTS / "unknown-element.json").read_bytes()]


@pytest.fixture
def intake_worker(settings: Settings) -> Iterator[RunningServices]:
    yield from running_services(settings, settings.output_dir / "logs", ("record-intake",))


def test_worker_consumes_ehr_inbound(settings: Settings, intake_worker: RunningServices) -> None:
    bundle = (INPUTS / "byte-order-mark.json").read_bytes()
    ndjson = (INPUTS / "bulk-export.ndjson").read_bytes()
    outgoing = [
        (b"not json at all", []),
        (bundle, []),
        ((INPUTS / "stu3-resource.json").read_bytes(), []),
        (ndjson, [("content-type", b"application/fhir+ndjson")]),
    ]

    async def send() -> None:
        await ensure_topics(settings, ("ehr-inbound", "patient-records", "dlq.record-intake"))
        producer = create_producer(settings)
        await producer.start()
        try:
            for value, headers in outgoing:
                # One key, so that all records land on one partition in this order.
                await producer.send_and_wait(
                    settings.topic("ehr-inbound"), key=b"interface-1", value=value, headers=headers
                )
        finally:
            await producer.stop()

    asyncio.run(send())

    def done(received: list[Record]) -> bool:
        topics = [record.topic for record in received]
        return intake_worker.any_stopped() or (
            topics.count(settings.topic("patient-records")) >= 3
            and topics.count(settings.topic("dlq.record-intake")) >= 2
        )

    received = asyncio.run(
        collect_records(settings, ["patient-records", "dlq.record-intake"], until=done, timeout_s=180)
    )
    records = [record for record in received if record.topic == settings.topic("patient-records")]
    dead = [record for record in received if record.topic == settings.topic("dlq.record-intake")]

    assert sorted(record.key for record in records) == [b"pt-in-01", b"pt-in-05", b"pt-in-06"], intake_worker.logs()
    assert [record.value for record in dead] == [b"not json at all", outgoing[2][0]]
    assert [record.headers["crc-origin-offset"] for record in dead] == ["0", "2"]
    assert all(record.headers["crc-origin-topic"] == settings.topic("ehr-inbound") for record in dead)
    assert "Bundle.entry[9].resource.taken" in dead[1].headers["crc-error"]
    assert intake_worker.processes["record-intake"].poll() is None


async def test_gate_scores_event_once(settings: Settings) -> None:
    redis = Redis.from_url(settings.redis_url)
    gate = RecordGate(settings, redis)
    bundle = json.loads((INPUTS / "collection-bundle.json").read_text())
    record = PatientRecord(patient_id=f"pt-{uuid.uuid4().hex[:8]}", source_name="test", bundle=bundle)
    try:
        assert await gate.skip_reason(record) is None
        await gate.mark_scored(record)

        assert "duplicate event id" in (await gate.skip_reason(record) or "")
    finally:
        await redis.aclose()


async def test_gate_skips_older_record(settings: Settings) -> None:
    redis = Redis.from_url(settings.redis_url)
    gate = RecordGate(settings, redis)
    bundle = json.loads((INPUTS / "collection-bundle.json").read_text())
    now = datetime.now(UTC)
    newer = PatientRecord(patient_id="pt-gate", source_name="newer", bundle=bundle, source_ts=now)
    older = PatientRecord(patient_id="pt-gate", source_name="older", bundle=bundle, source_ts=now - timedelta(hours=1))
    latest = PatientRecord(
        patient_id="pt-gate", source_name="latest", bundle=bundle, source_ts=now + timedelta(hours=1)
    )
    try:
        await gate.mark_scored(newer)

        assert "superseded" in (await gate.skip_reason(older) or "")
        assert await gate.skip_reason(latest) is None
    finally:
        await redis.aclose()


def test_prognosis_carries_missing_reasons(stack: Settings) -> None:
    bundle = json.loads((INPUTS / "collection-bundle.json").read_text())
    grade = next(entry["resource"] for entry in bundle["entry"] if entry["resource"]["id"] == "pt-in-01-grade")
    del grade["valueCodeableConcept"]
    grade["dataAbsentReason"] = {"coding": [{"code": "not-performed"}]}
    record = PatientRecord(patient_id="pt-in-01", source_name="test", bundle=bundle)

    result = RecordScorer(stack).process(record)

    assert result.missing_features == ["differ"]
    assert "dataAbsentReason 'not-performed'" in result.missing_reasons["differ"]


@pytest.fixture
def prognosis_worker(settings: Settings) -> Iterator[RunningServices]:
    yield from running_services(settings, settings.output_dir / "logs", ("prognosis",))


def test_prognosis_once_per_event_and_newest(settings: Settings, prognosis_worker: RunningServices) -> None:
    bundle = json.loads((INPUTS / "collection-bundle.json").read_text())
    now = datetime.now(UTC)
    first = PatientRecord(patient_id="pt-in-01", source_name="first", bundle=bundle, source_ts=now)
    older = PatientRecord(patient_id="pt-in-01", source_name="older", bundle=bundle, source_ts=now - timedelta(days=1))
    newer = PatientRecord(patient_id="pt-in-01", source_name="newer", bundle=bundle, source_ts=now + timedelta(days=1))
    outgoing = [first, first, older, newer]

    async def send() -> None:
        await ensure_topics(settings)
        producer = create_producer(settings)
        await producer.start()
        try:
            for record in outgoing:
                await producer.send_and_wait(
                    settings.topic("patient-records"), value=record.to_bytes(), key=b"pt-in-01"
                )
        finally:
            await producer.stop()

    asyncio.run(send())
    received = asyncio.run(
        collect_records(
            settings,
            ["prognoses"],
            until=lambda records: len(records) >= 2 or prognosis_worker.any_stopped(),
            timeout_s=240,
        )
    )
    # A sentinel after the skipped records shows that nothing else is coming for them.
    sentinel = PatientRecord(
        patient_id="pt-in-01", source_name="sentinel", bundle=bundle, source_ts=now + timedelta(days=2)
    )
    outgoing = [sentinel]
    asyncio.run(send())
    received = asyncio.run(
        collect_records(
            settings,
            ["prognoses"],
            until=lambda records: len(records) >= 3 or prognosis_worker.any_stopped(),
            timeout_s=240,
        )
    )

    results = [PrognosisResult.from_bytes(record.value) for record in received]
    assert [result.record_event_id for result in results] == [first.event_id, newer.event_id, sentinel.event_id], (
        prognosis_worker.logs()
    )
