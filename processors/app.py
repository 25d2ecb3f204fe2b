"""Faust application factory and the dead-letter loop every agent runs.

Each service is one Faust app whose id is its consumer group, so several
workers of the same service share the partitions of its input topics.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import faust
from faust.types import StreamT

from crc_medai.kafka import dead_letter_headers
from crc_medai.settings import Settings

logger = logging.getLogger(__name__)

#: Handles one record: (key, value) -> None. Raises to send the record to the dead-letter topic.
RecordHandler = Callable[[bytes | None, bytes | None], Awaitable[None]]


def create_app(settings: Settings, service: str) -> faust.App:
    """Create the Faust app of ``service``; its id is the service's consumer group."""
    return faust.App(
        settings.group(service),
        broker=f"kafka://{settings.kafka_bootstrap_servers}",
        value_serializer="raw",
        key_serializer="raw",
        store="memory://",
        web_enabled=False,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        producer_max_request_size=8 * 1024 * 1024,
        broker_commit_every=100,
        broker_commit_interval=1.0,
    )


def raw_topic(app: faust.App, settings: Settings, logical_name: str) -> faust.TopicT:
    """Declare a topic whose keys and values the agents handle as bytes."""
    return app.topic(
        settings.topic(logical_name),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=1 if logical_name.startswith("dlq.") else settings.topic_partitions,
    )


async def process_with_dead_letter(
    stream: StreamT,
    *,
    service: str,
    dead_letter: faust.TopicT,
    handle: RecordHandler,
) -> None:
    """Run ``handle`` on every event; a record it cannot process goes to ``dead_letter``.

    The failed record keeps its key and value; the headers carry the error and
    its origin (topic, partition, offset). The stream goes on with the next record.
    """
    async for event in stream.events():
        message = event.message
        try:
            await handle(event.key, event.value)
        except Exception as exc:  # noqa: BLE001 - every failure is dead-lettered, never swallowed
            level = logging.WARNING if _is_input_error(exc) else logging.ERROR
            logger.log(
                level,
                "record rejected service=%s topic=%s partition=%s offset=%s error=%s",
                service,
                message.topic,
                message.partition,
                message.offset,
                exc,
                exc_info=level == logging.ERROR,
            )
            await dead_letter.send(
                key=event.key,
                value=event.value,
                headers=dead_letter_headers(
                    service=service,
                    error=exc,
                    topic=message.topic,
                    partition=message.partition,
                    offset=message.offset,
                ),
            )


def _is_input_error(exc: BaseException) -> bool:
    """Tell a bad record (expected, logged as a warning) from a bug or an outage."""
    from pydantic import ValidationError

    from crc_medai.errors import CrcMedAiError

    return isinstance(exc, (CrcMedAiError, ValidationError, ValueError))
