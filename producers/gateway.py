"""HTTP gateway of the record intake (FastAPI; OpenAPI docs at ``/docs``).

Start it with ``crc-medai record-gateway [--host 127.0.0.1] [--port 8020]``.

``POST /fhir`` takes one FHIR R4 resource or Bundle for one patient
(``application/fhir+json``, ``application/json`` or no Content-Type);
``POST /fhir/$ndjson`` takes NDJSON bulk-export text for any number of
patients. Every response, errors included, is an OperationOutcome:

- 200: the input was accepted (one information issue per published record, one
  warning per feature that could not be mapped). For NDJSON, 200 also when some
  lines were rejected and others published: each rejected line is an error
  issue, and an information issue gives the number of records accepted.
- 400: the input, or every line of an NDJSON body, was rejected; the error
  issue names the element in ``expression``.
- 413: the body exceeds ``CRC_KAFKA_MAX_MESSAGE_BYTES``, or so does the patient
  record built from it.
- 415: the Content-Type is not FHIR JSON (XML included) or NDJSON.
- 404 and 405 for unknown paths and methods, 503 when Kafka or Redis fails
  (send the input again later), 500 for an unexpected error.

A rejected input is also written to ``dlq.record-gateway``. With
``CRC_METRICS_PORT`` set, ``/metrics``, ``/healthz`` and ``/readyz`` are served
on that port.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException

from crc_medai import metrics
from crc_medai.kafka import DATA_TOPICS, create_producer, ensure_topics
from crc_medai.settings import Settings, get_settings
from producers.intake import AcceptedRecord, NdjsonOutcome, RecordIntake, RecordRejected, RecordTooLarge

logger = logging.getLogger(__name__)

SERVICE = "record-gateway"
FHIR_JSON = "application/fhir+json"
#: Media types of ``POST /fhir``; a request without Content-Type is read as FHIR JSON too.
JSON_TYPES = frozenset({FHIR_JSON, "application/json"})
#: Media types of ``POST /fhir/$ndjson``, JSON included because each line is JSON.
NDJSON_TYPES = frozenset({"application/fhir+ndjson", "application/x-ndjson", "application/ndjson", *JSON_TYPES})
XML_TYPES = frozenset({"application/fhir+xml", "application/xml", "text/xml"})
#: OperationOutcome issue codes (FHIR R4 IssueType) of the HTTP errors the framework raises.
HTTP_ISSUE_CODES = {404: "not-found", 405: "not-supported"}
#: ``topic`` label value of the gateway's processed and dead-lettered counters, in place of a Kafka worker's topic.
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
        body = await _read_body(request, settings, JSON_TYPES)
        if isinstance(body, JSONResponse):
            return body
        try:
            accepted = await request.app.state.intake.accept_bytes(body, source_name=_source_name(request))
        except RecordTooLarge as error:
            metrics.record_dead_letter(SERVICE, HTTP_SOURCE)
            return _outcome(413, [_issue("error", "too-long", str(error))])
        except RecordRejected as error:
            metrics.record_dead_letter(SERVICE, HTTP_SOURCE)
            return _outcome(400, [_error_issue(error)])
        except MessageSizeTooLargeError as error:
            return _broker_too_large(error, settings)
        except (KafkaError, RedisError) as error:
            return _unavailable(error)
        metrics.record_processed(SERVICE, HTTP_SOURCE)
        return _outcome(200, _accepted_issues(accepted))

    @app.post("/fhir/$ndjson", response_class=JSONResponse)
    async def post_ndjson(request: Request) -> JSONResponse:
        """Accept NDJSON bulk-export text: one resource per line, grouped by patient."""
        body = await _read_body(request, settings, NDJSON_TYPES)
        if isinstance(body, JSONResponse):
            return body
        try:
            outcome = await request.app.state.intake.accept_ndjson(body, source_name=_source_name(request))
        except (KafkaError, RedisError) as error:
            return _unavailable(error)
        for _ in outcome.accepted:
            metrics.record_processed(SERVICE, HTTP_SOURCE)
        for _ in outcome.rejected:
            metrics.record_dead_letter(SERVICE, HTTP_SOURCE)
        return _ndjson_outcome(outcome)

    _add_error_handlers(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Return an OperationOutcome for framework errors (unknown path, wrong method) and unexpected errors."""

    async def http_error(request: Request, error: Exception) -> JSONResponse:
        status = error.status_code if isinstance(error, HTTPException) else 500
        detail = error.detail if isinstance(error, HTTPException) else "error"
        text = f"{request.method} {request.url.path}: {detail}; the gateway serves POST /fhir and POST /fhir/$ndjson"
        response = _outcome(status, [_issue("error", HTTP_ISSUE_CODES.get(status, "processing"), text)])
        if isinstance(error, HTTPException) and error.headers:
            response.headers.update(error.headers)
        return response

    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        logger.error("request failed path=%s error=%r", request.url.path, error, exc_info=error)
        text = "the gateway failed while processing the input; send it again, and report the error if it repeats"
        return _outcome(500, [_issue("fatal", "exception", text)])

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)


