"""Kafka helpers shared by producers, processors and the demo.

Topic names are logical (``frames``, ``detections``); :class:`Settings`
prepends ``topic_prefix`` so that tests and demo runs stay isolated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from crc_medai.settings import Settings

logger = logging.getLogger(__name__)

#: Logical topics of the data flow, in order.
DATA_TOPICS: tuple[str, ...] = (
    "frames",
    "ehr-inbound",
    "patient-records",
    "detections",
    "findings",
    "prognoses",
    "fhir-resources",
)

#: Logical dead-letter topics, one per consumer and producer that can reject input.
DEAD_LETTER_TOPICS: tuple[str, ...] = (
    "dlq.frame-producer",
    "dlq.record-producer",
    "dlq.record-gateway",
    "dlq.record-intake",
    "dlq.hl7-producer",
    "dlq.hl7-listener",
    "dlq.detection",
    "dlq.prognosis",
    "dlq.fhir-consumer",
    "dlq.fhir-delivery",
    "dlq.fhir-view",
)

# Dead-letter record headers: the error and where the rejected record came from.
HEADER_ERROR = "crc-error"
HEADER_ERROR_TYPE = "crc-error-type"
HEADER_SERVICE = "crc-service"
HEADER_ORIGIN_TOPIC = "crc-origin-topic"
HEADER_ORIGIN_PARTITION = "crc-origin-partition"
HEADER_ORIGIN_OFFSET = "crc-origin-offset"
HEADER_ORIGIN_SOURCE = "crc-origin-source"
HEADER_TRUNCATED = "crc-truncated"
HEADER_ORIGINAL_BYTES = "crc-original-bytes"

#: Bytes of a Kafka record set aside for the key, the headers and the batch framing when sizing its value.
RECORD_OVERHEAD_BYTES = 16 * 1024

# A dead-letter error text longer than this is cut, so one huge error cannot exceed a record.
MAX_ERROR_CHARS = 4000


def dead_letter_headers(
    *,
    service: str,
    error: BaseException,
    topic: str | None = None,
    partition: int | None = None,
    offset: int | None = None,
    source: str | None = None,
) -> list[tuple[str, bytes]]:
    """Build the headers of a dead-letter record: the error and the record's origin."""
    headers = [
        (HEADER_SERVICE, service),
        (HEADER_ERROR_TYPE, type(error).__name__),
        (HEADER_ERROR, str(error)[:MAX_ERROR_CHARS]),
    ]
    if topic is not None:
        headers.append((HEADER_ORIGIN_TOPIC, topic))
    if partition is not None:
        headers.append((HEADER_ORIGIN_PARTITION, str(partition)))
    if offset is not None:
        headers.append((HEADER_ORIGIN_OFFSET, str(offset)))
    if source is not None:
        headers.append((HEADER_ORIGIN_SOURCE, source))
    return [(name, value.encode("utf-8")) for name, value in headers]


def max_value_bytes(settings: Settings) -> int:
    """Return the maximum record value size (bytes) a producer can send under ``settings.kafka_max_message_bytes``."""
    return settings.kafka_max_message_bytes - RECORD_OVERHEAD_BYTES


def fit_dead_letter(
    value: bytes | None, headers: list[tuple[str, bytes]], max_bytes: int
) -> tuple[bytes | None, list[tuple[str, bytes]]]:
    """Cut a dead-letter value longer than ``max_bytes`` to its first ``max_bytes`` bytes.

    A cut value gets the headers ``crc-truncated: true`` and
    ``crc-original-bytes: <size>``, so that the dead-letter record still fits
    the broker's limit and records the value's original size.
    """
    if value is None or len(value) <= max_bytes:
        return value, headers
    marks = [(HEADER_TRUNCATED, b"true"), (HEADER_ORIGINAL_BYTES, str(len(value)).encode("utf-8"))]
    return value[:max_bytes], [*headers, *marks]


def decode_headers(headers: Sequence[tuple[str, bytes]] | None) -> dict[str, str]:
    """Decode Kafka record headers into a dict of strings."""
    return {name: value.decode("utf-8", errors="replace") for name, value in (headers or ())}


async def ensure_topics(settings: Settings, names: Iterable[str] = DATA_TOPICS + DEAD_LETTER_TOPICS) -> None:
    """Create the given logical topics if they do not exist yet.

    Data topics get ``settings.topic_partitions`` partitions; dead-letter topics get one.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(
                name=settings.topic(name),
                num_partitions=1 if name.startswith("dlq.") else settings.topic_partitions,
                replication_factor=1,
            )
            for name in names
            if settings.topic(name) not in existing
        ]
        if missing:
            try:
                await admin.create_topics(missing)
            except TopicAlreadyExistsError:
                logger.debug("topics created concurrently by another client")
            logger.info("created topics %s", ",".join(topic.name for topic in missing))
    finally:
        await admin.close()


def create_producer(settings: Settings, **overrides: object) -> AIOKafkaProducer:
    """Return an idempotent producer (acks=all) for the configured broker."""
    options: dict[str, object] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 5,
        "max_request_size": settings.kafka_max_message_bytes,
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


@dataclass(frozen=True)
class Record:
    """A consumed record, detached from the consumer."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, str]


async def collect_records(
    settings: Settings,
    logical_topics: Sequence[str],
    *,
    until: Callable[[list[Record]], bool],
    timeout_s: float,
    group_id: str | None = None,
) -> list[Record]:
    """Read the given topics from the beginning until ``until(records)`` is true or time runs out.

    Used by the demo and the tests to see what came back through Kafka. With no
    ``group_id`` the consumer commits nothing and leaves no group behind.
    """
    consumer = AIOKafkaConsumer(
        *(settings.topic(name) for name in logical_topics),
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=group_id,
        auto_offset_reset="earliest",
        enable_auto_commit=group_id is not None,
        fetch_max_bytes=32 * 1024 * 1024,
    )
    records: list[Record] = []
    deadline = time.monotonic() + timeout_s
    await consumer.start()
    try:
        while not until(records) and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for batch in batches.values():
                records.extend(
                    Record(
                        topic=message.topic,
                        partition=message.partition,
                        offset=message.offset,
                        key=message.key,
                        value=message.value,
                        headers=decode_headers(message.headers),
                    )
                    for message in batch
                )
    finally:
        await consumer.stop()
    return records
