"""FHIR consumer: polyp findings and prognosis results in, FHIR Observations out.

Each resource is published on ``fhir-resources`` and written as JSON under
``<output_dir>/fhir/<resourceType>/<id>.json``. Ids are stable per result
event, so a replayed result overwrites its file and publishes the same id.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from consumers.resources import finding_observation, risk_observation
from crc_medai import metrics
from crc_medai.logs import pseudonym
from crc_medai.settings import Settings
from processors.app import create_app, process_with_dead_letter, raw_topic
from schemas.messages import FhirResourceEvent, Message, PolypFinding, PrognosisResult

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

    async def handle_finding(key: bytes | None, value: bytes | None) -> None:
        finding = PolypFinding.from_bytes(value)
        await deliver(finding, finding_observation(finding))
        logger.info("finding observation delivered procedure=%s status=%s", finding.procedure_id, finding.status)

    async def handle_prognosis(key: bytes | None, value: bytes | None) -> None:
        result = PrognosisResult.from_bytes(value)
        await deliver(result, risk_observation(result))
        logger.info("risk observation delivered patient=%s", pseudonym(result.patient_id))

    @app.agent(findings)
    async def finding_observations(stream) -> None:  # noqa: ANN001 - faust stream
        await process_with_dead_letter(stream, service=SERVICE, dead_letter=dead_letter, handle=handle_finding)

    @app.agent(prognoses)
    async def risk_observations(stream) -> None:  # noqa: ANN001 - faust stream
        await process_with_dead_letter(stream, service=SERVICE, dead_letter=dead_letter, handle=handle_prognosis)

    return app
