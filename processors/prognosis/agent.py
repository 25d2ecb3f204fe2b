"""Prognosis processor: patient records in, recurrence risk with SHAP contributions out.

Consumes ``patient-records`` (key: patient pseudonym), maps the FHIR Bundle to
model features, predicts the recurrence risk with CatBoost and publishes a
:class:`PrognosisResult` on ``prognoses`` with the same key.

A record is scored once per event id, and a record whose ``source_ts`` is
older than the last one scored for the same patient is skipped as superseded:
the newer record already gave the current prognosis. Both facts are kept in
Redis under ``settings.redis_key``, so they hold across restarts and workers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime

from redis.asyncio import Redis

from crc_medai import metrics
from crc_medai.lifecycle.switcher import ModelSwitcher
from crc_medai.logs import pseudonym
from crc_medai.settings import Settings
from processors.app import create_app, process_with_dead_letter, raw_topic
from processors.prognosis.fhir_mapping import features_from_bundle
from processors.prognosis.survival_model import RecurrenceSurvivalModel
from schemas.messages import HorizonProbability, ModelRef, PatientRecord, PrognosisResult, utc_now

logger = logging.getLogger(__name__)

SERVICE = "prognosis"
#: Seconds an event id is remembered as scored; a redelivery later than this is scored again.
EVENT_ID_TTL_S = 7 * 24 * 3600


class RecordScorer:
    """Maps one patient record to features and scores it; blocking, meant for a worker thread.

    The model is the registry's champion, held by a :class:`ModelSwitcher`.
    Each record is scored by the version current when its scoring starts, and
    its result names that version.
    """

    def __init__(self, settings: Settings) -> None:
        self.switcher = ModelSwitcher(settings, "prognosis", SERVICE, RecurrenceSurvivalModel.load)
        self.switcher.start()

    @property
    def model_ref(self) -> ModelRef:
        """Name and registry version of the model the next record is scored with."""
        return self.switcher.current().model_ref

    def process(self, record: PatientRecord) -> PrognosisResult:
        """Score one record; unmappable features are reported as missing, never invented."""
        deployed = self.switcher.current()
        model = deployed.model
        started = time.perf_counter()
        mapped = features_from_bundle(record.bundle)
        prediction = model.predict(mapped.features, mapped.missing)
        inference_ms = (time.perf_counter() - started) * 1000.0
        path = prediction.decision_path

        missing = sorted(set(prediction.missing_features) | set(mapped.missing))
        reasons = {feature: mapped.missing.get(feature, "the model could not use the value") for feature in missing}
        return PrognosisResult(
            record_event_id=record.event_id,
            patient_id=record.patient_id,
            source_ts=utc_now(),
            horizon_years=model.horizon_years,
            recurrence_probability=prediction.probability,
            risk_group=prediction.risk_group,
            base_value=prediction.base_value,
            contributions=prediction.contributions,
            missing_features=missing,
            missing_reasons=reasons,
            model=deployed.model_ref,
            inference_ms=inference_ms,
            explanation_scale="log-hazard",
            model_output=prediction.log_hazard,
            probabilities=[HorizonProbability(**item.model_dump()) for item in prediction.probabilities],
            top_contributions=prediction.top_contributions(3),
            decision_path=[*(step.text for step in path.steps), path.conclusion],
            decision_path_fidelity_r2=path.fidelity_r2,
        )


class RecordGate:
    """Decides in Redis whether a record is new: not scored before and not older than the last one scored."""

    def __init__(self, settings: Settings, redis: Redis) -> None:
        self.settings = settings
        self.redis = redis

    async def skip_reason(self, record: PatientRecord) -> str | None:
        """Return why the record must not be scored, or None to score it."""
        if await self.redis.exists(self._event_key(record)):
            return "duplicate event id, already scored"
        latest = await self.redis.get(self._latest_key(record))
        if latest is not None and record.source_ts < datetime.fromisoformat(latest.decode("utf-8")):
            return f"superseded by a record with source_ts {latest.decode('utf-8')}"
        return None

    async def mark_scored(self, record: PatientRecord) -> None:
        """Remember the event id and, if it is the newest, the record's source_ts."""
        await self.redis.set(self._event_key(record), b"1", ex=EVENT_ID_TTL_S)
        latest = await self.redis.get(self._latest_key(record))
        if latest is None or record.source_ts >= datetime.fromisoformat(latest.decode("utf-8")):
            await self.redis.set(self._latest_key(record), record.source_ts.isoformat())

    def _event_key(self, record: PatientRecord) -> str:
        return self.settings.redis_key(f"prognosis:event:{record.event_id}")

    def _latest_key(self, record: PatientRecord) -> str:
        return self.settings.redis_key(f"prognosis:latest-source-ts:{record.patient_id}")


def build_app(settings: Settings):  # noqa: ANN201 - returns faust.App
    """Build the prognosis processor's Faust app and agent."""
    app = create_app(settings, SERVICE)
    records = raw_topic(app, settings, PatientRecord.topic)
    prognoses = raw_topic(app, settings, PrognosisResult.topic)
    dead_letter = raw_topic(app, settings, f"dlq.{SERVICE}")
    scorer = RecordScorer(settings)
    gate = RecordGate(settings, Redis.from_url(settings.redis_url))
    metrics.record_model(SERVICE, scorer.model_ref.name, scorer.model_ref.version)
    logger.info("prognosis processor ready model=%s version=%s", scorer.model_ref.name, scorer.model_ref.version)

    async def handle(key: bytes | None, value: bytes | None) -> None:
        record = PatientRecord.from_bytes(value)
        skip_reason = await gate.skip_reason(record)
        if skip_reason is not None:
            logger.info(
                "record skipped patient=%s event_id=%s reason=%s",
                pseudonym(record.patient_id),
                record.event_id,
                skip_reason,
            )
            return
        result = await asyncio.to_thread(scorer.process, record)
        await prognoses.send(key=record.patient_id.encode(), value=result.to_bytes())
        await gate.mark_scored(record)
        metrics.observe_prognosis(SERVICE, result.model.name, result.inference_ms, record.source_ts)
        logger.info(
            "record scored patient=%s probability=%.3f risk_group=%s",
            pseudonym(record.patient_id),
            result.recurrence_probability,
            result.risk_group,
        )

    @app.task
    async def follow_model_deployments() -> None:
        await scorer.switcher.follow()

    @app.agent(records)
    async def score(stream) -> None:  # noqa: ANN001 - faust stream
        await process_with_dead_letter(stream, service=SERVICE, dead_letter=dead_letter, handle=handle)

    return app
