"""Patient-record producer: FHIR R4 files from the integration engine onto Kafka.

Each file goes through :class:`producers.intake.RecordIntake`, which
validates it, merges it with the patient's earlier resources and publishes the
record on ``patient-records`` keyed by the Patient's id. A rejected file goes
to the producer's dead-letter topic with the error naming the file and the
element, and the other files are still published. A file that fails for
another reason (a broker error, such as the broker rejecting the record as too
large, or an unexpected exception) is reported in the summary and
dead-lettered when the broker accepts the dead-letter record, and the run
goes on.

:func:`load_bundle` is the older check of one Bundle file on its own, without
Redis or Kafka. The conformance tests compare its verdicts with the HAPI FHIR
validator's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError

from crc_medai.errors import CrcMedAiError
from crc_medai.kafka import DATA_TOPICS, create_producer, ensure_topics
from crc_medai.logs import pseudonym
from crc_medai.settings import Settings
from producers.fhir_input import without_input_value
from producers.intake import RecordIntake, RecordRejected

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
    """Yield the files named, expanding each folder to its ``.json`` and ``.ndjson`` files in name order."""
    for path in paths:
        if path.is_dir():
            yield from sorted([*path.glob("*.json"), *path.glob("*.ndjson")])
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
            f"{path.name}: invalid FHIR R4 Bundle at {element_path(first['loc'])}: {_message_without_input(first)} "
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
    """Publish every record file through the record intake; invalid files go to the dead-letter topic.

    A ``.json`` file contains one Bundle or resource for one patient, and an
    ``.ndjson`` file one resource per line for any number of patients.
    """
    await ensure_topics(settings, (*DATA_TOPICS, f"dlq.{SERVICE}"))
    producer = create_producer(settings)
    summary = RecordSummary()
    await producer.start()
    intake = RecordIntake(settings, producer, service=SERVICE)
    try:
        for path in iter_record_files(paths):
            await _publish_file(intake, path, summary)
    finally:
        await intake.close()
        await producer.stop()
    return summary


def _message_without_input(error: Any) -> str:
    """Return a pydantic error message without the element's value, which may be PHI."""
    message = without_input_value(str(error["msg"]))
    value = error.get("input")
    if isinstance(value, str | int | float) and str(value) and str(value) in message:
        message = message.replace(str(value), "<value>")
    return message


async def _publish_file(intake: RecordIntake, path: Path, summary: RecordSummary) -> None:
    """Publish one file; a failure other than a rejection is logged, summarised and dead-lettered if possible."""
    try:
        await _publish_file_unguarded(intake, path, summary)
    except MessageSizeTooLargeError as exc:
        error = RecordFileError(
            f"{path.name}: not published, because the broker rejected the record as too large ({exc}) although it "
            f"is within CRC_KAFKA_MAX_MESSAGE_BYTES={intake.settings.kafka_max_message_bytes}; set the broker's "
            "message.max.bytes to that value (restart the local stack) or lower the setting"
        )
        await _report_failed_file(intake, path, summary, error)
    except Exception as exc:  # noqa: BLE001 - a broker error or a bug in one file must not stop the other files
        error = RecordFileError(f"{path.name}: not published ({type(exc).__name__}: {exc}); send the file again")
        await _report_failed_file(intake, path, summary, error)


async def _report_failed_file(intake: RecordIntake, path: Path, summary: RecordSummary, error: RecordFileError) -> None:
    logger.error("record file failed file=%s error=%s", path.name, error, exc_info=True)
    summary.rejected[path.name] = str(error)
    await _dead_letter_failed_file(intake, path, error)


async def _dead_letter_failed_file(intake: RecordIntake, path: Path, error: RecordFileError) -> None:
    try:
        await intake.dead_letter(path.read_bytes(), error, source_name=path.name)
    except (KafkaError, OSError) as exc:
        logger.error("dead-letter record not written file=%s error=%s", path.name, exc)


async def _publish_file_unguarded(intake: RecordIntake, path: Path, summary: RecordSummary) -> None:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        error = RecordFileError(f"{path.name}: cannot be read ({exc})")
        summary.rejected[path.name] = str(error)
        await intake.dead_letter(b"", error, source_name=path.name)
        return

    if path.suffix == ".ndjson":
        outcome = await intake.accept_ndjson(raw, source_name=path.name)
        if outcome.accepted:
            summary.published.append(path.name)
        if outcome.rejected:
            summary.rejected[path.name] = "; ".join(f"{path.name}: {error}" for error in outcome.rejected)
        return

    try:
        accepted = await intake.accept_bytes(raw, source_name=path.name)
    except RecordRejected as exc:
        summary.rejected[path.name] = f"{path.name}: {exc}"
        return
    summary.published.append(path.name)
    logger.debug("record file published file=%s patient=%s", path.name, pseudonym(accepted.patient_id))
