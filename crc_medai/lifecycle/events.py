"""Deployment events on the ``models`` topic: which version an alias of a registered model now names.

The topic has one partition and events are keyed by registered model name,
so every consumer receives the events of one model in the order they happened.
"""

from __future__ import annotations

import logging
from typing import ClassVar, Literal

from pydantic import Field

from crc_medai.kafka import create_producer, ensure_topics
from crc_medai.settings import Settings
from schemas.messages import Message

logger = logging.getLogger(__name__)

MODELS_TOPIC = "models"


class ModelDeployment(Message):
    """An alias of a registered model moved to another version; key: registered model name."""

    topic: ClassVar[str] = MODELS_TOPIC

    kind: Literal["detection", "prognosis"]
    model_name: str = Field(description="Registered model name, for example 'polyp-unet'.")
    version: str = Field(description="Registry version the alias names now.")
    alias: str = Field(description="The alias that moved, for example 'champion'.")
    action: Literal["bootstrap", "promote", "rollback"]
    previous_version: str | None = Field(default=None, description="Version the alias named before, if any.")
    artifact_uri: str = Field(description="Where the version's files lie, for example s3://crc-models/....")


async def ensure_models_topic(settings: Settings) -> None:
    """Create the ``models`` topic with one partition if it does not exist."""
    await ensure_topics(settings.model_copy(update={"topic_partitions": 1}), [MODELS_TOPIC])


async def publish_deployment(settings: Settings, event: ModelDeployment) -> None:
    """Publish ``event`` and wait until the broker has acknowledged it."""
    await ensure_models_topic(settings)
    producer = create_producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(
            settings.topic(MODELS_TOPIC), value=event.to_bytes(), key=event.model_name.encode()
        )
    finally:
        await producer.stop()
    logger.info(
        "deployment published model=%s alias=%s version=%s previous=%s action=%s",
        event.model_name,
        event.alias,
        event.version,
        event.previous_version,
        event.action,
    )
