"""Detection processor: frames in, polyp detection results and Grad-CAM heatmaps out.

Consumes ``frames`` (key: procedure id) in micro-batches, runs the polyp
detector on each batch in one forward pass, computes Grad-CAM overlays for
flagged frames within a per-procedure rate, stores them in MinIO and publishes
one :class:`DetectionResult` per frame on ``detections`` with the same key.
Stale frames get a result with ``skipped_reason`` instead of a prediction, a
WARNING per batch, and a count per procedure on every finding event.
Flagged frames of one polyp are aggregated into a :class:`PolypFinding` on
``findings``, published when the polyp appears (before its heatmap is computed,
and again with it) and when it is gone.
See :mod:`processors.detection.realtime` for the per-batch steps.
"""

from __future__ import annotations

import asyncio
import logging

import faust

from crc_medai import metrics
from crc_medai.lifecycle.switcher import ModelSwitcher
from crc_medai.logs import pseudonym
from crc_medai.settings import Settings
from processors.app import create_app, process_batches_with_dead_letter, raw_topic
from processors.detection.model import PolypDetector
from processors.detection.realtime import (
    DetectionPipeline,
    FrameDecodeError,
    configure_torch_threads,
    decode_frame,
    heatmap_key,
    select_device,
)
from schemas.messages import DetectionResult, Frame, PolypFinding

__all__ = ["SERVICE", "FrameDecodeError", "build_app", "decode_frame", "heatmap_key"]

logger = logging.getLogger(__name__)

SERVICE = "detection"

#: Seconds between two checks for findings whose polyp has left the view.
IDLE_CHECK_INTERVAL_S = 0.5


def build_app(settings: Settings) -> faust.App:
    """Build the detection processor's Faust app and agent."""
    app = create_app(settings, SERVICE)
    frames = raw_topic(app, settings, Frame.topic)
    detections = raw_topic(app, settings, DetectionResult.topic)
    findings = raw_topic(app, settings, PolypFinding.topic)
    dead_letter = raw_topic(app, settings, f"dlq.{SERVICE}")

    threads = configure_torch_threads(settings.detection_torch_threads)
    switcher = ModelSwitcher(
        settings,
        "detection",
        SERVICE,
        lambda weights: PolypDetector.load(weights, device=select_device(settings.detection_device)),
    )
    deployed = switcher.start()
    # NOTE: open tracks live in this worker's memory. After a rebalance moves a
    # procedure's partition, the new owner starts fresh tracks for that procedure.
    pipeline = DetectionPipeline(settings, detector=deployed.model)
    pipeline.model_ref = deployed.model_ref
    metrics.record_model(SERVICE, pipeline.model_ref.name, pipeline.model_ref.version)
    metrics.FRAMES_SKIPPED.labels(reason="stale")
    # A procedure without flagged frames still shows zero heatmaps on the dashboard, not missing data.
    for outcome in metrics.HEATMAP_OUTCOMES:
        metrics.HEATMAPS.labels(outcome=outcome)
    logger.info(
        "detection processor ready model=%s version=%s device=%s threads=%d threshold=%s batch_size=%d "
        "batch_wait_ms=%s latency_budget_ms=%s heatmaps_per_s=%s bucket=%s",
        pipeline.model_ref.name,
        pipeline.model_ref.version,
        pipeline.detector.device,
        threads,
        settings.detection_threshold,
        settings.detection_batch_size,
        settings.detection_batch_wait_ms,
        settings.detection_latency_budget_ms,
        settings.detection_heatmaps_per_s,
        settings.heatmap_bucket,
    )

    @app.on_before_shutdown.connect
    async def release_hooks(app_: object, **_: object) -> None:
        pipeline.close()

    async def publish_findings(events: list[PolypFinding]) -> None:
        for finding in events:
            await findings.send(key=finding.procedure_id.encode(), value=finding.to_bytes())
            logger.info(
                "finding %s procedure=%s frames=%d-%d peak=%.3f heatmap=%s stale_frames_skipped=%s",
                finding.status,
                pseudonym(finding.procedure_id),
                finding.first_sequence,
                finding.last_sequence,
                finding.peak_probability,
                finding.heatmap_key is not None,
                finding.stale_frames_skipped,
            )
            if finding.status == "closed" and finding.stale_frames_skipped:
                logger.warning(
                    "finding closed while the procedure has frames never examined procedure=%s "
                    "stale_frames_skipped=%d; the procedure's coverage is incomplete",
                    pseudonym(finding.procedure_id),
                    finding.stale_frames_skipped,
                )

    async def publish_results(results: list[DetectionResult]) -> None:
        for result in results:
            await detections.send(key=result.procedure_id.encode(), value=result.to_bytes())
            if result.skipped_reason is None:
                metrics.observe_detection(
                    SERVICE, result.model.name, result.inference_ms, result.flagged, result.captured_at
                )
            else:
                metrics.observe_end_to_end(SERVICE, result.captured_at)

    async def handle_batch(records: list[tuple[bytes | None, bytes | None]]) -> list[BaseException | None]:
        # A new champion, loaded by the switcher meanwhile, takes over between batches.
        deployed = switcher.current()
        if deployed.model_ref != pipeline.model_ref:
            await asyncio.to_thread(pipeline.use_detector, deployed.model, deployed.model_ref)
        detected = await asyncio.to_thread(pipeline.detect_batch, [value for _, value in records])
        # A new finding goes out before Grad-CAM runs, and again once its heatmap is stored.
        await publish_findings(detected.confirmed)
        output = await asyncio.to_thread(pipeline.explain_batch, detected)
        await publish_results([outcome for outcome in output.outcomes if isinstance(outcome, DetectionResult)])
        await publish_findings(output.findings)
        logger.debug(
            "batch processed records=%d findings=%d", len(records), len(detected.confirmed) + len(output.findings)
        )
        return [outcome if isinstance(outcome, BaseException) else None for outcome in output.outcomes]

    @app.timer(interval=IDLE_CHECK_INTERVAL_S)
    async def close_idle_findings() -> None:
        await publish_findings(await asyncio.to_thread(pipeline.close_idle))

    @app.task
    async def follow_model_deployments() -> None:
        await switcher.follow()

    @app.agent(frames)
    async def detect(stream) -> None:  # noqa: ANN001 - faust stream
        await process_batches_with_dead_letter(
            stream,
            service=SERVICE,
            dead_letter=dead_letter,
            handle_batch=handle_batch,
            max_records=settings.detection_batch_size,
            within_s=settings.detection_batch_wait_ms / 1000.0,
        )

    return app
