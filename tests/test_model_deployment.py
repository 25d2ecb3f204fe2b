"""Live deployment: the model switcher follows promotions and rollbacks, and keeps its model on a failed load.

Real stack: the registry's artifacts lie in MinIO, deployments travel on the
test's own ``models`` topic, and the registry store is a SQLite file in the
test's folder.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer
from prometheus_client import REGISTRY

from crc_medai.kafka import create_producer, ensure_topics
from crc_medai.lifecycle.errors import GateRejectedError
from crc_medai.lifecycle.events import MODELS_TOPIC
from crc_medai.lifecycle.gate import GateDecision
from crc_medai.lifecycle.registry import ModelRegistry
from crc_medai.lifecycle.switcher import ModelSwitcher
from crc_medai.lifecycle.training import train_detection, train_prognosis
from crc_medai.settings import REPO_ROOT, Settings
from crc_medai.storage import create_minio
from processors.detection.synth import generate_frame
from processors.prognosis.survival_model import RecurrenceSurvivalModel
from schemas.messages import DetectionResult, Frame, PatientRecord, PrognosisResult, utc_now
from tests.conftest import RunningServices, running_services
from tests.test_model_registry import lifecycle_settings

pytestmark = pytest.mark.integration

#: Seconds a test waits for the switcher to follow a deployment.
FOLLOW_TIMEOUT_S = 60.0


@pytest.fixture
def registry(stack: Settings, tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(lifecycle_settings(stack, tmp_path))


def prognosis_switcher(registry: ModelRegistry, service: str) -> ModelSwitcher[RecurrenceSurvivalModel]:
    return ModelSwitcher(registry.settings, "prognosis", service, RecurrenceSurvivalModel.load, registry=registry)


def load_failures(service: str) -> float:
    labels = {"service": service, "model": "crc-recurrence-survival-catboost"}
    return REGISTRY.get_sample_value("crc_model_load_failures_total", labels) or 0.0


async def wait_until_following(switcher: ModelSwitcher) -> None:
    """Wait until the switcher's consumer has its position on the models topic."""
    deadline = time.monotonic() + FOLLOW_TIMEOUT_S
    while not switcher.following and time.monotonic() < deadline:
        await asyncio.sleep(0.1)


async def wait_for_version(switcher: ModelSwitcher, version: str) -> None:
    deadline = time.monotonic() + FOLLOW_TIMEOUT_S
    while switcher.current().version != version and time.monotonic() < deadline:
        await asyncio.sleep(0.2)


def test_switcher_starts_from_bootstrapped_champion(registry: ModelRegistry) -> None:
    switcher = prognosis_switcher(registry, "test-start")

    deployed = switcher.start()

    assert deployed.version == "1"
    assert deployed.model_ref.name == "crc-recurrence-survival-catboost"
    assert deployed.model_ref.version == "1"
    assert deployed.weights.parent == registry.settings.model_cache_dir / "crc-recurrence-survival-catboost" / "1"
    assert switcher.current() is deployed


async def test_switcher_without_registry_loads_file(stack: Settings, tmp_path: Path) -> None:
    settings = lifecycle_settings(stack, tmp_path).model_copy(update={"model_registry_enabled": False})
    switcher = ModelSwitcher(settings, "prognosis", "test-no-registry", RecurrenceSurvivalModel.load)

    deployed = switcher.start()
    await switcher.follow()

    assert deployed.weights == settings.prognosis_model_path
    assert deployed.model_ref.version == "2.0.0"
    assert switcher.current() is deployed
    assert not settings.model_registry_db.exists()


async def test_switcher_follows_promotion_and_rollback(registry: ModelRegistry, tmp_path: Path) -> None:
    switcher = prognosis_switcher(registry, "test-follow")
    await asyncio.to_thread(switcher.start)
    candidate = await asyncio.to_thread(train_prognosis, registry, tmp_path / "candidate", 1)
    following = asyncio.create_task(switcher.follow())
    try:
        await asyncio.to_thread(registry.promote, "prognosis", candidate.version)
        await wait_for_version(switcher, "2")
        promoted = switcher.current()

        await asyncio.to_thread(registry.rollback, "prognosis")
        await wait_for_version(switcher, "1")
        rolled_back = switcher.current()
    finally:
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)

    assert promoted.version == "2"
    assert promoted.weights.parent.name == "2"
    assert rolled_back.version == "1"
    assert following.done()


