"""Patient-record producer: FHIR R4 Bundles from the integration engine onto Kafka.

Each file is parsed as JSON, validated with fhir.resources' R4B Bundle model
and published on ``patient-records`` keyed by the Patient's id. A file that
fails goes to the producer's dead-letter topic with the error naming the file
and the element; the other files are still published.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError

from crc_medai.errors import CrcMedAiError
from crc_medai.kafka import create_producer, dead_letter_headers, ensure_topics
from crc_medai.logs import pseudonym
from crc_medai.settings import Settings
from schemas.messages import PatientRecord

logger = logging.getLogger(__name__)

SERVICE = "record-producer"


class RecordFileError(CrcMedAiError):
    """A patient-record file is not a valid FHIR R4 Bundle with one Patient."""


@dataclass
class RecordSummary:
    """Files published and rejected by one record-producer run."""

    published: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)


def iter_record_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Yield the JSON files named, expanding folders in name order."""
    for path in paths:
        if path.is_dir():
            yield from sorted(path.glob("*.json"))
        else:
            yield path


def element_path(location: tuple[Any, ...]) -> str:
    """Render a pydantic error location as a FHIR element path, e.g. ``entry[0].resource.gender``."""
    parts: list[str] = []
    for item in location:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1] if parts else ''}[{item}]"]
        else:
            parts.append(str(item))
    return ".".join(parts)


def load_bundle(path: Path) -> tuple[str, dict[str, Any]]:
    """Read and validate a Bundle file; return the Patient id and the Bundle JSON."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordFileError(f"{path.name}: cannot be read as UTF-8 text ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise RecordFileError(f"{path.name}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc

    if not isinstance(data, dict) or data.get("resourceType") != "Bundle":
        found = data.get("resourceType") if isinstance(data, dict) else type(data).__name__
        raise RecordFileError(f"{path.name}: resourceType is {found!r}, expected 'Bundle'")

    try:
        Bundle.model_validate(data)
    except KeyError as exc:  # fhir.resources has no R4B model for this resourceType (e.g. an R5 type)
        raise RecordFileError(
            f"{path.name}: resourceType {exc.args[0]!r} is not FHIR R4; convert R5 resources before sending"
        ) from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        raise RecordFileError(
            f"{path.name}: invalid FHIR R4 Bundle at {element_path(first['loc'])}: {first['msg']} "
            f"({len(exc.errors())} error(s) in all); fix the element and send the file again"
        ) from exc

    patients = [
        entry["resource"]
        for entry in data.get("entry", [])
        if isinstance(entry.get("resource"), dict) and entry["resource"].get("resourceType") == "Patient"
    ]
    if len(patients) != 1 or not patients[0].get("id"):
        raise RecordFileError(
            f"{path.name}: the Bundle must contain exactly one Patient with an id, found {len(patients)} Patient(s)"
        )
    return patients[0]["id"], data


async def publish_records(settings: Settings, paths: Iterable[Path]) -> RecordSummary:
    """Publish every Bundle file; invalid files go to the dead-letter topic."""
    await ensure_topics(settings)
    producer = create_producer(settings)
    topic = settings.topic(PatientRecord.topic)
    dead_letter = settings.topic(f"dlq.{SERVICE}")
    summary = RecordSummary()
    await producer.start()
    try:
        for path in iter_record_files(paths):
            try:
                patient_id, bundle = load_bundle(path)
                record = PatientRecord(patient_id=patient_id, source_name=path.name, bundle=bundle)
            except (RecordFileError, ValidationError) as exc:
                logger.error("record file rejected file=%s error=%s", path.name, exc)
                summary.rejected[path.name] = str(exc)
                await producer.send_and_wait(
                    dead_letter,
                    value=path.read_bytes() if path.is_file() else b"",
                    headers=dead_letter_headers(service=SERVICE, error=exc, source=path.name),
                )
                continue
            await producer.send_and_wait(topic, value=record.to_bytes(), key=patient_id.encode())
            summary.published.append(path.name)
            logger.info("record published file=%s patient=%s", path.name, pseudonym(patient_id))
    finally:
        await producer.stop()
    return summary
