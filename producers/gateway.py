"""HTTP gateway of the record intake (FastAPI; OpenAPI docs at ``/docs``).

Start it with ``crc-medai record-gateway [--host 127.0.0.1] [--port 8020]``.

``POST /fhir`` takes one FHIR R4 resource or Bundle for one patient
(``application/fhir+json`` or ``application/json``); ``POST /fhir/$ndjson``
takes NDJSON bulk-export text for any number of patients. Both return an
OperationOutcome: HTTP 200 when everything was accepted (one information issue
per published record, one warning per feature that could not be mapped), 400
when anything was rejected (one error issue naming the element in
``expression``), and 413 for a body over :data:`MAX_BODY_BYTES`. A rejected
input is also written to ``dlq.record-gateway``. With ``CRC_METRICS_PORT`` set,
``/metrics``, ``/healthz`` and ``/readyz`` are served on that port.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from crc_medai import metrics
from crc_medai.kafka import DATA_TOPICS, create_producer, ensure_topics
from crc_medai.settings import Settings, get_settings
from producers.intake import AcceptedRecord, RecordIntake, RecordRejected

logger = logging.getLogger(__name__)

SERVICE = "record-gateway"
FHIR_JSON = "application/fhir+json"
#: Largest body accepted, in bytes; the same as the largest Kafka record the producer sends (8 MiB).
MAX_BODY_BYTES = 8 * 1024 * 1024
#: The ``topic`` label of the gateway's processed and dead-lettered counters, where Kafka workers put the topic.
HTTP_SOURCE = "http"


def create_app(settings: Settings) -> FastAPI:
    """Build the gateway app; the Kafka producer and the intake start with the app and stop with it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await ensure_topics(settings, (*DATA_TOPICS, f"dlq.{SERVICE}"))
        producer = create_producer(settings)
        await producer.start()
        app.state.intake = RecordIntake(settings, producer, service=SERVICE)
        server = metrics.start_metrics_server(settings, SERVICE)
        metrics.declare_topics(SERVICE, (HTTP_SOURCE,))
        metrics.health(SERVICE).started = True
        logger.info("record gateway started topic_prefix=%r", settings.topic_prefix)
        try:
            yield
        finally:
            metrics.health(SERVICE).started = False
            if server is not None:
                server.close()
            await app.state.intake.close()
            await producer.stop()
            logger.info("record gateway stopped")

    app = FastAPI(title="CRC-MedAI record gateway", lifespan=lifespan)

    @app.post("/fhir", response_class=JSONResponse)
    async def post_record(request: Request) -> JSONResponse:
        """Accept one FHIR R4 resource or Bundle for one patient."""
        body = await _read_body(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            accepted = await request.app.state.intake.accept_bytes(body, source_name=_source_name(request))
        except RecordRejected as error:
            metrics.record_dead_letter(SERVICE, HTTP_SOURCE)
            return _outcome(400, [_error_issue(error)])
        metrics.record_processed(SERVICE, HTTP_SOURCE)
        return _outcome(200, _accepted_issues(accepted))

    @app.post("/fhir/$ndjson", response_class=JSONResponse)
    async def post_ndjson(request: Request) -> JSONResponse:
        """Accept NDJSON bulk-export text: one resource per line, grouped by patient."""
        body = await _read_body(request)
        if isinstance(body, JSONResponse):
            return body
        outcome = await request.app.state.intake.accept_ndjson(body, source_name=_source_name(request))
        for _ in outcome.accepted:
            metrics.record_processed(SERVICE, HTTP_SOURCE)
        for _ in outcome.rejected:
            metrics.record_dead_letter(SERVICE, HTTP_SOURCE)
        issues = [issue for accepted in outcome.accepted for issue in _accepted_issues(accepted)]
        issues += [_error_issue(error) for error in outcome.rejected]
        if not issues:
            issues = [_issue("error", "required", "the body holds no resource; send one resource per line")]
        return _outcome(400 if outcome.rejected or not outcome.accepted else 200, issues)

    return app


async def _read_body(request: Request) -> bytes | JSONResponse:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return _too_large(int(declared))
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        return _too_large(len(body))
    return body


def _too_large(size: int) -> JSONResponse:
    message = f"the body has {size} bytes, more than {MAX_BODY_BYTES}; split it into several Bundles or NDJSON files"
    return _outcome(413, [_issue("error", "too-long", message)])


def _source_name(request: Request) -> str:
    client = request.client.host if request.client else "unknown"
    return f"http {request.url.path} from {client}"


def _accepted_issues(accepted: AcceptedRecord) -> list[dict[str, Any]]:
    record = accepted.record
    issues = [
        _issue(
            "information",
            "informational",
            f"record accepted for Patient/{accepted.patient_id}: event_id {record.event_id}, "
            f"{len(record.bundle.get('entry', []))} current resources",
        )
    ]
    issues += [
        _issue("warning", "incomplete", f"model feature {feature} not mapped: {reason}")
        for feature, reason in sorted(accepted.missing.items())
    ]
    issues += [
        _issue("information", "conflict", f"{key} not applied: the stored version has a later meta.lastUpdated")
        for key in accepted.stale
    ]
    return issues


def _error_issue(error: RecordRejected) -> dict[str, Any]:
    return _issue("error", "invalid", str(error), expression=error.element)


def _issue(severity: str, code: str, text: str, *, expression: str | None = None) -> dict[str, Any]:
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": text}
    if expression:
        issue["expression"] = [expression]
    return issue


def _outcome(status: int, issues: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse({"resourceType": "OperationOutcome", "issue": issues}, status_code=status, media_type=FHIR_JSON)


def main(argv: list[str] | None = None) -> int:
    """Serve the gateway until stopped."""
    parser = argparse.ArgumentParser(description="Serve the FHIR R4 record gateway over HTTP.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8020, help="TCP port to listen on")
    args = parser.parse_args(argv)

    import uvicorn

    uvicorn.run(create_app(get_settings()), host=args.host, port=args.port, log_level="info")
    return 0
