"""FHIR resources built from results: R4B validity, JSON round trip, stable ids, content, and the FHIR consumer."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class
from redis.asyncio import Redis

from consumers.devices import MODEL_CARD_EXTENSION, EmittedDevices, model_device
from consumers.fhir_consumer import write_resource
from consumers.reports import ProcedureFindings, ReportedFinding, diagnostic_report
from consumers.resources import (
    DETECTION_METHOD,
    TOP_CONTRIBUTIONS,
    ResourceValidationError,
    finding_observation,
    heatmap_media,
    resource_id,
    risk_assessment,
    risk_observation,
    validate,
)
from crc_medai.kafka import Record, collect_records
from crc_medai.settings import Settings
from schemas.messages import (
    FeatureContribution,
    FhirResourceEvent,
    HorizonProbability,
    ModelRef,
    PolypFinding,
    PrognosisResult,
    Region,
)
from tests.conftest import RunningServices, isolated_settings, running_services, send_all

DETECTOR = ModelRef(name="polyp-unet", version="0.1.0")
RECURRENCE_MODEL = ModelRef(name="crc-recurrence-survival-catboost", version="2.0.0")
SEEN_AT = datetime(2026, 3, 2, 9, 41, 7, tzinfo=UTC)
MODEL_CARDS = "https://models.example.org/crc-medai/"


def finding(**changes: Any) -> PolypFinding:
    fields: dict[str, Any] = {
        "finding_id": uuid.uuid4(),
        "procedure_id": "proc-1",
        "status": "closed",
        "source_ts": SEEN_AT + timedelta(seconds=2),
        "first_sequence": 40,
        "last_sequence": 55,
        "first_seen": SEEN_AT,
        "last_seen": SEEN_AT + timedelta(milliseconds=500),
        "frames_flagged": 14,
        "peak_probability": 0.93,
        "representative_sequence": 42,
        "region": Region(x=10, y=20, width=30, height=40),
        "heatmap_key": "heatmaps/proc-1/000042.png",
        "heatmap_bucket": "crc-heatmaps",
        "explanation_method": "Grad-CAM on encoder stage 4, presence logit",
        "model": DETECTOR,
    }
    fields.update(changes)
    return PolypFinding(**fields)


def prognosis(contributions: int = 8, missing: list[str] | None = None, **changes: Any) -> PrognosisResult:
    fields: dict[str, Any] = {
        "record_event_id": uuid.uuid4(),
        "patient_id": "pt-0001",
        "horizon_years": 5,
        "recurrence_probability": 0.61,
        "risk_group": "high",
        "base_value": -0.1,
        "contributions": [
            FeatureContribution(
                feature=f"f{index}", label=f"Feature {index}", value=index, display_value=str(index), contribution=0.1
            )
            for index in range(contributions)
        ],
        "missing_features": missing or [],
        "model": RECURRENCE_MODEL,
        "inference_ms": 2.0,
        "explanation_scale": "log-hazard",
        "probabilities": [
            HorizonProbability(horizon_years=3, probability=0.48),
            HorizonProbability(horizon_years=5, probability=0.61),
        ],
        "top_contributions": ["Positive lymph nodes = 5 raises the risk"],
        "decision_path": ["Positive lymph nodes > 4", "high risk"],
    }
    fields.update(changes)
    return PrognosisResult(**fields)


def report_of(*findings: PolypFinding) -> dict[str, Any]:
    return diagnostic_report(findings[0].procedure_id, [ReportedFinding.from_finding(item) for item in findings])


# Each kind of resource the consumer emits, built from unit-test inputs.
BUILDERS: dict[str, Callable[[], dict[str, Any]]] = {
    "finding-observation": lambda: finding_observation(finding()),
    "heatmap-media": lambda: heatmap_media(finding()),
    "diagnostic-report": lambda: report_of(finding(), finding(status="open")),
    "risk-observation": lambda: risk_observation(prognosis()),
    "risk-assessment": lambda: risk_assessment(prognosis()),
    "device": lambda: model_device(DETECTOR, MODEL_CARDS),
}


@pytest.mark.parametrize("kind", BUILDERS)
def test_resource_json_round_trip(kind: str) -> None:
    resource = BUILDERS[kind]()
    model_class = get_fhir_model_class(resource["resourceType"])

    parsed = model_class.model_validate_json(json.dumps(resource))

    assert parsed.model_dump(mode="json", exclude_none=True) == resource
    assert parsed.id == resource["id"]


@pytest.mark.parametrize("kind", BUILDERS)
def test_resource_has_crc_identifier(kind: str) -> None:
    resource = BUILDERS[kind]()

    systems = [identifier["system"] for identifier in resource["identifier"]]

    assert systems[0].startswith("urn:crc-medai:")
    assert resource["identifier"][0]["value"]


def test_finding_observation_content() -> None:
    source = finding()

    resource = finding_observation(source)

    assert resource["code"]["coding"][0] == {
        "system": "http://snomed.info/sct",
        "code": "68496003",
        "display": "Polyp of colon",
    }
    assert resource["valueQuantity"]["value"] == 0.93
    assert resource["meta"]["security"][0]["code"] == "AIAST"
    assert resource["effectivePeriod"] == {"start": "2026-03-02T09:41:07Z", "end": "2026-03-02T09:41:07.500000Z"}
    assert resource["partOf"][0]["identifier"] == {"system": "urn:crc-medai:procedure", "value": "proc-1"}
    assert resource["device"]["reference"] == f"Device/{model_device(DETECTOR, MODEL_CARDS)['id']}"
    assert resource["derivedFrom"][0]["reference"] == f"Media/{heatmap_media(source)['id']}"


def test_finding_region_components() -> None:
    resource = finding_observation(finding())

    values = {component["code"]["coding"][0]["code"]: component for component in resource["component"]}

    assert values["representative-frame"]["valueInteger"] == 42
    assert values["frames-flagged"]["valueInteger"] == 14
    regions = [values[f"region-{name}"]["valueInteger"] for name in ("x", "y", "width", "height")]
    assert regions == [10, 20, 30, 40]
    assert "pixels" in values["region-width"]["code"]["text"]
    assert "x=10 y=20 width=30 height=40 pixels" in resource["text"]["div"]


def test_heatmap_media_links_minio_object() -> None:
    media = heatmap_media(finding(heatmap_key="heatmaps/proc 1/000042.png"))

    assert media is not None
    assert media["content"]["url"] == "s3://crc-heatmaps/heatmaps/proc%201/000042.png"
    assert media["content"]["contentType"] == "image/png"
    assert media["device"]["reference"].startswith("Device/")


def test_finding_without_region_or_heatmap() -> None:
    source = finding(region=None, heatmap_key=None, heatmap_bucket=None)

    resource = finding_observation(source)

    codes = [component["code"]["coding"][0]["code"] for component in resource["component"]]
    assert codes == ["representative-frame", "frames-flagged"]
    assert "derivedFrom" not in resource
    assert heatmap_media(source) is None


def test_finding_method_same_with_heatmap() -> None:
    # An open finding goes out before its heatmap and again with it; both events name the detector.
    without = finding_observation(finding(heatmap_key=None, heatmap_bucket=None, explanation_method=None))
    with_heatmap = finding_observation(finding())

    assert without["method"] == with_heatmap["method"]
    assert with_heatmap["method"]["text"] == DETECTION_METHOD
    assert "Grad-CAM" in with_heatmap["derivedFrom"][0]["display"]


def test_finding_period_reversed_rejected() -> None:
    reversed_times = finding(last_seen=SEEN_AT - timedelta(seconds=1))

    with pytest.raises(ResourceValidationError, match="last_seen .* before first_seen"):
        finding_observation(reversed_times)


def test_finding_id_is_stable_per_finding() -> None:
    opened = finding(status="open")
    closed = finding(finding_id=opened.finding_id, status="closed")

    first = finding_observation(opened)
    second = finding_observation(closed)

    assert first["id"] == second["id"] == resource_id("finding", opened.finding_id)
    assert first["identifier"] == second["identifier"]
    assert finding_observation(finding())["id"] != first["id"]


def test_same_input_same_resources() -> None:
    source = finding()
    result = prognosis()

    assert finding_observation(source) == finding_observation(source)
    assert heatmap_media(source) == heatmap_media(source)
    assert risk_observation(result) == risk_observation(result)
    assert risk_assessment(result) == risk_assessment(result)
    assert model_device(DETECTOR, MODEL_CARDS) == model_device(DETECTOR, MODEL_CARDS)


def test_risk_observation_carries_top_contributions() -> None:
    resource = risk_observation(prognosis(contributions=8))

    assert resource["subject"]["reference"] == "Patient/pt-0001"
    assert len(resource["component"]) == TOP_CONTRIBUTIONS
    assert resource["component"][0]["valueQuantity"]["unit"] == "log-hazard"
    assert resource["valueQuantity"]["value"] == 0.61
    assert resource["code"]["text"] == "Probability of colon cancer recurrence within 5 years"
    assert resource["identifier"][0]["system"] == "urn:crc-medai:risk-observation"
    assert resource["device"]["reference"] == f"Device/{model_device(RECURRENCE_MODEL, MODEL_CARDS)['id']}"


def test_risk_observation_reports_missing_features() -> None:
    resource = risk_observation(prognosis(missing=["nodes", "differ"]))

    assert resource["note"][0]["text"] == "Missing from the record: nodes, differ"


def test_risk_ids_stable_per_record_and_model() -> None:
    first = prognosis()
    rescored = prognosis(record_event_id=first.record_event_id)
    new_model = prognosis(
        record_event_id=first.record_event_id, model=ModelRef(name=RECURRENCE_MODEL.name, version="3")
    )

    assert rescored.event_id != first.event_id
    assert risk_assessment(rescored)["id"] == risk_assessment(first)["id"]
    assert risk_observation(rescored)["id"] == risk_observation(first)["id"]
    assert risk_assessment(new_model)["id"] != risk_assessment(first)["id"]
    assert risk_assessment(first)["id"] != risk_observation(first)["id"]


def test_risk_assessment_predictions() -> None:
    resource = risk_assessment(prognosis())

    predictions = resource["prediction"]
    assert [item["probabilityDecimal"] for item in predictions] == [0.48, 0.61]
    assert [item["whenRange"]["high"]["value"] for item in predictions] == [3, 5]
    assert {item["whenRange"]["high"]["code"] for item in predictions} == {"a"}
    assert [item["whenRange"]["low"]["value"] for item in predictions] == [0, 0]
    assert "qualitativeRisk" not in predictions[0]
    assert predictions[1]["qualitativeRisk"]["coding"][0]["code"] == "high"
    assert predictions[1]["rationale"] == "Largest contributions: Positive lymph nodes = 5 raises the risk"


def test_risk_assessment_references() -> None:
    result = prognosis()

    resource = risk_assessment(result)

    assert resource["subject"]["reference"] == "Patient/pt-0001"
    assert resource["performer"]["reference"] == f"Device/{model_device(RECURRENCE_MODEL, MODEL_CARDS)['id']}"
    assert resource["basis"][0]["identifier"] == {
        "system": "urn:crc-medai:patient-record",
        "value": str(result.record_event_id),
    }
    assert "crc-recurrence-survival-catboost 2.0.0" in resource["method"]["text"]
    assert resource["note"][0]["text"] == "Decision path of the surrogate tree: Positive lymph nodes > 4 -> high risk"


def test_risk_assessment_single_horizon_model() -> None:
    resource = risk_assessment(prognosis(probabilities=[], risk_group="intermediate", explanation_scale="log-odds"))

    assert len(resource["prediction"]) == 1
    assert resource["prediction"][0]["probabilityDecimal"] == 0.61
    assert resource["prediction"][0]["qualitativeRisk"]["coding"][0]["code"] == "moderate"


def test_device_describes_model_version() -> None:
    resource = model_device(DETECTOR, MODEL_CARDS)

    assert resource["deviceName"][0] == {"name": "polyp-unet", "type": "model-name"}
    assert resource["version"] == [{"value": "0.1.0"}]
    assert resource["manufacturer"] == "CRC-MedAI project"
    assert resource["extension"] == [
        {
            "url": MODEL_CARD_EXTENSION,
            "valueUrl": "https://models.example.org/crc-medai/processors/detection/weights/MODEL_CARD.md",
        }
    ]
    assert resource["identifier"][0] == {"system": "urn:crc-medai:device", "value": "polyp-unet:0.1.0"}


def test_device_of_unknown_model_has_no_card() -> None:
    resource = model_device(ModelRef(name="other-model", version="1"), MODEL_CARDS)

    assert "extension" not in resource
    assert resource["deviceName"] == [{"name": "other-model", "type": "model-name"}]


def test_diagnostic_report_groups_findings() -> None:
    earlier = finding(first_seen=SEEN_AT - timedelta(minutes=3), last_seen=SEEN_AT - timedelta(minutes=2))
    later = finding(status="open", heatmap_key=None, heatmap_bucket=None)

    report = report_of(later, earlier)

    assert report["result"] == [
        {"reference": f"Observation/{finding_observation(earlier)['id']}"},
        {"reference": f"Observation/{finding_observation(later)['id']}"},
    ]
    assert report["status"] == "partial"
    assert report["effectivePeriod"]["start"] == "2026-03-02T09:38:07Z"
    assert report["media"] == [
        {
            "comment": heatmap_media(earlier)["content"]["title"],
            "link": {"reference": f"Media/{heatmap_media(earlier)['id']}"},
        }
    ]
    assert report["identifier"][0] == {"system": "urn:crc-medai:diagnostic-report", "value": "proc-1"}


def test_diagnostic_report_closed_is_preliminary() -> None:
    report = report_of(finding(), finding())

    assert report["status"] == "preliminary"
    assert report["id"] == resource_id("diagnostic-report", "proc-1")


def test_diagnostic_report_needs_findings() -> None:
    with pytest.raises(ValueError, match="procedure proc-1 has no findings"):
        diagnostic_report("proc-1", [])


def test_validate_names_invalid_element() -> None:
    resource = {"resourceType": "Observation", "id": "x", "status": "preliminary", "code": {"text": "x"}}
    resource["valueQuantity"] = {"value": "not a number"}

    with pytest.raises(ResourceValidationError, match="Observation x is not valid FHIR R4: valueQuantity"):
        validate(resource)


def test_validate_rejects_unknown_resource_type() -> None:
    with pytest.raises(ResourceValidationError, match="'Transport' is not an R4B resource type"):
        validate({"resourceType": "Transport"})


def test_write_resource_replaces_same_id(tmp_path) -> None:
    resource = finding_observation(finding())

    first = write_resource(tmp_path, resource)
    second = write_resource(tmp_path, resource)

    assert first == second
    assert list((tmp_path / "fhir" / "Observation").iterdir()) == [first]


# Redis state of the FHIR consumer, against the stack's Redis


async def stored_findings(settings: Settings, events: list[PolypFinding]) -> list[ReportedFinding]:
    redis = Redis.from_url(settings.redis_url)
    try:
        store = ProcedureFindings(redis, settings)
        listed: list[ReportedFinding] = []
        for event in events:
            listed = await store.add(event)
        await redis.delete(store.key("proc-1"))
        return listed
    finally:
        await redis.aclose()


@pytest.mark.integration
def test_procedure_findings_keep_every_finding(settings: Settings) -> None:
    first = finding(status="open")
    second = finding(status="open")
    events = [first, second, finding(finding_id=first.finding_id, status="closed")]

    listed = asyncio.run(stored_findings(settings, events))

    statuses = {item.finding_id: item.status for item in listed}
    assert statuses == {str(first.finding_id): "closed", str(second.finding_id): "open"}


@pytest.mark.integration
def test_procedure_findings_ignore_late_open(settings: Settings) -> None:
    closed = finding(status="closed")
    events = [closed, finding(finding_id=closed.finding_id, status="open")]

    listed = asyncio.run(stored_findings(settings, events))

    assert [item.status for item in listed] == ["closed"]


async def device_states(settings: Settings) -> list[bool]:
    redis = Redis.from_url(settings.redis_url)
    try:
        states = [await EmittedDevices(redis, settings).is_new(DETECTOR)]
        await EmittedDevices(redis, settings).mark_emitted(DETECTOR)
        states.append(await EmittedDevices(redis, settings).is_new(DETECTOR))
        states.append(await EmittedDevices(redis, settings).is_new(RECURRENCE_MODEL))
        await redis.delete(EmittedDevices(redis, settings).key)
        return states
    finally:
        await redis.aclose()


@pytest.mark.integration
def test_emitted_devices_survive_restart(settings: Settings) -> None:
    # A new EmittedDevices per call stands for a restarted consumer: only Redis remembers.
    assert asyncio.run(device_states(settings)) == [True, False, True]


# The FHIR consumer service, against the stack's Kafka and Redis


@pytest.fixture(scope="module")
def consumer_settings(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return isolated_settings(stack, tmp_path_factory.mktemp("fhir-consumer") / "out")


@pytest.fixture(scope="module")
def consumer(consumer_settings: Settings) -> Iterator[RunningServices]:
    yield from running_services(consumer_settings, consumer_settings.output_dir / "logs", ("fhir-consumer",))


def collect(
    settings: Settings, services: RunningServices, resources: int, dead_letters: int
) -> dict[str, list[Record]]:
    def done(records: list[Record]) -> bool:
        topics = [record.topic for record in records]
        return services.any_stopped() or (
            topics.count(settings.topic("fhir-resources")) >= resources
            and topics.count(settings.topic("dlq.fhir-consumer")) >= dead_letters
        )

    records = asyncio.run(collect_records(settings, ["fhir-resources", "dlq.fhir-consumer"], until=done, timeout_s=180))
    by_topic: dict[str, list[Record]] = {"fhir-resources": [], "dlq.fhir-consumer": []}
    for record in records:
        by_topic[record.topic.removeprefix(settings.topic_prefix)].append(record)
    return by_topic


# Bad inputs of the FHIR consumer: (case, topic, value, error type in the dead-letter headers).
BAD_INPUTS: list[tuple[str, str, bytes | None, str]] = [
    ("finding not json", "findings", b"\x00not json", "ValidationError"),
    (
        "finding wrong schema",
        "findings",
        json.dumps({"schema_version": 1, "finding_id": "x"}).encode(),
        "ValidationError",
    ),
    ("finding tombstone", "findings", None, "ValueError"),
    (
        "finding period reversed",
        "findings",
        finding(procedure_id="proc-bad", last_seen=SEEN_AT - timedelta(seconds=1)).to_bytes(),
        "ResourceValidationError",
    ),
    ("prognosis not json", "prognoses", b"{", "ValidationError"),
    (
        "prognosis unknown version",
        "prognoses",
        prognosis().to_bytes().replace(b'"schema_version":1', b'"schema_version":9'),
        "ValidationError",
    ),
]


@dataclass(frozen=True)
class ConsumerRun:
    """What the FHIR consumer published for the inputs, then for the same valid inputs sent again."""

    first: list[FhirResourceEvent]
    replayed: list[FhirResourceEvent]
    dead_letters: list[Record]


@pytest.fixture(scope="module")
def consumer_run(consumer_settings: Settings, consumer: RunningServices) -> ConsumerRun:
    settings = consumer_settings
    opened = finding(status="open", procedure_id="proc-7")
    closed = finding(finding_id=opened.finding_id, status="closed", procedure_id="proc-7")
    valid = [
        ("findings", b"proc-7", opened.to_bytes()),
        ("findings", b"proc-7", closed.to_bytes()),
        ("prognoses", b"pt-0001", prognosis().to_bytes()),
    ]
    bad = [(topic, b"bad", value) for _, topic, value, _ in BAD_INPUTS]

    # The bad inputs sit between valid ones, so the valid ones after them show that nothing else is lost.
    asyncio.run(send_all(settings, [valid[0], *bad, *valid[1:]]))
    first = collect(settings, consumer, FIRST_PASS_RESOURCES, len(BAD_INPUTS))
    asyncio.run(send_all(settings, valid))
    both = collect(settings, consumer, FIRST_PASS_RESOURCES + REPLAY_RESOURCES, len(BAD_INPUTS))

    seen = {(record.partition, record.offset) for record in first["fhir-resources"]}
    replayed = [record for record in both["fhir-resources"] if (record.partition, record.offset) not in seen]
    return ConsumerRun(
        first=[FhirResourceEvent.from_bytes(record.value) for record in first["fhir-resources"]],
        replayed=[FhirResourceEvent.from_bytes(record.value) for record in replayed],
        dead_letters=first["dlq.fhir-consumer"],
    )


# First pass: the open finding gives Device, Media, Observation and DiagnosticReport, the closed finding the last
# three again, the prognosis a second Device, the RiskAssessment and the risk Observation.
FIRST_PASS_RESOURCES = 10
# The replay gives the same minus the two Devices, which were already emitted.
REPLAY_RESOURCES = 8


@pytest.mark.integration
def test_consumer_emits_every_kind(consumer_run: ConsumerRun) -> None:
    kinds = sorted(event.resource_type for event in consumer_run.first)

    assert kinds == sorted(
        ["Device", "Media", "Observation", "DiagnosticReport"]
        + ["Media", "Observation", "DiagnosticReport"]
        + ["Device", "RiskAssessment", "Observation"]
    )
    for event in consumer_run.first:
        assert get_fhir_model_class(event.resource_type).model_validate(event.resource).id == event.resource_id


@pytest.mark.integration
def test_consumer_references_resolve(consumer_run: ConsumerRun) -> None:
    emitted = {f"{event.resource_type}/{event.resource_id}" for event in consumer_run.first}

    for event in consumer_run.first:
        for reference in references(event.resource):
            assert reference in emitted, f"{event.resource_type} refers to {reference}, which was not emitted"


@pytest.mark.integration
def test_consumer_report_lists_closed_finding(consumer_run: ConsumerRun) -> None:
    reports = [event.resource for event in consumer_run.first if event.resource_type == "DiagnosticReport"]

    assert [report["status"] for report in reports] == ["partial", "preliminary"]
    assert reports[0]["id"] == reports[1]["id"]
    assert len(reports[1]["result"]) == 1


@pytest.mark.integration
def test_consumer_replay_publishes_same_resources(consumer_run: ConsumerRun) -> None:
    first = {(event.source_event_id, event.resource_id): event.resource for event in consumer_run.first}
    latest_report = [event.resource for event in consumer_run.first if event.resource_type == "DiagnosticReport"][-1]

    assert len(consumer_run.replayed) == REPLAY_RESOURCES
    assert "Device" not in {event.resource_type for event in consumer_run.replayed}
    for event in consumer_run.replayed:
        if event.resource_type == "DiagnosticReport":
            # Redis already contains the closed finding, so even the replayed open event yields the final report.
            assert event.resource == latest_report
        else:
            assert event.resource == first[(event.source_event_id, event.resource_id)]


@pytest.mark.integration
def test_consumer_writes_each_resource_once(consumer_settings: Settings, consumer_run: ConsumerRun) -> None:
    written = sorted(path.stem for path in (consumer_settings.output_dir / "fhir").rglob("*.json"))

    assert written == sorted({event.resource_id for event in consumer_run.first})


@pytest.mark.integration
def test_consumer_dead_letters_bad_inputs(consumer_settings: Settings, consumer_run: ConsumerRun) -> None:
    dead = consumer_run.dead_letters

    # The two agents run concurrently, so only the order within each input topic is fixed.
    for topic in ("findings", "prognoses"):
        from_topic = [record for record in dead if record.headers["crc-origin-topic"] == consumer_settings.topic(topic)]
        cases = [(value, kind) for _, source, value, kind in BAD_INPUTS if source == topic]
        assert [(record.value, record.headers["crc-error-type"]) for record in from_topic] == cases
    for record in dead:
        assert record.headers["crc-service"] == "fhir-consumer"
        assert record.headers["crc-error"]
    reversed_period = [record for record in dead if record.headers["crc-error-type"] == "ResourceValidationError"]
    assert "last_seen" in reversed_period[0].headers["crc-error"]


def references(resource: Any) -> Iterator[str]:
    """Yield every literal ``Type/id`` reference in a resource."""
    if isinstance(resource, dict):
        for key, value in resource.items():
            if key == "reference" and isinstance(value, str) and not value.startswith("Patient/"):
                yield value
            else:
                yield from references(value)
    elif isinstance(resource, list):
        for item in resource:
            yield from references(item)
