"""FHIR consumer: polyp findings and prognosis results in, FHIR R4 resources out.

From each finding event it builds the heatmap Media (when the finding has a
heatmap), the finding Observation and the procedure's DiagnosticReport. From
each prognosis result it builds the RiskAssessment and the risk Observation. Before the
first resource of a model version it sends that version's Device. The topic is
keyed by resource id, so the Device may land on another partition than the
resources that refer to it, and a reader cannot rely on reading it first.

Each resource is published on ``fhir-resources`` (key: resource id) and
written as JSON under ``<output_dir>/fhir/<resourceType>/<id>.json``. Ids are
stable per result, so a replayed result overwrites its file and publishes the
same id.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from consumers.devices import EmittedDevices, model_device
from consumers.reports import ProcedureFindings, diagnostic_report
from consumers.resources import finding_observation, heatmap_media, risk_assessment, risk_observation
from crc_medai import metrics
from crc_medai.logs import pseudonym
from crc_medai.settings import Settings
from processors.app import create_app, process_with_dead_letter, raw_topic
from schemas.messages import FhirResourceEvent, Message, ModelRef, PolypFinding, PrognosisResult

logger = logging.getLogger(__name__)

SERVICE = "fhir-consumer"


def write_resource(output_dir: Path, resource: dict[str, Any]) -> Path:
    """Write a resource as pretty JSON and return its path."""
    folder = output_dir / "fhir" / resource["resourceType"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{resource['id']}.json"
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(resource, indent=2, sort_keys=True), encoding="utf-8")
    temporary.replace(path)
    return path


def build_app(settings: Settings):  # noqa: ANN201 - returns faust.App
    """Build the FHIR consumer's Faust app with one agent per result topic."""
    app = create_app(settings, SERVICE)
    findings = raw_topic(app, settings, PolypFinding.topic)
    prognoses = raw_topic(app, settings, PrognosisResult.topic)
    resources = raw_topic(app, settings, FhirResourceEvent.topic)
    dead_letter = raw_topic(app, settings, f"dlq.{SERVICE}")
    redis = Redis.from_url(settings.redis_url)
    procedures = ProcedureFindings(redis, settings)
    devices = EmittedDevices(redis, settings)
    logger.info("fhir consumer ready output_dir=%s", settings.output_dir)

    async def deliver(source: Message, resource: dict[str, Any]) -> None:
        event = FhirResourceEvent(
            source_event_id=source.event_id,
            resource_type=resource["resourceType"],
            resource_id=resource["id"],
            resource=resource,
        )
        write_resource(settings.output_dir, resource)
        await resources.send(key=resource["id"].encode(), value=event.to_bytes())
        metrics.record_fhir_delivery(SERVICE, source.source_ts)

    async def deliver_device(source: Message, model: ModelRef) -> None:
        if not await devices.is_new(model):
            return
        await deliver(source, model_device(model, settings.model_card_base_url))
        await devices.mark_emitted(model)
        logger.info("device emitted model=%s version=%s", model.name, model.version)

    async def handle_finding(key: bytes | None, value: bytes | None) -> None:
        finding = PolypFinding.from_bytes(value)
        # Build every resource before sending any, so a finding that fails validation sends nothing.
        media = heatmap_media(finding)
        observation = finding_observation(finding)
        report = diagnostic_report(finding.procedure_id, await procedures.add(finding))

        await deliver_device(finding, finding.model)
        if media is not None:
            await deliver(finding, media)
        await deliver(finding, observation)
        await deliver(finding, report)
        logger.info(
            "finding resources delivered procedure=%s status=%s report_results=%d",
            finding.procedure_id,
            finding.status,
            len(report["result"]),
        )

    async def handle_prognosis(key: bytes | None, value: bytes | None) -> None:
        result = PrognosisResult.from_bytes(value)
        assessment = risk_assessment(result)
        observation = risk_observation(result)

        await deliver_device(result, result.model)
        await deliver(result, assessment)
        await deliver(result, observation)
        logger.info("risk resources delivered patient=%s", pseudonym(result.patient_id))

    @app.agent(findings)
    async def finding_resources(stream) -> None:  # noqa: ANN001 - faust stream
        await process_with_dead_letter(stream, service=SERVICE, dead_letter=dead_letter, handle=handle_finding)

    @app.agent(prognoses)
    async def risk_resources(stream) -> None:  # noqa: ANN001 - faust stream
        await process_with_dead_letter(stream, service=SERVICE, dead_letter=dead_letter, handle=handle_prognosis)

    @app.on_before_shutdown.connect
    async def close_redis(app_: object, **_: object) -> None:
        await redis.aclose()

    return app
