"""Turn one raw HL7 v2 message into a published patient record and the acknowledgment for it.

:class:`Hl7Ingest` is shared by the MLLP listener and the file producer:
parse, map to a FHIR R4 Bundle, hand it to :class:`producers.intake.RecordIntake`
and build the ACK. Every rejected message is written unchanged to
``dlq.<service>`` with the error. The intake writes that record itself when it
rejects the Bundle, and this module writes it for errors found before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from crc_medai.logs import pseudonym
from crc_medai.metrics import record_dead_letter, record_processed
from crc_medai.settings import Settings
from producers.hl7.ack import build_ack, header_of
from producers.hl7.errors import (
    APPLICATION_INTERNAL_ERROR,
    AckCode,
    Hl7ContentError,
    Hl7Error,
    UnsupportedMessageError,
)
from producers.hl7.mapping import ConvertedMessage, bundle_from_message
from producers.hl7.parser import Hl7Message, parse_message, split_messages
from producers.intake import RecordIntake, RecordRejected
from schemas.messages import utc_now

logger = logging.getLogger(__name__)

LISTENER_SERVICE = "hl7-listener"
FILE_SERVICE = "hl7-producer"
#: ``topic`` label of the record counters: HL7 input arrives over TCP or from files, not from a topic.
METRIC_TOPIC = "hl7v2"


@dataclass(frozen=True)
class Hl7Outcome:
    """Result of one message: the acknowledgment code, the ACK text and the error, if any."""

    ack_code: AckCode
    ack: str
    control_id: str
    patient_id: str | None = None
    error: Hl7Error | None = None
    missing: tuple[str, ...] = ()


class Hl7Ingest:
    """HL7 v2 ingestion: maps each message to a patient record through a :class:`RecordIntake` and acknowledges it."""

    def __init__(self, intake: RecordIntake) -> None:
        self.intake = intake
        self.service = intake.service

    async def ingest(self, raw: bytes, *, source: str) -> Hl7Outcome:
        """Process one message and return its acknowledgment.

        Content errors are acknowledged with AE, unsupported or unparsable
        messages with AR, and both are dead-lettered. A broker failure is
        acknowledged with AR and error 207 and is not dead-lettered, so that the
        sender sends the message again.
        """
        message: Hl7Message | None = None
        converted: ConvertedMessage | None = None
        try:
            message = parse_message(raw)
            converted = bundle_from_message(message, utc_now())
            accepted = await self.intake.accept(converted.bundle, source_name=_source_name(source, message), raw=raw)
        except Hl7Error as error:
            await self.intake.dead_letter(raw, error, source_name=_source_name(source, message))
            return self._rejected(raw, message, error)
        except MessageSizeTooLargeError as error:
            # Sending the message again cannot help, so this is a content error, not a broker failure.
            too_large = Hl7ContentError(
                "the patient record built from this message is larger than the broker accepts (message.max.bytes); "
                "send long reports in several messages or raise the broker limit",
                error_code=APPLICATION_INTERNAL_ERROR,
            )
            logger.error("record too large for the broker service=%s source=%s error=%r", self.service, source, error)
            await self.intake.dead_letter(raw, too_large, source_name=_source_name(source, message))
            return self._rejected(raw, message, too_large)
        except RecordRejected as error:
            # The intake has written the dead-letter record already.
            location = converted.location_of(error.element) if converted else None
            return self._rejected(raw, message, Hl7ContentError(error.reason, location))
        except KafkaError as error:
            logger.error("record not published service=%s source=%s error=%r", self.service, source, error)
            failure = UnsupportedMessageError(
                "the record could not be published; send the message again later",
                error_code=APPLICATION_INTERNAL_ERROR,
            )
            return Hl7Outcome("AR", self._ack("AR", raw, message, failure), _control_id(message), error=failure)

        record_processed(self.service, METRIC_TOPIC)
        logger.info(
            "hl7 message accepted service=%s source=%s type=%s^%s patient=%s",
            self.service,
            source,
            message.message_code,
            message.trigger_event,
            pseudonym(accepted.patient_id),
        )
        return Hl7Outcome(
            "AA",
            self._ack("AA", raw, message, None),
            message.control_id,
            patient_id=accepted.patient_id,
            missing=tuple(sorted(accepted.missing)),
        )

    def _rejected(self, raw: bytes, message: Hl7Message | None, error: Hl7Error) -> Hl7Outcome:
        record_dead_letter(self.service, METRIC_TOPIC)
        logger.warning(
            "hl7 message rejected service=%s ack=%s code=%s error=%s",
            self.service,
            error.ack_code,
            error.error_code,
            error,
        )
        ack = self._ack(error.ack_code, raw, message, error)
        return Hl7Outcome(error.ack_code, ack, _control_id(message), error=error)

    def _ack(self, code: AckCode, raw: bytes, message: Hl7Message | None, error: Hl7Error | None) -> str:
        header = message.header if message else header_of(raw.decode("latin-1"))
        try:
            return build_ack(code, header, now=utc_now().astimezone(), error=error)
        except Hl7Error:
            # The header itself contains a bad escape sequence, so acknowledge without referring to it.
            return build_ack(code, None, now=utc_now().astimezone(), error=error)


def _control_id(message: Hl7Message | None) -> str:
    return message.control_id if message else ""


def _source_name(source: str, message: Hl7Message | None) -> str:
    """Name the input for the record and dead-letter headers: origin and MSH-10, never patient data."""
    if message is None or not message.control_id:
        return source
    return f"{source} MSH-10={message.control_id}"


@dataclass
class FileSummary:
    """Messages read from HL7 files: accepted and rejected, by ``file#n``."""

    accepted: list[str]
    rejected: dict[str, str]


async def ingest_files(ingest: Hl7Ingest, paths: list[Path]) -> FileSummary:
    """Ingest every message of every file (several messages per file allowed, folders expanded)."""
    summary = FileSummary([], {})
    for path in _expand(paths):
        try:
            data = path.read_bytes()
        except OSError as error:
            summary.rejected[path.name] = f"cannot be read: {error.strerror}"
            logger.error("hl7 file not readable file=%s error=%s", path, error.strerror)
            continue
        messages = list(split_messages(data))
        if not messages:
            summary.rejected[path.name] = "contains no HL7 message; expected segments starting with MSH"
            logger.error("hl7 file empty file=%s", path)
        for number, raw in enumerate(messages, start=1):
            name = f"{path.name}#{number}"
            outcome = await ingest.ingest(raw, source=f"file {name}")
            if outcome.error is None:
                summary.accepted.append(name)
            else:
                summary.rejected[name] = f"{outcome.ack_code} {outcome.error}"
    return summary


def _expand(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        files.extend(sorted(item for item in path.iterdir() if item.is_file()) if path.is_dir() else [path])
    return files


async def publish_hl7_files(settings: Settings, paths: list[Path]) -> FileSummary:
    """Publish the messages of HL7 v2 files as patient records (``crc-medai produce-hl7``)."""
    from crc_medai.kafka import DATA_TOPICS, create_producer, ensure_topics

    await ensure_topics(settings, (*DATA_TOPICS, f"dlq.{FILE_SERVICE}"))
    producer = create_producer(settings)
    await producer.start()
    intake = RecordIntake(settings, producer, service=FILE_SERVICE)
    try:
        return await ingest_files(Hl7Ingest(intake), paths)
    finally:
        await intake.close()
        await producer.stop()