async def test_invalid_deployment_event_is_ignored(registry: ModelRegistry, tmp_path: Path) -> None:
    service = "test-invalid-event"
    switcher = prognosis_switcher(registry, service)
    await asyncio.to_thread(switcher.start)
    candidate = await asyncio.to_thread(train_prognosis, registry, tmp_path / "candidate", 1)
    following = asyncio.create_task(switcher.follow())
    try:
        await wait_until_following(switcher)
        producer = create_producer(registry.settings)
        await producer.start()
        try:
            topic = registry.settings.topic(MODELS_TOPIC)
            await producer.send_and_wait(topic, value=b'{"version": "2"}', key=b"crc-recurrence-survival-catboost")
        finally:
            await producer.stop()
        await asyncio.to_thread(registry.promote, "prognosis", candidate.version)
        await wait_for_version(switcher, "2")
    finally:
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)

    assert switcher.current().version == "2"
    assert REGISTRY.get_sample_value("crc_model_deployments_invalid_total", {"service": service}) == 1.0


async def test_failed_load_keeps_old_version(registry: ModelRegistry, tmp_path: Path) -> None:
    service = "test-failed-load"
    switcher = prognosis_switcher(registry, service)
    running = await asyncio.to_thread(switcher.start)
    candidate = await asyncio.to_thread(train_prognosis, registry, tmp_path / "candidate", 1)
    # The artifact store lost the candidate's weights after registration.
    bucket = registry.settings.model_artifact_bucket
    key = candidate.source.removeprefix(f"s3://{bucket}/") + "/recurrence_survival_catboost.cbm"
    create_minio(registry.settings).remove_object(bucket, key)
    failures_before = load_failures(service)

    switched = await switcher.switch_to(candidate.version)

    assert switched is False
    assert switcher.current() is running
    assert switcher.current().version == "1"
    assert load_failures(service) == failures_before + 1
    assert not (registry.settings.model_cache_dir / "crc-recurrence-survival-catboost" / "2").exists()


async def test_corrupt_weights_keep_old_version(registry: ModelRegistry, tmp_path: Path) -> None:
    service = "test-corrupt-weights"
    switcher = prognosis_switcher(registry, service)
    running = await asyncio.to_thread(switcher.start)
    candidate = await asyncio.to_thread(train_prognosis, registry, tmp_path / "candidate", 1)
    # The weights arrive but differ from the SHA-256 their sidecar records.
    bucket = registry.settings.model_artifact_bucket
    key = candidate.source.removeprefix(f"s3://{bucket}/") + "/recurrence_survival_catboost.cbm"
    garbage = b"not a CatBoost model"
    create_minio(registry.settings).put_object(bucket, key, io.BytesIO(garbage), length=len(garbage))

    switched = await switcher.switch_to(candidate.version)

    assert switched is False
    assert switcher.current() is running
    assert load_failures(service) == 1


# Promotion while records flow through the prognosis processor ------------------------------------------------------

RECORDS = REPO_ROOT / "samples" / "records"
#: Records the producer publishes before the candidate is promoted, and results of each version it waits for.
RESULTS_PER_VERSION = 10
#: Largest number of records the test publishes; it stops earlier once both versions produced results.
MAX_RECORDS = 400


def sample_bundles() -> list[dict]:
    paths = sorted(path for path in RECORDS.glob("pt-*.json"))
    return [json.loads(path.read_text(encoding="utf-8")) for path in paths]


