"""FHIR view and read API: search semantics, scopes, OperationOutcome errors, OpenAPI conformance, rebuild."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
import schemathesis
from fastapi.testclient import TestClient
from fhir.resources.R4B import get_fhir_model_class
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from pydantic import SecretStr
from schemathesis.specs.openapi.checks import positive_data_acceptance

from consumers.fhir_api import Scope, TokenConfigError, create_app, parse_tokens
from consumers.view import (
    FhirView,
    SearchParameterError,
    ViewKeys,
    ViewWriter,
    date_interval,
    parse_search,
    rebuild,
    view_keys,
)
from crc_medai.kafka import collect_records, create_producer, ensure_topics
from crc_medai.settings import Settings
from schemas.messages import FhirResourceEvent
from tests.conftest import RunningServices, isolated_settings, running_services

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
CRC = "https://crc-medai.example/fhir/CodeSystem/results"

TOKENS = {
    "all-token": "system/*.read",
    "observation-token": "system/Observation.read",
    "v2-device-token": "user/Device.rs",
    "media-token": "system/Media.read",
    "v2-read-only-token": "system/Observation.r",
    "patient-token": "patient/*.read",
    "write-token": "system/*.write",
}


def validated(resource: dict[str, Any]) -> dict[str, Any]:
    """Check a resource against its fhir.resources R4B model and return it unchanged."""
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    return resource


def identifier(kind: str, value: str) -> list[dict[str, str]]:
    return [{"system": f"urn:crc-medai:{kind}", "value": value}]


def finding(number: int, patient: str = "pt-1", start: str = "2026-03-02T09:41:07+00:00") -> dict[str, Any]:
    return validated(
        {
            "resourceType": "Observation",
            "id": f"finding-{number}",
            "identifier": identifier("finding", f"f-{number}"),
            "status": "preliminary",
            "code": {"coding": [{"system": SNOMED, "code": "68496003", "display": "Polyp of colon"}]},
            "subject": {"reference": f"Patient/{patient}"},
            "encounter": {"reference": "Encounter/enc-1"},
            "effectivePeriod": {"start": start, "end": "2026-03-02T09:41:09+00:00"},
            "valueQuantity": {"value": 0.9, "unit": "probability", "system": "http://unitsofmeasure.org", "code": "1"},
            "device": {"reference": "Device/model-1"},
        }
    )


def risk_observation() -> dict[str, Any]:
    return validated(
        {
            "resourceType": "Observation",
            "id": "risk-1",
            "identifier": identifier("risk", "r-1"),
            "status": "preliminary",
            "code": {"coding": [{"system": CRC, "code": "recurrence-risk-5y"}]},
            "subject": {"reference": "Patient/pt-2"},
            "effectiveDateTime": "2025-11-20T10:00:00Z",
            "valueQuantity": {"value": 0.31, "unit": "probability", "system": "http://unitsofmeasure.org", "code": "1"},
        }
    )


def risk_assessment() -> dict[str, Any]:
    return validated(
        {
            "resourceType": "RiskAssessment",
            "id": "assessment-1",
            "identifier": identifier("risk-assessment", "ra-1"),
            "status": "preliminary",
            "code": {"coding": [{"system": CRC, "code": "recurrence-risk"}]},
            "subject": {"reference": "Patient/pt-2"},
            "occurrenceDateTime": "2025-11-20T10:00:00Z",
            "performer": {"reference": "Device/model-1"},
            "prediction": [
                {"probabilityDecimal": 0.2, "whenRange": {"high": {"value": 3, "unit": "a"}}},
                {"probabilityDecimal": 0.31, "whenRange": {"high": {"value": 5, "unit": "a"}}},
            ],
        }
    )


def diagnostic_report() -> dict[str, Any]:
    return validated(
        {
            "resourceType": "DiagnosticReport",
            "id": "report-1",
            "identifier": identifier("report", "proc-1"),
            "status": "preliminary",
            "code": {"coding": [{"system": LOINC, "code": "18746-8", "display": "Colonoscopy study"}]},
            "subject": {"reference": "Patient/pt-1"},
            "encounter": {"reference": "Encounter/enc-1"},
            "effectiveDateTime": "2026-03-02",
            "result": [{"reference": "Observation/finding-1"}],
        }
    )


def media() -> dict[str, Any]:
    return validated(
        {
            "resourceType": "Media",
            "id": "heatmap-1",
            "identifier": identifier("heatmap", "f-1"),
            "status": "completed",
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/media-type", "code": "image"}]},
            "subject": {"reference": "Patient/pt-1"},
            "encounter": {"reference": "Encounter/enc-1"},
            "createdPeriod": {"start": "2026-03-02T09:41:07+00:00", "end": "2026-03-02T09:41:09+00:00"},
            "device": {"reference": "Device/model-1"},
            "content": {"contentType": "image/png", "url": "s3://crc-heatmaps/heatmaps/proc-1/000004.png"},
        }
    )


def device() -> dict[str, Any]:
    return validated(
        {
            "resourceType": "Device",
            "id": "model-1",
            "identifier": identifier("device", "polyp-unet-0.1.0"),
            "deviceName": [{"name": "polyp-unet", "type": "model-name"}],
            "manufacturer": "CRC-MedAI",
            "type": {"coding": [{"system": SNOMED, "code": "706689003", "display": "Application program software"}]},
            "version": [{"value": "0.1.0"}],
        }
    )


def all_resources() -> list[dict[str, Any]]:
    findings = [finding(number, patient="pt-1" if number < 5 else "pt-3") for number in range(1, 8)]
    return [*findings, risk_observation(), risk_assessment(), diagnostic_report(), media(), device()]


def event(resource: dict[str, Any]) -> FhirResourceEvent:
    return FhirResourceEvent(
        source_event_id=uuid.uuid4(),
        resource_type=resource["resourceType"],
        resource_id=resource["id"],
        resource=resource,
    )


async def write_view(settings: Settings, resources: list[dict[str, Any]]) -> None:
    client = redis.asyncio.Redis.from_url(settings.redis_url)
    try:
        writer = ViewWriter(client, view_keys(settings))
        await writer.clear()
        for offset, resource in enumerate(resources):
            await writer.put(event(resource), partition=0, offset=offset)
    finally:
        await client.aclose()


# --- scopes, tokens and dates (no services) ------------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "resource_type", "interaction", "granted"),
    [
        ("system/Observation.read", "Observation", "read", True),
        ("system/Observation.read", "Observation", "search", True),
        ("system/Observation.read", "Device", "read", False),
        ("system/*.read", "RiskAssessment", "search", True),
        ("user/*.*", "Device", "read", True),
        ("system/Observation.write", "Observation", "read", False),
        ("system/Observation.rs", "Observation", "search", True),
        ("system/Observation.r", "Observation", "search", False),
        ("system/Observation.s", "Observation", "read", False),
        ("system/Observation.cruds", "Observation", "read", True),
        ("patient/*.read", "Observation", "read", False),
    ],
)
def test_scope_grants(scope: str, resource_type: str, interaction: Any, granted: bool) -> None:
    assert Scope.parse(scope).grants(resource_type, interaction) is granted


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("not json", "not valid JSON"),
        ('["a"]', "JSON object"),
        ('{"t": ""}', "entry 1 needs"),
        ('{"t": "system/Observation"}', "not a SMART scope"),
        ('{"t": "admin/Observation.read"}', "not a SMART scope"),
        ('{"t": "system/Observation.sr"}', "not a SMART scope"),
    ],
)
def test_token_config_rejected(config: str, message: str) -> None:
    with pytest.raises(TokenConfigError, match=message):
        parse_tokens(config)


def test_token_config_keeps_only_digests() -> None:
    tokens = parse_tokens(json.dumps({"secret-token": "system/*.read"}))

    assert "secret-token" not in tokens
    assert list(tokens.values()) == [(Scope("system", "*", "read"),)]


@pytest.mark.parametrize(
    ("text", "start", "end"),
    [
        ("2026", "2026-01-01T00:00:00+00:00", "2027-01-01T00:00:00+00:00"),
        ("2026-12", "2026-12-01T00:00:00+00:00", "2027-01-01T00:00:00+00:00"),
        ("2026-03-02", "2026-03-02T00:00:00+00:00", "2026-03-03T00:00:00+00:00"),
        ("2026-03-02T09:41", "2026-03-02T09:41:00+00:00", "2026-03-02T09:42:00+00:00"),
        ("2026-03-02T09:41:07+02:00", "2026-03-02T07:41:07+00:00", "2026-03-02T07:41:08+00:00"),
        ("2026-03-02T09:41:07.5Z", "2026-03-02T09:41:07.500000+00:00", "2026-03-02T09:41:07.600000+00:00"),
    ],
)
def test_date_interval_precision(text: str, start: str, end: str) -> None:
    low, high = date_interval(text)

    assert low.isoformat() == start
    assert high.isoformat() == end


@pytest.mark.parametrize("text", ["2026-13", "20260302", "2026-02-30", "yesterday", "2026-03-02T25:00Z"])
def test_date_interval_rejects_invalid(text: str) -> None:
    with pytest.raises(ValueError, match="date"):
        date_interval(text)


# Observation with effectivePeriod 2026-03-02T09:41:07Z .. 09:41:09Z.
@pytest.mark.parametrize(
    ("value", "matches"),
    [
        ("2026-03-02", True),
        ("eq2026", True),
        ("eq2026-03-03", False),
        ("ne2026-03-03", True),
        ("ge2026-03-02T09:41:08Z", True),
        ("gt2026-03-02T09:41:09Z", False),
        ("gt2026-03-01", True),
        ("lt2026-03-02T09:41:08Z", True),
        ("lt2026-03-02T09:41:07Z", False),
        ("le2026-03-02", True),
        ("sa2026-03-01", True),
        ("sa2026-03-02", False),
        ("eb2026-03-03", True),
        ("eb2026-03-02", False),
    ],
)
def test_date_search_prefixes(value: str, matches: bool) -> None:
    query = parse_search("Observation", [("date", value)])
    resource = finding(1, start="2026-03-02T09:41:07Z")

    assert all(check(resource) for check in query.filters) is matches


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("status", "final", "unknown search parameter 'status'"),
        ("code:text", "polyp", "modifiers are not supported"),
        ("date", "ap2026", "not a FHIR date"),
        ("date", "", "empty value"),
        ("code", "|", "neither system nor code"),
        ("patient", "http://x/", "not a reference"),
    ],
)
def test_search_rejects_bad_parameters(name: str, value: str, message: str) -> None:
    with pytest.raises(SearchParameterError, match=message):
        parse_search("Observation", [(name, value)])


def test_unreachable_view_is_503() -> None:
    settings = Settings(fhir_api_tokens=SecretStr(json.dumps(TOKENS)))
    app = create_app(settings, client=redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5))

    with TestClient(app) as client:
        response = client.get("/Observation/x", headers={"Authorization": "Bearer all-token"})

    assert response.status_code == 503
    assert response.json()["issue"][0]["code"] == "transient"


# --- the API over a real Redis -------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_settings(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    settings = isolated_settings(stack, tmp_path_factory.mktemp("fhir-api") / "out")
    settings = settings.model_copy(update={"fhir_api_tokens": SecretStr(json.dumps(TOKENS))})
    asyncio.run(write_view(settings, all_resources()))
    yield settings
    asyncio.run(write_view(settings, []))


@pytest.fixture(scope="module")
def client(api_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(api_settings)) as test_client:
        yield test_client


def get(client: TestClient, path: str, token: str | None = "all-token", **params: Any) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.get(path, headers=headers, params=params)


def ids(bundle: dict[str, Any]) -> list[str]:
    return [entry["resource"]["id"] for entry in bundle.get("entry", [])]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("path", "resource"),
    [
        ("/Observation/risk-1", risk_observation()),
        ("/RiskAssessment/assessment-1", risk_assessment()),
        ("/DiagnosticReport/report-1", diagnostic_report()),
        ("/Media/heatmap-1", media()),
        ("/Device/model-1", device()),
    ],
)
def test_read_by_id(client: TestClient, path: str, resource: dict[str, Any]) -> None:
    response = get(client, path)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/fhir+json")
    assert response.json() == resource


@pytest.mark.integration
def test_read_unknown_id_is_404(client: TestClient) -> None:
    response = get(client, "/Observation/no-such-id")
    outcome = response.json()

    assert response.status_code == 404
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "not-found"
    assert "Observation/no-such-id" in outcome["issue"][0]["diagnostics"]
    get_fhir_model_class("OperationOutcome").model_validate(outcome)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("path", "params", "expected"),
    [
        ("/Observation", {"patient": "pt-2"}, ["risk-1"]),
        ("/Observation", {"patient": "Patient/pt-3"}, ["finding-5", "finding-6", "finding-7"]),
        ("/Observation", {"subject": "Patient/pt-2"}, ["risk-1"]),
        ("/Observation", {"code": f"{CRC}|recurrence-risk-5y"}, ["risk-1"]),
        ("/Observation", {"code": "68496003", "patient": "pt-3"}, ["finding-5", "finding-6", "finding-7"]),
        ("/Observation", {"code": f"{CRC}|"}, ["risk-1"]),
        ("/Observation", {"code": "http://other.example|68496003"}, []),
        ("/Observation", {"date": "2025-11"}, ["risk-1"]),
        ("/Observation", {"date": "lt2026-01-01", "patient": "pt-2,pt-1"}, ["risk-1"]),
        (
            "/Observation",
            {"encounter": "Encounter/enc-1", "_id": "finding-1,finding-2,risk-1"},
            ["finding-1", "finding-2"],
        ),
        ("/RiskAssessment", {"patient": "pt-2", "date": "ge2025-11-20"}, ["assessment-1"]),
        ("/RiskAssessment", {"code": "recurrence-risk"}, ["assessment-1"]),
        ("/RiskAssessment", {"patient": "pt-1"}, []),
        ("/DiagnosticReport", {"patient": "pt-1", "code": f"{LOINC}|18746-8"}, ["report-1"]),
        ("/DiagnosticReport", {"encounter": "enc-1", "date": "2026-03-02"}, ["report-1"]),
        ("/DiagnosticReport", {"date": "2026-03-03"}, []),
        ("/Media", {"patient": "pt-1"}, ["heatmap-1"]),
        ("/Media", {"subject": "Patient/pt-1", "encounter": "enc-1"}, ["heatmap-1"]),
        ("/Media", {"identifier": "urn:crc-medai:heatmap|f-1"}, ["heatmap-1"]),
        ("/Media", {"_id": "heatmap-1,finding-1"}, ["heatmap-1"]),
        ("/Media", {"type": "image", "created": "2026-03-02"}, ["heatmap-1"]),
        ("/Media", {"created": "gt2026-03-03"}, []),
        ("/Media", {"patient": "pt-2"}, []),
        ("/Device", {"type": "706689003"}, ["model-1"]),
        ("/Device", {"device-name": "POLYP"}, ["model-1"]),
        ("/Device", {"identifier": "urn:crc-medai:device|polyp-unet-0.1.0"}, ["model-1"]),
        ("/Device", {"manufacturer": "other"}, []),
    ],
)
def test_search(client: TestClient, path: str, params: dict[str, str], expected: list[str]) -> None:
    response = get(client, path, **params)
    bundle = response.json()

    assert response.status_code == 200, bundle
    assert bundle["type"] == "searchset"
    assert bundle["total"] == len(expected)
    assert ids(bundle) == expected
    get_fhir_model_class("Bundle").model_validate(bundle)


@pytest.mark.integration
def test_search_pages_with_next_links(client: TestClient) -> None:
    url = "/Observation?code=68496003&_count=3"
    pages = []
    while url:
        bundle = client.get(url, headers={"Authorization": "Bearer all-token"}).json()
        pages.append(ids(bundle))
        links = {link["relation"]: link["url"] for link in bundle["link"]}
        url = links.get("next", "")

    assert [len(page) for page in pages] == [3, 3, 1]
    assert sorted(sum(pages, [])) == sorted(f"finding-{number}" for number in range(1, 8))
    assert bundle["total"] == 7
    assert "previous" in links


@pytest.mark.integration
def test_search_count_zero_returns_total_only(client: TestClient) -> None:
    bundle = get(client, "/Observation", _count="0").json()

    assert bundle["total"] == 8
    assert ids(bundle) == []


@pytest.mark.integration
@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"status": "final"}, "unknown search parameter 'status'"),
        ({"date": "yesterday"}, "not a FHIR date"),
        ({"_count": "-1"}, "_count='-1' is not a whole number"),
        ({"_format": "xml"}, "_format='xml' is not served"),
    ],
)
def test_bad_search_is_400(client: TestClient, params: dict[str, str], message: str) -> None:
    response = get(client, "/Observation", **params)

    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"
    assert message in response.json()["issue"][0]["diagnostics"]


@pytest.mark.integration
def test_invalid_id_is_400(client: TestClient) -> None:
    response = get(client, "/Observation/bad_id!")

    assert response.status_code == 400
    assert response.json()["issue"][0]["code"] == "invalid"


@pytest.mark.integration
@pytest.mark.parametrize(
    ("token", "path", "status", "challenge"),
    [
        (None, "/Observation/risk-1", 401, 'Bearer realm="crc-medai"'),
        ("unknown-token", "/Observation/risk-1", 401, 'error="invalid_token"'),
        ("observation-token", "/Device/model-1", 403, 'scope="system/Device.read"'),
        ("observation-token", "/Media/heatmap-1", 403, 'scope="system/Media.read"'),
        ("media-token", "/Observation/risk-1", 403, 'scope="system/Observation.read"'),
        ("v2-read-only-token", "/Observation?patient=pt-2", 403, 'error="insufficient_scope"'),
        ("patient-token", "/Observation/risk-1", 403, 'error="insufficient_scope"'),
        ("write-token", "/RiskAssessment/assessment-1", 403, 'error="insufficient_scope"'),
    ],
)
def test_authorization_rejections(
    client: TestClient, token: str | None, path: str, status: int, challenge: str
) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = client.get(path, headers=headers)
    outcome = response.json()

    assert response.status_code == status
    assert challenge in response.headers["www-authenticate"]
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == ("login" if status == 401 else "forbidden")


@pytest.mark.integration
def test_basic_scheme_is_401(client: TestClient) -> None:
    response = client.get("/Observation/risk-1", headers={"Authorization": "Basic dXNlcjpwYXNz"})

    assert response.status_code == 401


@pytest.mark.integration
@pytest.mark.parametrize(
    ("token", "path"),
    [
        ("observation-token", "/Observation/risk-1"),
        ("v2-read-only-token", "/Observation/risk-1"),
        ("v2-device-token", "/Device?type=706689003"),
        ("v2-device-token", "/Device/model-1"),
        ("media-token", "/Media/heatmap-1"),
        ("media-token", "/Media?patient=pt-1"),
    ],
)
def test_authorized_requests(client: TestClient, token: str, path: str) -> None:
    assert client.get(path, headers={"Authorization": f"Bearer {token}"}).status_code == 200


@pytest.mark.integration
def test_metadata_is_capability_statement(client: TestClient) -> None:
    response = client.get("/metadata")
    statement = response.json()
    resources = {item["type"]: item for item in statement["rest"][0]["resource"]}

    assert response.status_code == 200
    get_fhir_model_class("CapabilityStatement").model_validate(statement)
    assert statement["fhirVersion"] == "4.0.1"
    assert sorted(resources) == ["Device", "DiagnosticReport", "Media", "Observation", "RiskAssessment"]
    observation_params = {param["name"] for param in resources["Observation"]["searchParam"]}
    assert {"patient", "code", "date", "encounter", "_id"} <= observation_params
    media_params = {param["name"] for param in resources["Media"]["searchParam"]}
    assert {"patient", "subject", "identifier", "created", "_id"} <= media_params


@pytest.mark.integration
def test_unknown_route_is_operation_outcome(client: TestClient) -> None:
    response = get(client, "/Patient/pt-1")

    assert response.status_code == 404
    assert response.json()["resourceType"] == "OperationOutcome"


# --- OpenAPI conformance with schemathesis -------------------------------------------------------

# The schema is loaded at import, so its app gets settings of its own; the fixture below fills its view.
# NOTE: schemathesis.pytest.from_fixture fails under pytest 9.2 (it sets a private node attribute).
SCHEMA_SETTINGS = Settings(topic_prefix=f"test-{uuid.uuid4().hex[:10]}.", fhir_api_tokens=SecretStr(json.dumps(TOKENS)))
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(SCHEMA_SETTINGS))


@pytest.fixture(scope="module")
def schema_view(stack: Settings) -> Iterator[None]:
    settings = SCHEMA_SETTINGS.model_copy(update={"redis_url": stack.redis_url})
    asyncio.run(write_view(settings, all_resources()))
    yield
    asyncio.run(write_view(settings, []))


@pytest.mark.integration
@schema.parametrize()
@hypothesis_settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_openapi(case: Any, schema_view: None) -> None:
    # A value the schema allows can still be unknown (404) or an invalid date (400), so positive
    # data acceptance is not checked. Every other default check runs.
    case.call_and_validate(headers={"Authorization": "Bearer all-token"}, excluded_checks=[positive_data_acceptance])


# --- the view worker and its rebuild -------------------------------------------------------------


@pytest.fixture(scope="module")
def view_settings(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return isolated_settings(stack, tmp_path_factory.mktemp("fhir-view") / "out")


@pytest.fixture(scope="module")
def view_service(view_settings: Settings) -> Iterator[RunningServices]:
    asyncio.run(ensure_topics(view_settings, ["fhir-resources", "dlq.fhir-view"]))
    yield from running_services(view_settings, view_settings.output_dir / "logs", ("fhir-view",))


async def publish(settings: Settings, records: list[tuple[bytes, bytes]]) -> None:
    producer = create_producer(settings)
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(settings.topic("fhir-resources"), key=key, value=value)
    finally:
        await producer.stop()


def open_view(settings: Settings) -> FhirView:
    return FhirView(redis.Redis.from_url(settings.redis_url), view_keys(settings))


@pytest.mark.integration
def test_view_rebuild_gives_same_view(view_settings: Settings, view_service: RunningServices) -> None:
    resources = all_resources()
    updated = {**finding(1), "status": "final"}
    records = [(resource["id"].encode(), event(resource).to_bytes()) for resource in resources]
    records += [(b"finding-1", event(updated).to_bytes()), (b"junk", b"not an event")]
    expected = {f"{resource['resourceType']}/{resource['id']}": resource for resource in [*resources, updated]}
    view = open_view(view_settings)

    asyncio.run(publish(view_settings, records))
    deadline = time.monotonic() + 120
    while view.snapshot() != expected and time.monotonic() < deadline and not view_service.any_stopped():
        time.sleep(0.3)
    built = view.snapshot()
    dead = asyncio.run(
        collect_records(view_settings, ["dlq.fhir-view"], until=lambda received: len(received) >= 1, timeout_s=60)
    )

    view.client.delete(view.keys.resource("Observation", "risk-1"))
    view.client.set(view.keys.prefix + "stray", "left from an older layout")
    summary = asyncio.run(rebuild(view_settings, timeout_s=120))
    rebuilt = view.snapshot()

    assert built == expected
    assert [record.value for record in dead] == [b"not an event"]
    assert rebuilt == built
    assert summary.records == len(records)
    assert summary.rejected == 1
    assert view.client.get(view.keys.prefix + "stray") is None
    assert [item["status"] for item in view.search(parse_search("Observation", [("_id", "finding-1")]))] == ["final"]
    assert len(view.search(parse_search("Observation", [("code", "68496003")]))) == 7


@pytest.mark.integration
def test_view_keeps_latest_version(view_settings: Settings) -> None:
    keys = ViewKeys(view_settings.redis_key("latest-test:"))
    newer = {**device(), "manufacturer": "Newer"}

    async def write_out_of_order() -> tuple[bool, bool]:
        client = redis.asyncio.Redis.from_url(view_settings.redis_url)
        try:
            writer = ViewWriter(client, keys)
            await writer.clear()
            return await writer.put(event(newer), partition=0, offset=5), await writer.put(event(device()), 0, 3)
        finally:
            await client.aclose()

    written = asyncio.run(write_out_of_order())
    view = FhirView(redis.Redis.from_url(view_settings.redis_url), keys)

    assert written == (True, False)
    assert view.read("Device", "model-1") == newer
    assert [item["id"] for item in view.search(parse_search("Device", [("manufacturer", "newer")]))] == ["model-1"]
    assert view.search(parse_search("Device", [("manufacturer", "crc")])) == []


# --- the resources the FHIR consumer emits -------------------------------------------------------


def consumer_resources() -> list[dict[str, Any]]:
    """Build one resource of each kind with the FHIR consumer's own builders."""
    from datetime import UTC, datetime, timedelta

    from consumers.devices import model_device
    from consumers.reports import ReportedFinding
    from consumers.reports import diagnostic_report as build_report
    from consumers.resources import finding_observation, heatmap_media, risk_assessment, risk_observation
    from schemas.messages import HorizonProbability, ModelRef, PolypFinding, PrognosisResult

    seen = datetime(2026, 3, 2, 9, 41, 7, tzinfo=UTC)
    polyp = PolypFinding(
        finding_id=uuid.uuid4(),
        procedure_id="proc-api-1",
        status="closed",
        first_sequence=1,
        last_sequence=9,
        first_seen=seen,
        last_seen=seen + timedelta(seconds=1),
        frames_flagged=9,
        peak_probability=0.9,
        representative_sequence=4,
        heatmap_key="heatmaps/proc-api-1/000004.png",
        heatmap_bucket="crc-heatmaps",
        explanation_method="Grad-CAM",
        model=ModelRef(name="polyp-unet", version="0.1.0"),
    )
    result = PrognosisResult(
        record_event_id=uuid.uuid4(),
        patient_id="pt-api-1",
        horizon_years=5,
        recurrence_probability=0.4,
        risk_group="intermediate",
        base_value=0.0,
        contributions=[],
        model=ModelRef(name="crc-recurrence-survival-catboost", version="2.0.0"),
        inference_ms=1.0,
        explanation_scale="log-hazard",
        probabilities=[
            HorizonProbability(horizon_years=3, probability=0.3),
            HorizonProbability(horizon_years=5, probability=0.4),
        ],
    )
    return [
        finding_observation(polyp),
        heatmap_media(polyp),
        build_report(polyp.procedure_id, [ReportedFinding.from_finding(polyp)]),
        risk_observation(result),
        risk_assessment(result),
        model_device(polyp.model, "https://models.example.org/"),
    ]


