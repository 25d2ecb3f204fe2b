"""FHIR delivery: transaction Bundles, retries against a flaky FHIR endpoint, dead letters, replays."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.observation import Observation

from consumers.delivery import (
    Delivery,
    FhirServerClient,
    RejectedDeliveryError,
    RetryableDeliveryError,
    RetryPolicy,
    send_with_retries,
)
from consumers.transaction import TransactionError, conditional_url, latest_versions, transaction_bundle
from crc_medai.kafka import Record, collect_records, create_producer, ensure_topics
from crc_medai.settings import Settings
from schemas.messages import FhirResourceEvent
from tests.conftest import RunningServices, isolated_settings, running_services

FAST_RETRIES = RetryPolicy(attempts=4, backoff_s=0.01, backoff_max_s=0.05)
POISON = "poison"


def observation(value: str, number: float = 0.5, system: str = "urn:crc-medai:finding") -> dict[str, Any]:
    """Build a small valid R4 Observation with one identifier."""
    resource = {
        "resourceType": "Observation",
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{system}|{value}")),
        "identifier": [{"system": system, "value": value}],
        "status": "preliminary",
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "68496003", "display": "Polyp of colon"}]},
        "subject": {"reference": "Patient/pt-1"},
        "effectiveDateTime": "2026-03-02T09:41:07+00:00",
        "valueQuantity": {"value": number, "unit": "probability", "system": "http://unitsofmeasure.org", "code": "1"},
    }
    Observation.model_validate(resource)
    return resource


# --- a FHIR endpoint for the tests ---------------------------------------------------------------


@dataclass
class FhirEndpoint:
    """A FHIR server that applies conditional updates by identifier, with scripted failures."""

    fail_first: int = 0
    time_out_first: int = 0
    delay_s: float = 0.0
    reject_status: int = 500
    store: dict[str, dict[str, Any]] = field(default_factory=dict)
    statuses: list[int] = field(default_factory=list)
    puts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, bundle: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self.lock:
            request_number = len(self.statuses)
            if request_number < self.time_out_first:
                self.statuses.append(0)
                return 0, {}
            if request_number < self.time_out_first + self.fail_first:
                self.statuses.append(503)
                return 503, outcome("transient", "the server is busy")
            if any(_identifier_value(entry) == POISON for entry in bundle.get("entry", [])):
                self.statuses.append(self.reject_status)
                return self.reject_status, outcome("exception", "this resource always fails")
            self.statuses.append(200)
            return 200, self._apply(bundle)

    def _apply(self, bundle: dict[str, Any]) -> dict[str, Any]:
        responses = []
        for entry in bundle["entry"]:
            assert entry["request"]["method"] == "PUT"
            key = unquote(entry["request"]["url"])
            created = key not in self.store
            self.store[key] = entry["resource"]
            self.puts += 1
            responses.append({"response": {"status": "201 Created" if created else "200 OK"}})
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": responses}


def _identifier_value(entry: dict[str, Any]) -> str:
    return entry["request"]["url"].rpartition("|")[2]


def outcome(code: str, text: str) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": text}]}


class _Handler(BaseHTTPRequestHandler):
    endpoint: FhirEndpoint

    def do_POST(self) -> None:  # noqa: N802 - name fixed by http.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        status, reply = self.endpoint.handle(body)
        if status == 0:
            # Respond after the client's timeout, without applying the Bundle.
            time.sleep(self.endpoint.delay_s)
            status, reply = 504, outcome("timeout", "too late")
        data = json.dumps(reply).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except BrokenPipeError:
            pass  # the client timed out and closed the connection

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature fixed by http.server
        pass


@pytest.fixture
def endpoint_factory() -> Iterator[Any]:
    servers: list[ThreadingHTTPServer] = []

    def start(endpoint: FhirEndpoint) -> str:
        handler = type("Handler", (_Handler,), {"endpoint": endpoint})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/fhir"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def deliver(url: str, resources: list[dict[str, Any]], policy: RetryPolicy = FAST_RETRIES, timeout_s: float = 5.0):
    async def run() -> dict[str, Any]:
        client = FhirServerClient(url, timeout_s=timeout_s)
        try:
            return await send_with_retries(client, transaction_bundle(resources, base_url=url), policy)
        finally:
            await client.aclose()

    return asyncio.run(run())


# --- transaction Bundles -------------------------------------------------------------------------


def test_transaction_bundle_shape() -> None:
    resources = [observation("f-1"), observation("f-2", 0.7)]

    bundle = transaction_bundle(resources, base_url="https://fhir.example/r4/")

    Bundle.model_validate(bundle)
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "transaction"
    assert [entry["resource"] for entry in bundle["entry"]] == resources
    for entry, resource in zip(bundle["entry"], resources, strict=True):
        assert entry["fullUrl"] == f"https://fhir.example/r4/Observation/{resource['id']}"
        assert entry["request"]["method"] == "PUT"
    assert bundle["entry"][0]["request"]["url"] == "Observation?identifier=urn:crc-medai:finding|f-1"


def test_conditional_url_prefers_project_identifier() -> None:
    resource = observation("x-1", system="https://hospital.example/ids")
    resource["identifier"].append({"system": "urn:crc-medai:event", "value": "e-9"})

    assert conditional_url(resource) == "Observation?identifier=urn:crc-medai:event|e-9"


def test_conditional_url_escapes_reserved_characters() -> None:
    resource = observation("a b&c#d", system="https://hospital.example/ids")

    assert conditional_url(resource) == "Observation?identifier=https://hospital.example/ids|a%20b%26c%23d"


@pytest.mark.parametrize(
    ("case", "change", "message"),
    [
        ("no identifier", lambda r: r.pop("identifier"), "no identifier with both system and value"),
        ("identifier without system", lambda r: r["identifier"][0].pop("system"), "no identifier"),
        ("no id", lambda r: r.pop("id"), "id=None"),
        ("no resourceType", lambda r: r.pop("resourceType"), "resourceType=None"),
    ],
)
def test_transaction_bundle_rejects_unkeyed_resource(case: str, change: Any, message: str) -> None:
    resource = observation("f-1")
    change(resource)

    with pytest.raises(TransactionError, match=message):
        transaction_bundle([resource])


def test_transaction_bundle_rejects_empty_and_duplicates() -> None:
    with pytest.raises(TransactionError, match="at least one resource"):
        transaction_bundle([])
    with pytest.raises(TransactionError, match="share"):
        transaction_bundle([observation("f-1"), observation("f-1", 0.9)])


def test_latest_versions_keeps_last_of_each_resource() -> None:
    first, other, second = observation("f-1", 0.5), observation("f-2"), observation("f-1", 0.9)

    kept = latest_versions([first, other, second])

    assert kept == [other, second]
    Bundle.model_validate(transaction_bundle(kept))


# --- sending with retries ------------------------------------------------------------------------


def test_delivery_retries_server_errors(endpoint_factory: Any) -> None:
    endpoint = FhirEndpoint(fail_first=2)
    url = endpoint_factory(endpoint)

    response = deliver(url, [observation("f-1"), observation("f-2")])

    assert response["type"] == "transaction-response"
    assert endpoint.statuses == [503, 503, 200]
    assert len(endpoint.store) == 2


def test_delivery_retries_timeouts(endpoint_factory: Any) -> None:
    endpoint = FhirEndpoint(time_out_first=1, delay_s=1.0)
    url = endpoint_factory(endpoint)

    deliver(url, [observation("f-1")], timeout_s=0.3)

    assert endpoint.statuses == [0, 200]
    assert list(endpoint.store) == ["Observation?identifier=urn:crc-medai:finding|f-1"]


def test_delivery_gives_up_after_attempts(endpoint_factory: Any) -> None:
    endpoint = FhirEndpoint()
    url = endpoint_factory(endpoint)

    with pytest.raises(RetryableDeliveryError, match="HTTP 500: this resource always fails"):
        deliver(url, [observation(POISON)])

    assert endpoint.statuses == [500] * FAST_RETRIES.attempts
    assert endpoint.store == {}


def test_rejection_is_not_retried(endpoint_factory: Any) -> None:
    endpoint = FhirEndpoint(reject_status=422)
    url = endpoint_factory(endpoint)

    with pytest.raises(RejectedDeliveryError) as error:
        deliver(url, [observation(POISON)])

    assert error.value.status == 422
    assert endpoint.statuses == [422]


def test_unreachable_server_is_retryable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    with pytest.raises(RetryableDeliveryError, match="not reachable"):
        deliver(f"http://127.0.0.1:{port}/fhir", [observation("f-1")], RetryPolicy(2, 0.01, 0.01))


def test_backoff_doubles_up_to_maximum() -> None:
    policy = RetryPolicy(attempts=6, backoff_s=0.5, backoff_max_s=3.0)

    assert [policy.delay(failures) for failures in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.delay(1, retry_after_s=2.0) == 2.0
    assert policy.delay(1, retry_after_s=60.0) == 3.0


def test_replayed_bundle_does_not_duplicate(endpoint_factory: Any) -> None:
    endpoint = FhirEndpoint()
    url = endpoint_factory(endpoint)
    resources = [observation(f"f-{number}") for number in range(5)]

    deliver(url, resources)
    stored = dict(endpoint.store)
    deliver(url, resources)

    assert endpoint.puts == 10
    assert endpoint.store == stored
    assert len(endpoint.store) == 5


# --- batches of events, without Kafka -----------------------------------------------------------


@dataclass
class FakeMessage:
    topic: str = "fhir-resources"
    partition: int = 0
    offset: int = 0


@dataclass
class FakeEvent:
    """The parts of a Faust event that the delivery reads."""

    key: bytes | None
    value: bytes | None
    message: FakeMessage = field(default_factory=FakeMessage)


def event_of(resource: dict[str, Any]) -> FakeEvent:
    return FakeEvent(resource["id"].encode(), resource_event(resource).to_bytes())


def deliver_batch(url: str, events: list[FakeEvent]) -> list[tuple[FakeEvent, BaseException]]:
    dead: list[tuple[FakeEvent, BaseException]] = []

    async def dead_letter(event: Any, error: BaseException) -> None:
        dead.append((event, error))

    async def run() -> None:
        client = FhirServerClient(url, timeout_s=2.0)
        try:
            await Delivery(client, FAST_RETRIES, dead_letter).deliver_events(events)
        finally:
            await client.aclose()

    asyncio.run(run())
    return dead


def test_batch_isolates_failing_resource(endpoint_factory: Any) -> None:
    endpoint = FhirEndpoint()
    url = endpoint_factory(endpoint)
    poison = event_of(observation(POISON))

    dead = deliver_batch(url, [event_of(observation("f-1")), poison, event_of(observation("f-2"))])

    assert [event for event, _ in dead] == [poison]
    assert isinstance(dead[0][1], RetryableDeliveryError)
    assert sorted(key.rpartition("|")[2] for key in endpoint.store) == ["f-1", "f-2"]


def test_batch_dead_letters_bad_events_first(endpoint_factory: Any) -> None:
    endpoint = FhirEndpoint()
    url = endpoint_factory(endpoint)
    unkeyed = observation("f-2")
    del unkeyed["identifier"]
    garbage = FakeEvent(b"x", b"not an event")
    no_identifier = FakeEvent(b"y", resource_event(unkeyed).to_bytes())

    dead = deliver_batch(url, [garbage, event_of(observation("f-1")), no_identifier])

    assert [(event, type(error).__name__) for event, error in dead] == [
        (garbage, "ValidationError"),
        (no_identifier, "TransactionError"),
    ]
    assert endpoint.statuses == [200]
    assert list(endpoint.store) == ["Observation?identifier=urn:crc-medai:finding|f-1"]


def test_batch_sends_latest_version_only(endpoint_factory: Any) -> None:
    endpoint = FhirEndpoint()
    url = endpoint_factory(endpoint)

    dead = deliver_batch(url, [event_of(observation("f-1", 0.2)), event_of(observation("f-1", 0.8))])

    assert dead == []
    assert endpoint.puts == 1
    assert endpoint.store["Observation?identifier=urn:crc-medai:finding|f-1"]["valueQuantity"]["value"] == 0.8


def test_unreachable_server_dead_letters_whole_batch() -> None:
    url = f"http://127.0.0.1:{free_port()}/fhir"
    events = [event_of(observation(f"f-{number}")) for number in range(3)]

    dead = deliver_batch(url, events)

    assert [event for event, _ in dead] == events
    assert all("not reachable" in str(error) for _, error in dead)


# --- the worker, through Kafka -------------------------------------------------------------------

GOOD = [f"good-{number}" for number in range(6)]


@pytest.fixture(scope="module")
def module_endpoint() -> Iterator[tuple[FhirEndpoint, str]]:
    endpoint = FhirEndpoint(fail_first=2, time_out_first=1, delay_s=1.5)
    handler = type("Handler", (_Handler,), {"endpoint": endpoint})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield endpoint, f"http://127.0.0.1:{server.server_address[1]}/fhir"
    server.shutdown()
    server.server_close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def delivery_settings(
    stack: Settings, tmp_path_factory: pytest.TempPathFactory, module_endpoint: tuple[FhirEndpoint, str]
) -> Settings:
    settings = isolated_settings(stack, tmp_path_factory.mktemp("delivery") / "out")
    return settings.model_copy(
        update={
            "fhir_server_url": module_endpoint[1],
            "fhir_delivery_attempts": 3,
            "fhir_delivery_backoff_s": 0.05,
            "fhir_delivery_backoff_max_s": 0.2,
            "fhir_delivery_timeout_s": 0.5,
            "fhir_delivery_batch_size": 4,
            "fhir_delivery_batch_wait_s": 0.2,
            "metrics_port": free_port(),
        }
    )


@pytest.fixture(scope="module")
def delivery_service(delivery_settings: Settings) -> Iterator[RunningServices]:
    asyncio.run(ensure_topics(delivery_settings, ["fhir-resources", "dlq.fhir-delivery"]))
    yield from running_services(delivery_settings, delivery_settings.output_dir / "logs", ("fhir-delivery",))


def resource_event(resource: dict[str, Any]) -> FhirResourceEvent:
    return FhirResourceEvent(
        source_event_id=uuid.uuid4(),
        resource_type=resource["resourceType"],
        resource_id=resource["id"],
        resource=resource,
    )


async def publish(settings: Settings, records: list[tuple[bytes, bytes]]) -> None:
    producer = create_producer(settings)
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(settings.topic("fhir-resources"), key=key, value=value)
    finally:
        await producer.stop()


def wait_for(condition: Any, services: RunningServices, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline and not services.any_stopped():
        time.sleep(0.2)


@pytest.fixture(scope="module")
def first_delivery(
    delivery_settings: Settings, delivery_service: RunningServices, module_endpoint: tuple[FhirEndpoint, str]
) -> tuple[list[Record], list[tuple[bytes, bytes]]]:
    endpoint, _ = module_endpoint
    resources = [observation(value) for value in GOOD]
    events = [resource_event(resource) for resource in resources]
    poison = resource_event(observation(POISON))
    records = [(event.resource_id.encode(), event.to_bytes()) for event in events[:3]]
    records += [(poison.resource_id.encode(), poison.to_bytes()), (b"garbage", b"not an event")]
    records += [(event.resource_id.encode(), event.to_bytes()) for event in events[3:]]
    asyncio.run(publish(delivery_settings, records))

    dead = asyncio.run(
        collect_records(
            delivery_settings,
            ["dlq.fhir-delivery"],
            until=lambda received: len(received) >= 2 or delivery_service.any_stopped(),
            timeout_s=180,
        )
    )
    wait_for(lambda: len(endpoint.store) >= len(GOOD), delivery_service)
    return dead, records


@pytest.mark.integration
def test_worker_delivers_despite_failures(
    first_delivery: tuple[list[Record], list[tuple[bytes, bytes]]], module_endpoint: tuple[FhirEndpoint, str]
) -> None:
    endpoint, _ = module_endpoint

    assert sorted(key.rpartition("|")[2] for key in endpoint.store) == sorted(GOOD)
    assert endpoint.statuses[:3] == [0, 503, 503]
    assert 200 in endpoint.statuses


@pytest.mark.integration
def test_worker_dead_letters_only_failures(
    delivery_settings: Settings, first_delivery: tuple[list[Record], list[tuple[bytes, bytes]]]
) -> None:
    dead, _ = first_delivery
    by_type = {record.headers["crc-error-type"]: record for record in dead}

    assert len(dead) == 2
    assert by_type["ValidationError"].value == b"not an event"
    poison = by_type["RetryableDeliveryError"]
    assert json.loads(poison.value)["resource"]["identifier"][0]["value"] == POISON
    assert "HTTP 500" in poison.headers["crc-error"]
    for record in dead:
        assert record.headers["crc-service"] == "fhir-delivery"
        assert record.headers["crc-origin-topic"] == delivery_settings.topic("fhir-resources")
        assert int(record.headers["crc-origin-offset"]) >= 0


@pytest.mark.integration
def test_worker_counts_deliveries(
    delivery_settings: Settings, first_delivery: tuple[list[Record], list[tuple[bytes, bytes]]]
) -> None:
    url = f"http://127.0.0.1:{delivery_settings.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()  # noqa: S310 - local test URL
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("crc_fhir_server_"))

    assert float(samples['crc_fhir_server_deliveries_total{outcome="succeeded"}']) == len(GOOD)
    assert float(samples['crc_fhir_server_deliveries_total{outcome="failed"}']) == 1
    assert float(samples['crc_fhir_server_requests_total{outcome="failed"}']) >= 3


@pytest.mark.integration
def test_replayed_topic_does_not_duplicate(
    delivery_settings: Settings,
    delivery_service: RunningServices,
    first_delivery: tuple[list[Record], list[tuple[bytes, bytes]]],
    module_endpoint: tuple[FhirEndpoint, str],
) -> None:
    endpoint, _ = module_endpoint
    stored = {key: dict(resource) for key, resource in endpoint.store.items()}
    puts_before = endpoint.puts
    topic = asyncio.run(
        collect_records(delivery_settings, ["fhir-resources"], until=lambda received: len(received) >= 8, timeout_s=60)
    )
    replay = [(record.key or b"", record.value or b"") for record in topic if record.value != b"not an event"]
    replay = [item for item in replay if POISON not in item[1].decode()]

    asyncio.run(publish(delivery_settings, replay))
    wait_for(lambda: endpoint.puts >= puts_before + len(GOOD), delivery_service)

    assert len(topic) == 8
    assert endpoint.puts == puts_before + len(GOOD)
    assert endpoint.store == stored
