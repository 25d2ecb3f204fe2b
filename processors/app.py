"""Faust application factory and the dead-letter loop every agent runs.

Each service is one Faust app whose id is its consumer group, so several
workers of the same service share the partitions of its input topics.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import faust
from faust.types import EventT, StreamT

from crc_medai import metrics
from crc_medai.kafka import dead_letter_headers
from crc_medai.settings import Settings

logger = logging.getLogger(__name__)

#: Handles one record: (key, value) -> None. Raises to send the record to the dead-letter topic.
RecordHandler = Callable[[bytes | None, bytes | None], Awaitable[None]]

#: Handles a batch of (key, value) records. Returns one outcome per record, in order: None when the
#: record was handled, or the exception that sends it to the dead-letter topic.
BatchHandler = Callable[[list[tuple[bytes | None, bytes | None]]], Awaitable[list[BaseException | None]]]

#: Seconds between two updates of the consumer lag gauges.
LAG_INTERVAL_S = 2.0

#: Faust's internal partition-assignor topic; it carries no records, so its lag is not reported.
FAUST_LEADER_TOPIC_SUFFIX = "__assignor-__leader"


def create_app(settings: Settings, service: str) -> faust.App:
    """Create the Faust app of ``service``; its id is the service's consumer group.

    When a metrics port is set, the app also serves /metrics, /healthz and
    /readyz (see :mod:`crc_medai.metrics`) and updates its consumer lag gauges.
    """
    app = _faust_app(settings, service)
    server = metrics.start_metrics_server(settings, service)
    if server is not None:
        _instrument(app, settings, service, server)
    return app


def _faust_app(settings: Settings, service: str) -> faust.App:
    # Faust writes its table data under datadir, by default in the working directory.
    # It creates only the last folder of that path, so the folders above it are made here.
    datadir = settings.output_dir / "faust" / settings.group(service)
    datadir.parent.mkdir(parents=True, exist_ok=True)
    return faust.App(
        settings.group(service),
        broker=f"kafka://{settings.kafka_bootstrap_servers}",
        value_serializer="raw",
        key_serializer="raw",
        store="memory://",
        datadir=str(datadir),
        web_enabled=False,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        producer_max_request_size=settings.kafka_max_message_bytes,
        broker_commit_every=100,
        broker_commit_interval=1.0,
    )


def _instrument(app: faust.App, settings: Settings, service: str, server: metrics.MetricsServer) -> None:
    """Add the store readiness check, mark the worker started and keep the lag gauges current."""
    health = metrics.health(service)
    if service == "detection":
        health.add_check("store", lambda: _check_minio(settings))
    elif service == "fhir-consumer":
        health.add_check("store", lambda: metrics.check_writable(settings.output_dir))

    @app.task
    async def mark_started() -> None:
        # The worker runs tasks only after build_app returned, so the model is loaded by now.
        health.started = True
        logger.info("worker started service=%s", service)

    @app.timer(interval=LAG_INTERVAL_S)
    async def update_consumer_lag() -> None:
        _update_consumer_lag(app, service)

    @app.on_before_shutdown.connect
    async def close_metrics_server(app_: object, **_: object) -> None:
        health.started = False
        server.close()


def _check_minio(settings: Settings) -> str:
    from crc_medai.storage import create_minio

    # A TCP connect first, because the MinIO client retries a refused connection for several seconds.
    metrics.check_reachable(settings.minio_endpoint, "MinIO")
    if not create_minio(settings).bucket_exists(settings.heatmap_bucket):
        raise LookupError(
            f"bucket {settings.heatmap_bucket} not found in MinIO at {settings.minio_endpoint}; "
            "the detection processor creates it at start-up"
        )
    return f"ok bucket {settings.heatmap_bucket}"


_lag_partitions: set[tuple[str, str, str]] = set()


def _update_consumer_lag(app: faust.App, service: str) -> None:
    """Set crc_consumer_lag_messages for every assigned partition and drop revoked ones."""
    consumer = app.consumer
    current: set[tuple[str, str, str]] = set()
    for tp in consumer.assignment():
        if tp.topic.endswith(FAUST_LEADER_TOPIC_SUFFIX):
            continue
        highwater = consumer.highwater(tp)
        if highwater is None:
            continue
        # NOTE: Faust keeps the group's committed offsets in a private attribute (faust-streaming 0.15);
        # None means nothing committed yet, so the whole partition counts as lag.
        committed = consumer._committed_offset.get(tp)
        labels = (service, tp.topic, str(tp.partition))
        metrics.CONSUMER_LAG.labels(*labels).set(max(highwater - (committed or 0), 0))
        current.add(labels)
    for labels in _lag_partitions - current:
        metrics.CONSUMER_LAG.remove(*labels)
    _lag_partitions.clear()
    _lag_partitions.update(current)


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
    metrics.declare_topics(service, tuple(getattr(stream.channel, "topics", ())))
    async for event in stream.events():
        try:
            await handle(event.key, event.value)
            metrics.record_processed(service, event.message.topic)
        except Exception as exc:  # noqa: BLE001 - every failure is dead-lettered, never swallowed
            await _send_to_dead_letter(event, exc, service=service, dead_letter=dead_letter)


async def process_batches_with_dead_letter(
    stream: StreamT,
    *,
    service: str,
    dead_letter: faust.TopicT,
    handle_batch: BatchHandler,
    max_records: int,
    within_s: float,
) -> None:
    """Run ``handle_batch`` on micro-batches of events; each rejected record goes to ``dead_letter``.

    A batch closes when it contains ``max_records`` events or ``within_s``
    seconds after the previous batch, whichever comes first (Faust's
    ``Stream.take_events``). Faust acknowledges the events of a batch after
    the handler returns. The handler reports one outcome per record, so one bad
    record is dead-lettered alone. When the handler raises, every record of the
    batch is dead-lettered with that error.
    """
    metrics.declare_topics(service, tuple(getattr(stream.channel, "topics", ())))
    async for events in stream.take_events(max_records, within=within_s):
        try:
            outcomes = await handle_batch([(event.key, event.value) for event in events])
        except Exception as exc:  # noqa: BLE001 - every failure is dead-lettered, never swallowed
            outcomes = [exc] * len(events)
        if len(outcomes) != len(events):
            error = RuntimeError(
                f"batch handler of {service} returned {len(outcomes)} outcomes for {len(events)} records"
            )
            outcomes = [error] * len(events)

        for event, outcome in zip(events, outcomes, strict=True):
            if outcome is None:
                metrics.record_processed(service, event.message.topic)
            else:
                await _send_to_dead_letter(event, outcome, service=service, dead_letter=dead_letter)


async def _send_to_dead_letter(event: EventT, exc: BaseException, *, service: str, dead_letter: faust.TopicT) -> None:
    """Log the error, count it and send the record unchanged to ``dead_letter`` with its origin in the headers."""
    message = event.message
    level = logging.WARNING if _is_input_error(exc) else logging.ERROR
    logger.log(
        level,
        "record rejected service=%s topic=%s partition=%s offset=%s error=%s",
        service,
        message.topic,
        message.partition,
        message.offset,
        exc,
        exc_info=exc if level == logging.ERROR else None,
    )
    metrics.record_dead_letter(service, message.topic)
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
