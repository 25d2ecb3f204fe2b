"""The champion model of a running processor, swapped between batches on each deployment event.

A Faust agent calls :meth:`ModelSwitcher.current` once at the start of each
batch and uses that model for the whole batch. The switcher loads a new
version in a worker thread and then replaces the reference in one
assignment, so a batch in flight finishes on the version it started with and
the next batch runs on the new one. When a load fails, the old version keeps
running, and the failure is logged and counted in ``crc_model_load_failures``.

Every worker follows the ``models`` topic with its own consumer, without a
consumer group, because each worker must see every deployment.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from mlflow.exceptions import MlflowException
from prometheus_client import Counter

from crc_medai import metrics
from crc_medai.lifecycle.errors import ModelLoadError
from crc_medai.lifecycle.events import MODELS_TOPIC, ModelDeployment, ensure_models_topic
from crc_medai.lifecycle.kinds import model_kind
from crc_medai.lifecycle.registry import CHAMPION, ModelRegistry
from crc_medai.settings import Settings
from schemas.messages import ModelRef

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT")

#: Seconds between two attempts to follow the ``models`` topic after a Kafka error.
FOLLOW_RETRY_S = 5.0

MODEL_LOAD_FAILURES = Counter(
    "crc_model_load_failures",
    "Model versions a service failed to load; the service kept the version it had.",
    ["service", "model"],
)
INVALID_DEPLOYMENTS = Counter(
    "crc_model_deployments_invalid",
    "Records on the models topic that are not a valid deployment event; the service ignored them.",
    ["service"],
)
MODEL_SWITCHES = Counter(
    "crc_model_switches", "Times a service switched to another model version.", ["service", "model"]
)


@dataclass(frozen=True)
class DeployedModel(Generic[ModelT]):
    """A loaded model and the registry version it came from."""

    model: ModelT
    name: str
    version: str
    weights: Path

    @property
    def model_ref(self) -> ModelRef:
        """Name and registry version for result messages."""
        return ModelRef(name=self.name, version=self.version)


class ModelSwitcher(Generic[ModelT]):
    """Champion model of one kind in one service, switched to each new champion its deployment events announce."""

    def __init__(
        self,
        settings: Settings,
        kind: str,
        service: str,
        load: Callable[[Path], ModelT],
        registry: ModelRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.kind = model_kind(kind)
        self.service = service
        self._load = load
        self._registry = registry
        self._current: DeployedModel[ModelT] | None = None
        #: True while :meth:`follow` consumes the models topic from a fixed position.
        self.following = False
        MODEL_LOAD_FAILURES.labels(service=service, model=self.kind.registered_name)
        MODEL_SWITCHES.labels(service=service, model=self.kind.registered_name)

    @property
    def registry(self) -> ModelRegistry:
        """The registry, opened on first use."""
        if self._registry is None:
            self._registry = ModelRegistry(self.settings)
        return self._registry

    def start(self) -> DeployedModel[ModelT]:
        """Load the champion, registering the shipped weights first when the registry is empty.

        With ``model_registry_enabled`` false, load the shipped weights file
        instead, named by the model's own name and version, and never switch.

        Raises:
            ModelLoadError: the champion could not be downloaded or loaded; the
                service cannot start without a model.
        """
        if not self.settings.model_registry_enabled:
            weights = self.kind.shipped_weights(self.settings)
            model = self._load(weights)
            self._current = DeployedModel(model=model, name=model.name, version=model.version, weights=weights)
            self._announce("model loaded from file, registry disabled")
            return self._current

        self.registry.bootstrap(self.kind.name)
        champion = self.registry.alias(self.kind.name, CHAMPION)
        if champion is None:
            raise ModelLoadError(
                f"{self.kind.registered_name} has versions but no {CHAMPION} alias; set one with "
                f"'crc-medai models promote {self.kind.name} VERSION'"
            )
        self._current = self._load_version(champion.version)
        self._announce("model loaded")
        return self._current

    def current(self) -> DeployedModel[ModelT]:
        """Return the version to use for the next batch."""
        if self._current is None:
            raise ModelLoadError(f"{self.service}: no {self.kind.name} model loaded; call start() first")
        return self._current

    async def switch_to(self, version: str) -> bool:
        """Load ``version`` in a worker thread and make it current; keep the old one when loading fails."""
        current = self.current()
        if version == current.version:
            return True
        try:
            loaded = await asyncio.to_thread(self._load_version, version)
        except Exception as error:  # noqa: BLE001 - any failed load keeps the old version, reported here
            MODEL_LOAD_FAILURES.labels(service=self.service, model=self.kind.registered_name).inc()
            logger.error(
                "model load failed, keeping the running version service=%s model=%s version=%s running=%s error=%s",
                self.service,
                self.kind.registered_name,
                version,
                current.version,
                error,
            )
            return False
        self._current = loaded
        MODEL_SWITCHES.labels(service=self.service, model=self.kind.registered_name).inc()
        self._announce(f"model switched from version {current.version}")
        return True

    async def follow(self) -> None:
        """Switch to each new champion announced on the ``models`` topic until cancelled.

        Returns at once when ``model_registry_enabled`` is false. The
        consumer starts at the end of the topic. The champion alias is read
        again once the consumer has its position, so a promotion made while
        the service was starting, or while Kafka was unreachable, is not
        missed. A Kafka error is logged and the consumer starts again after
        :data:`FOLLOW_RETRY_S`.
        """
        if not self.settings.model_registry_enabled:
            return
        while True:
            try:
                await self._follow_from_end()
            except KafkaError as error:
                logger.warning(
                    "following deployments failed, retrying in %.0f s service=%s error=%s",
                    FOLLOW_RETRY_S,
                    self.service,
                    error,
                )
                await asyncio.sleep(FOLLOW_RETRY_S)

    async def _follow_from_end(self) -> None:
        await ensure_models_topic(self.settings)
        topic = self.settings.topic(MODELS_TOPIC)
        consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap_servers, enable_auto_commit=False)
        await consumer.start()
        try:
            await consumer.topics()  # fetches the metadata that partitions_for_topic reads
            numbers = sorted(consumer.partitions_for_topic(topic) or {0})
            partitions = [TopicPartition(topic, number) for number in numbers]
            consumer.assign(partitions)
            await consumer.seek_to_end(*partitions)
            for partition in partitions:
                await consumer.position(partition)
            await self._switch_to_champion()
            self.following = True
            logger.info(
                "following deployments service=%s topic=%s model=%s", self.service, topic, self.kind.registered_name
            )
            async for record in consumer:
                await self._on_record(record.value)
        finally:
            self.following = False
            await consumer.stop()

    async def _switch_to_champion(self) -> None:
        try:
            champion = await asyncio.to_thread(self.registry.alias, self.kind.name, CHAMPION)
        except MlflowException as error:
            logger.error("champion lookup failed service=%s model=%s error=%s", self.service, self.kind.name, error)
            return
        if champion is not None:
            await self.switch_to(champion.version)

    async def _on_record(self, value: bytes | None) -> None:
        try:
            event = ModelDeployment.from_bytes(value)
        except ValueError as error:  # pydantic's ValidationError is a ValueError
            INVALID_DEPLOYMENTS.labels(service=self.service).inc()
            logger.warning("deployment event ignored, invalid service=%s error=%s", self.service, error)
            return
        if event.model_name != self.kind.registered_name or event.alias != CHAMPION:
            return
        logger.info(
            "deployment received service=%s model=%s version=%s action=%s",
            self.service,
            event.model_name,
            event.version,
            event.action,
        )
        await self.switch_to(event.version)

    def _load_version(self, version: str) -> DeployedModel[ModelT]:
        try:
            weights = self.registry.download(self.kind.name, version)
            model = self._load(weights)
        except Exception as error:
            raise ModelLoadError(
                f"{self.kind.registered_name} version {version} could not be loaded: {error}; "
                "check the version's artifacts with 'crc-medai models list'"
            ) from error
        return DeployedModel(model=model, name=self.kind.registered_name, version=version, weights=weights)

    def _announce(self, message: str) -> None:
        current = self.current()
        metrics.record_model(self.service, current.name, current.version)
        logger.info(
            "%s service=%s model=%s version=%s weights=%s",
            message,
            self.service,
            current.name,
            current.version,
            current.weights,
        )