def test_consumer_resources_fit_transaction() -> None:
    from consumers.transaction import transaction_bundle, update_identifier

    resources = consumer_resources()
    bundle = transaction_bundle(resources)

    get_fhir_model_class("Bundle").model_validate(bundle)
    assert len(bundle["entry"]) == len(resources)
    for resource in resources:
        assert update_identifier(resource)[0].startswith("urn:crc-medai:")


@pytest.mark.integration
def test_consumer_resources_readable(stack: Settings, tmp_path: Any) -> None:
    settings = isolated_settings(stack, tmp_path / "out").model_copy(
        update={"fhir_api_tokens": SecretStr(json.dumps(TOKENS))}
    )
    resources = consumer_resources()
    asyncio.run(write_view(settings, resources))
    heatmap = next(resource for resource in resources if resource["resourceType"] == "Media")
    report = next(resource for resource in resources if resource["resourceType"] == "DiagnosticReport")

    try:
        with TestClient(create_app(settings)) as api:
            reads = [get(api, f"/{item['resourceType']}/{item['id']}") for item in resources]
            risks = get(api, "/RiskAssessment", patient="pt-api-1").json()
            heatmaps = get(api, "/Media", identifier=heatmap["identifier"][0]["value"]).json()
            referenced = [get(api, "/" + item["link"]["reference"]) for item in report["media"]]
    finally:
        asyncio.run(write_view(settings, []))

    assert [response.status_code for response in reads] == [200] * len(resources)
    assert [response.json() for response in reads] == resources
    assert risks["total"] == 1
    assert ids(heatmaps) == [heatmap["id"]]
    assert [response.json() for response in referenced] == [heatmap]
