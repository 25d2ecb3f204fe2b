"""Prognosis processor: patient records in, recurrence risk with SHAP contributions out.

Consumes ``patient-records`` (key: patient pseudonym), maps the FHIR Bundle to
model features, predicts the recurrence risk with CatBoost and publishes a
:class:`PrognosisResult` on ``prognoses`` with the same key.
"""

from __future__ import annotations

import asyncio
import logging
import time

from crc_medai import metrics
from crc_medai.logs import pseudonym
from crc_medai.settings import Settings
from processors.app import create_app, process_with_dead_letter, raw_topic
from processors.prognosis.fhir_mapping import features_from_bundle
from processors.prognosis.survival_model import RecurrenceSurvivalModel
from schemas.messages import HorizonProbability, ModelRef, PatientRecord, PrognosisResult, utc_now

logger = logging.getLogger(__name__)

SERVICE = "prognosis"


class RecordScorer:
    """Maps one patient record to features and scores it; blocking, meant for a worker thread."""

    def __init__(self, settings: Settings) -> None:
        self.model = RecurrenceSurvivalModel.load(settings.prognosis_model_path)
        self.model_ref = ModelRef(name=self.model.name, version=self.model.version)

    def process(self, record: PatientRecord) -> PrognosisResult:
        """Score one record; unmappable features are reported as missing, never invented."""
        started = time.perf_counter()
        mapped = features_from_bundle(record.bundle)
        prediction = self.model.predict(mapped.features, mapped.missing)
        inference_ms = (time.perf_counter() - started) * 1000.0
        path = prediction.decision_path

        missing = sorted(set(prediction.missing_features) | set(mapped.missing))
        return PrognosisResult(
            record_event_id=record.event_id,
            patient_id=record.patient_id,
            source_ts=utc_now(),
            horizon_years=self.model.horizon_years,
            recurrence_probability=prediction.probability,
            risk_group=prediction.risk_group,
            base_value=prediction.base_value,
            contributions=prediction.contributions,
            missing_features=missing,
            model=self.model_ref,
            inference_ms=inference_ms,
            explanation_scale="log-hazard",
            model_output=prediction.log_hazard,
            probabilities=[HorizonProbability(**item.model_dump()) for item in prediction.probabilities],
            top_contributions=prediction.top_contributions(3),
            decision_path=[*(step.text for step in path.steps), path.conclusion],
            decision_path_fidelity_r2=path.fidelity_r2,
        )


def build_app(settings: Settings):  # noqa: ANN201 - returns faust.App
    """Build the prognosis processor's Faust app and agent."""
    app = create_app(settings, SERVICE)
    records = raw_topic(app, settings, PatientRecord.topic)
    prognoses = raw_topic(app, settings, PrognosisResult.topic)
    dead_letter = raw_topic(app, settings, f"dlq.{SERVICE}")
    scorer = RecordScorer(settings)
    metrics.record_model(SERVICE, scorer.model_ref.name, scorer.model_ref.version)
    logger.info("prognosis processor ready model=%s version=%s", scorer.model_ref.name, scorer.model_ref.version)

    async def handle(key: bytes | None, value: bytes | None) -> None:
        record = PatientRecord.from_bytes(value)
        result = await asyncio.to_thread(scorer.process, record)
        await prognoses.send(key=record.patient_id.encode(), value=result.to_bytes())
        metrics.observe_prognosis(SERVICE, result.model.name, result.inference_ms, record.source_ts)
        logger.info(
            "record scored patient=%s probability=%.3f risk_group=%s",
            pseudonym(record.patient_id),
            result.recurrence_probability,
            result.risk_group,
        )

    @app.agent(records)
    async def score(stream) -> None:  # noqa: ANN001 - faust stream
        await process_with_dead_letter(stream, service=SERVICE, dead_letter=dead_letter, handle=handle)

    return app