def _ndjson_outcome(outcome: NdjsonOutcome) -> JSONResponse:
    """Return 200 when any record was published, so that the client resends only the rejected lines."""
    issues = [issue for accepted in outcome.accepted for issue in _accepted_issues(accepted)]
    issues += [_error_issue(error) for error in outcome.rejected]
    if not outcome.accepted and not outcome.rejected:
        return _outcome(400, [_issue("error", "required", "the body contains no resource; send one resource per line")])
    if not outcome.accepted:
        return _outcome(400, issues)
    summary = f"{len(outcome.accepted)} record(s) accepted, {len(outcome.rejected)} part(s) rejected"
    if outcome.rejected:
        summary += "; fix and send again only the lines named in the error issues"
    return _outcome(200, [_issue("information", "informational", summary), *issues])


async def _read_body(request: Request, settings: Settings, media_types: frozenset[str]) -> bytes | JSONResponse:
    unsupported = _unsupported_media_type(request, media_types)
    if unsupported is not None:
        return unsupported
    limit = settings.kafka_max_message_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return _too_large(int(declared), limit)
    body = await request.body()
    if len(body) > limit:
        return _too_large(len(body), limit)
    return body


def _unsupported_media_type(request: Request, media_types: frozenset[str]) -> JSONResponse | None:
    declared = request.headers.get("content-type")
    if declared is None:
        return None
    media_type = declared.split(";")[0].strip().lower()
    if media_type in media_types:
        return None
    if media_type in XML_TYPES:
        text = f"Content-Type {media_type} is not supported: only FHIR JSON is supported; send {FHIR_JSON}"
    else:
        text = f"Content-Type {media_type!r} is not supported; send {' or '.join(sorted(media_types))}"
    return _outcome(415, [_issue("error", "not-supported", text)])


def _too_large(size: int, limit: int) -> JSONResponse:
    message = (
        f"the body has {size} bytes, more than the limit of {limit} (CRC_KAFKA_MAX_MESSAGE_BYTES); "
        "split it into several Bundles or NDJSON files"
    )
    return _outcome(413, [_issue("error", "too-long", message)])


def _broker_too_large(error: MessageSizeTooLargeError, settings: Settings) -> JSONResponse:
    # The record was within CRC_KAFKA_MAX_MESSAGE_BYTES, so the broker runs with a lower message.max.bytes.
    logger.error("record rejected by the broker as too large service=%s error=%r", SERVICE, error)
    text = (
        f"the broker rejected the patient record as too large, although it is within the gateway's limit of "
        f"{settings.kafka_max_message_bytes} bytes; split the Bundle or send NDJSON, and ask the operator to align "
        "the broker's message.max.bytes with CRC_KAFKA_MAX_MESSAGE_BYTES"
    )
    return _outcome(413, [_issue("error", "too-long", text)])


def _unavailable(error: Exception) -> JSONResponse:
    logger.error("record not published service=%s error=%r", SERVICE, error)
    text = "the record could not be stored or published (Kafka or Redis failed); send the input again later"
    return _outcome(503, [_issue("error", "transient", text)])


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
            f"{len(record.bundle.get('entry', []))} current resources"
            + (", unchanged: the input matches the stored resources" if accepted.unchanged else ""),
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