class MessageFlow:
    """Publishes input messages at a steady pace and collects the results that come back."""

    #: Logical topics of the inputs and of the results.
    input_topic = ""
    result_topic = ""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.published: list[str] = []
        self.results: list[tuple[int, Any]] = []
        self.stop_publishing = asyncio.Event()
        self.consumer: AIOKafkaConsumer | None = None

    def message(self, index: int) -> tuple[bytes, bytes, str]:
        """Return the key, value and identity of input number ``index``."""
        raise NotImplementedError

    def versions(self) -> list[str]:
        return [result.model.version for _, result in self.results]

    def result_ids(self) -> list[str]:
        return [self.parse_id(result) for _, result in self.results]

    def parse_id(self, result: Any) -> str:
        """Return the identity of the input that ``result`` was produced for."""
        raise NotImplementedError

    async def publish(self) -> None:
        producer = create_producer(self.settings)
        await producer.start()
        try:
            while not self.stop_publishing.is_set() and len(self.published) < MAX_RECORDS:
                key, value, identity = self.message(len(self.published))
                await producer.send_and_wait(self.settings.topic(self.input_topic), value=value, key=key)
                self.published.append(identity)
                await asyncio.sleep(0.05)
        finally:
            await producer.stop()

    async def collect(self, until: Callable[[], bool], timeout_s: float) -> None:
        """Read results, continuing where the previous call stopped, until ``until()`` or the timeout."""
        if self.consumer is None:
            self.consumer = AIOKafkaConsumer(
                self.settings.topic(self.result_topic),
                bootstrap_servers=self.settings.kafka_bootstrap_servers,
                auto_offset_reset="earliest",
                enable_auto_commit=False,
            )
            await self.consumer.start()
        deadline = time.monotonic() + timeout_s
        while not until() and time.monotonic() < deadline:
            batches = await self.consumer.getmany(timeout_ms=500)
            for partition, messages in batches.items():
                self.results.extend((partition.partition, self.parse_result(message.value)) for message in messages)

    def parse_result(self, value: bytes) -> Any:
        """Parse one result record value."""
        raise NotImplementedError

    async def close(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()

    async def promote_while_flowing(
        self, registry: ModelRegistry, kind: str, rejected: str, promoted: str, service: RunningServices
    ) -> GateDecision:
        """Publish, reject one candidate and promote another mid-stream, then collect every result."""
        publishing = asyncio.create_task(self.publish())

        def count(version: str) -> int:
            return self.versions().count(version)

        try:
            await self.collect(lambda: count("1") >= RESULTS_PER_VERSION or service.any_stopped(), 240)
            with pytest.raises(GateRejectedError):
                await asyncio.to_thread(registry.promote, kind, rejected)
            decision, _ = await asyncio.to_thread(registry.promote, kind, promoted)
            await self.collect(lambda: count(promoted) >= RESULTS_PER_VERSION or service.any_stopped(), 240)
            self.stop_publishing.set()
            await publishing
            await self.collect(lambda: len(self.results) >= len(self.published) or service.any_stopped(), 240)
        finally:
            self.stop_publishing.set()
            await asyncio.gather(publishing, return_exceptions=True)
            await self.close()
        return decision

    def check_switch(self, service: RunningServices, name: str, promoted: str) -> None:
        """Assert that every input has exactly one result and that each partition switched once, forward."""
        assert not service.any_stopped(), service.logs()
        answered = self.result_ids()
        assert len(answered) == len(set(answered)), "an input was processed twice"
        assert sorted(answered) == sorted(self.published), "an input was lost"
        assert set(self.versions()) == {"1", promoted}
        for partition in {partition for partition, _ in self.results}:
            versions = [int(result.model.version) for number, result in self.results if number == partition]
            assert versions == sorted(versions), f"partition {partition} went back to version 1 after the promotion"
        assert {result.model.name for _, result in self.results} == {name}


class RecordFlow(MessageFlow):
    """Patient records in, prognoses out."""

    input_topic = PatientRecord.topic
    result_topic = PrognosisResult.topic

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.bundles = sample_bundles()

    def message(self, index: int) -> tuple[bytes, bytes, str]:
        record = PatientRecord(
            patient_id=f"pt-deploy-{index:04d}",
            source_name="test_model_deployment",
            bundle=self.bundles[index % len(self.bundles)],
        )
        return record.patient_id.encode(), record.to_bytes(), str(record.event_id)

    def parse_result(self, value: bytes) -> PrognosisResult:
        return PrognosisResult.from_bytes(value)

    def parse_id(self, result: PrognosisResult) -> str:
        return str(result.record_event_id)


class FrameFlow(MessageFlow):
    """Generated frames of one procedure in, detection results out."""

    input_topic = Frame.topic
    result_topic = DetectionResult.topic
    procedure_id = "proc-deploy"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        rng = np.random.default_rng(5)
        self.images = [
            cv2.imencode(".jpg", generate_frame(rng, size=128, with_polyp=i % 2 == 0)[0])[1].tobytes() for i in range(8)
        ]

    def message(self, index: int) -> tuple[bytes, bytes, str]:
        frame = Frame(
            procedure_id=self.procedure_id,
            sequence=index,
            captured_at=utc_now(),
            width=128,
            height=128,
            image=self.images[index % len(self.images)],
        )
        return self.procedure_id.encode(), frame.to_bytes(), str(index)

    def parse_result(self, value: bytes) -> DetectionResult:
        return DetectionResult.from_bytes(value)

    def parse_id(self, result: DetectionResult) -> str:
        return str(result.sequence)


@pytest.fixture
def flow_settings(stack: Settings, tmp_path: Path) -> Settings:
    return lifecycle_settings(stack, tmp_path)


@pytest.fixture
def prognosis_service(flow_settings: Settings) -> Iterator[RunningServices]:
    # The registry exists before the service starts, with the shipped weights as version 1 champion.
    ModelRegistry(flow_settings).bootstrap("prognosis")
    yield from running_services(flow_settings, flow_settings.output_dir / "logs", ("prognosis",))


async def test_promotion_switches_results_while_records_flow(
    flow_settings: Settings, prognosis_service: RunningServices, tmp_path: Path
) -> None:
    registry = ModelRegistry(flow_settings)
    weak = await asyncio.to_thread(train_prognosis, registry, tmp_path / "weak", 2, patients=60)
    candidate = await asyncio.to_thread(train_prognosis, registry, tmp_path / "candidate", 1)
    await ensure_topics(flow_settings)
    flow = RecordFlow(flow_settings)

    decision = await flow.promote_while_flowing(
        registry, "prognosis", weak.version, candidate.version, prognosis_service
    )

    assert decision.passed
    assert (weak.version, candidate.version) == ("2", "3")
    flow.check_switch(prognosis_service, "crc-recurrence-survival-catboost", candidate.version)


@pytest.fixture
def detection_service(flow_settings: Settings) -> Iterator[RunningServices]:
    # A long latency budget, so that no frame is skipped as stale on a loaded machine.
    settings = flow_settings.model_copy(update={"detection_latency_budget_ms": 600_000.0})
    ModelRegistry(settings).bootstrap("detection")
    yield from running_services(settings, settings.output_dir / "logs", ("detection",))


async def test_promotion_switches_detections_while_frames_flow(
    flow_settings: Settings, detection_service: RunningServices, tmp_path: Path
) -> None:
    from processors.detection.train import TrainingConfig

    registry = ModelRegistry(flow_settings)
    config = TrainingConfig(seed=3, steps=2, batch_size=4, pool_size=8, frame_size=128)
    weak = await asyncio.to_thread(train_detection, registry, tmp_path / "weak", config)
    # The shipped weights registered again pass the gate with the same figures.
    candidate = await asyncio.to_thread(registry.register_file, "detection", flow_settings.detection_model_path)
    await ensure_topics(flow_settings)
    flow = FrameFlow(flow_settings)

    decision = await flow.promote_while_flowing(
        registry, "detection", weak.version, candidate.version, detection_service
    )

    assert decision.passed
    assert (weak.version, candidate.version) == ("2", "3")
    flow.check_switch(detection_service, "polyp-unet", candidate.version)
    assert all(result.skipped_reason is None for _, result in flow.results)
