"""Record intake worker: raw FHIR R4 JSON from the integration engine's Kafka topic onto ``patient-records``.

Consumes ``ehr-inbound``: each record value is one FHIR R4 resource or Bundle
for one patient, or NDJSON text (one resource per line, any number of
patients) when the record has the header ``content-type:
application/fhir+ndjson``. Each input goes through
:class:`producers.intake.RecordIntake`. A rejected input goes to
``dlq.record-intake`` with the error and its origin (topic, partition, offset),
and the stream goes on with the next record.
"""

from __future__ import annotations

import logging

import faust

from crc_medai import metrics
from crc_medai.kafka import create_producer, dead_letter_headers, fit_dead_letter, max_value_bytes
from crc_medai.settings import Settings
from processors.app import create_app, raw_topic
from producers.intake import RecordIntake, RecordOrigin, RecordRejected

logger = logging.getLogger(__name__)

SERVICE = "record-intake"
#: Logical topic the hospital integration engine writes raw FHIR JSON to.
INBOUND_TOPIC = "ehr-inbound"
NDJSON_CONTENT_TYPE = "application/fhir+ndjson"


def build_app(settings: Settings) -> faust.App:
    """Build the record intake's Faust app and agent."""
    app = create_app(settings, SERVICE)
    inbound = raw_topic(app, settings, INBOUND_TOPIC)
    dead_letter = raw_topic(app, settings, f"dlq.{SERVICE}")
    logger.info("record intake ready topic=%s", settings.topic(INBOUND_TOPIC))

    @app.agent(inbound)
    async def ingest(stream: faust.StreamT) -> None:
        metrics.declare_topics(SERVICE, (settings.topic(INBOUND_TOPIC),))
        producer = create_producer(settings)
        await producer.start()
        intake = RecordIntake(settings, producer, service=SERVICE)
        try:
            async for event in stream.events():
                await _ingest_one(intake, event, dead_letter)
        finally:
            await intake.close()
            await producer.stop()

    return app


async def _ingest_one(intake: RecordIntake, event: faust.EventT, dead_letter: faust.TopicT) -> None:
    """Accept one inbound record; a failure other than a rejection is dead-lettered here."""
    message = event.message
    origin = RecordOrigin(message.topic, message.partition, message.offset)
    source_name = f"{message.topic}[{message.partition}]@{message.offset}"
    value = event.value or b""
    try:
        if _is_ndjson(message.headers):
            outcome = await intake.accept_ndjson(value, source_name=source_name, origin=origin)
            if outcome.rejected:
                metrics.record_dead_letter(SERVICE, message.topic)
        else:
            await intake.accept_bytes(value, source_name=source_name, origin=origin)
        metrics.record_processed(SERVICE, message.topic)
    except RecordRejected:
        # The intake has written the dead-letter record and logged the error.
        metrics.record_dead_letter(SERVICE, message.topic)
    except Exception as exc:  # noqa: BLE001 - an outage or a bug must not stop the partition
        logger.error(
            "record failed service=%s topic=%s partition=%s offset=%s error=%s",
            SERVICE,
            message.topic,
            message.partition,
            message.offset,
            exc,
            exc_info=True,
        )
        metrics.record_dead_letter(SERVICE, message.topic)
        headers = dead_letter_headers(
            service=SERVICE, error=exc, topic=message.topic, partition=message.partition, offset=message.offset
        )
        value, headers = fit_dead_letter(event.value, headers, max_value_bytes(intake.settings))
        await dead_letter.send(key=event.key, value=value, headers=headers)


def _is_ndjson(headers: object) -> bool:
    pairs = headers.items() if isinstance(headers, dict) else (headers or ())
    for name, value in pairs:
        if name.lower() == "content-type":
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            return text.split(";")[0].strip().lower() == NDJSON_CONTENT_TYPE
    return False
