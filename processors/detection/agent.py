"""Detection processor: frames in, polyp detection results and Grad-CAM heatmaps out.

Consumes ``frames`` (key: procedure id), runs the polyp detector on each
frame, computes a Grad-CAM overlay for flagged frames, stores it in MinIO and
publishes a :class:`DetectionResult` on ``detections`` with the same key.
Flagged frames of one polyp are aggregated into a :class:`PolypFinding` on
``findings``, published when the polyp appears and again when it is gone.
"""

from __future__ import annotations

import asyncio
import logging
import time

import cv2
import numpy as np

from crc_medai import metrics
from crc_medai.errors import ProcessingError
from crc_medai.settings import Settings
from crc_medai.storage import create_minio, ensure_bucket, put_png
from processors.app import create_app, process_with_dead_letter, raw_topic
from processors.detection.explain import GradCamExplainer
from processors.detection.model import PolypDetector
from processors.detection.tracking import FindingTracker
from schemas.messages import DetectionResult, Frame, ModelRef, PolypFinding, Region, utc_now

logger = logging.getLogger(__name__)

SERVICE = "detection"


class FrameDecodeError(ProcessingError):
    """A frame's image bytes are not a decodable colour JPEG of the announced size."""


def decode_frame(frame: Frame) -> np.ndarray:
    """Decode the frame's JPEG into a BGR image and check it against the announced size."""
    if not frame.image:
        raise FrameDecodeError(
            f"frame {frame.sequence} of procedure {frame.procedure_id}: image is empty (0 bytes); "
            "the capture agent must send a JPEG"
        )
    buffer = np.frombuffer(frame.image, dtype=np.uint8)
    image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise FrameDecodeError(
            f"frame {frame.sequence} of procedure {frame.procedure_id}: {len(frame.image)} bytes "
            "are not a decodable JPEG; check the capture agent's encoder"
        )
    if image.ndim != 3 or image.shape[2] != 3:
        channels = 1 if image.ndim == 2 else image.shape[2]
        raise FrameDecodeError(
            f"frame {frame.sequence} of procedure {frame.procedure_id}: image has {channels} channel(s), "
            "expected 3 (colour BGR)"
        )
    height, width = image.shape[:2]
    if (width, height) != (frame.width, frame.height):
        raise FrameDecodeError(
            f"frame {frame.sequence} of procedure {frame.procedure_id}: image is {width}x{height}, "
            f"but the message announces {frame.width}x{frame.height}"
        )
    return image


def heatmap_key(frame: Frame) -> str:
    """Return the MinIO object key of a frame's Grad-CAM overlay."""
    return f"heatmaps/{frame.procedure_id}/{frame.sequence:06d}-{frame.event_id}.png"


class FrameDetector:
    """Runs detection and explanation for one frame; blocking, meant for a worker thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.detector = PolypDetector.load(settings.detection_model_path)
        self.explainer = GradCamExplainer(self.detector)
        self.minio = create_minio(settings)
        ensure_bucket(self.minio, settings.heatmap_bucket)
        self.model_ref = ModelRef(name=self.detector.name, version=self.detector.version)

    def close(self) -> None:
        """Release the Grad-CAM hooks."""
        self.explainer.close()

    def process(self, frame: Frame) -> DetectionResult:
        """Detect polyps in one frame; explain and store the heatmap when flagged."""
        image = decode_frame(frame)

        started = time.perf_counter()
        prediction = self.detector.predict([image])[0]
        inference_ms = (time.perf_counter() - started) * 1000.0
        flagged = prediction.probability >= self.settings.detection_threshold

        region = None
        key = None
        method = None
        if flagged:
            if prediction.region is not None:
                x, y, width, height = prediction.region
                region = Region(x=x, y=y, width=max(width, 1), height=max(height, 1))
            heatmap_started = time.perf_counter()
            explanation = self.explainer.explain(image)
            key = heatmap_key(frame)
            put_png(self.minio, self.settings.heatmap_bucket, key, explanation.overlay_png)
            metrics.HEATMAP_SECONDS.observe(time.perf_counter() - heatmap_started)
            method = explanation.method

        return DetectionResult(
            frame_event_id=frame.event_id,
            procedure_id=frame.procedure_id,
            sequence=frame.sequence,
            captured_at=frame.captured_at,
            source_ts=utc_now(),
            polyp_probability=float(prediction.probability),
            flagged=flagged,
            region=region,
            heatmap_key=key,
            heatmap_bucket=self.settings.heatmap_bucket if key else None,
            explanation_method=method,
            model=self.model_ref,
            inference_ms=inference_ms,
        )


def build_app(settings: Settings):  # noqa: ANN201 - returns faust.App
    """Build the detection processor's Faust app and agent."""
    app = create_app(settings, SERVICE)
    frames = raw_topic(app, settings, Frame.topic)
    detections = raw_topic(app, settings, DetectionResult.topic)
    findings = raw_topic(app, settings, PolypFinding.topic)
    dead_letter = raw_topic(app, settings, f"dlq.{SERVICE}")
    detector = FrameDetector(settings)
    metrics.record_model(SERVICE, detector.model_ref.name, detector.model_ref.version)
    # NOTE: open tracks live in this worker's memory. After a rebalance moves a
    # procedure's partition, the new owner starts fresh tracks for that procedure.
    tracker = FindingTracker()
    logger.info(
        "detection processor ready model=%s version=%s threshold=%s bucket=%s",
        detector.model_ref.name,
        detector.model_ref.version,
        settings.detection_threshold,
        settings.heatmap_bucket,
    )

    @app.on_before_shutdown.connect
    async def release_hooks(app_: object, **_: object) -> None:
        detector.close()

    async def publish_findings(events: list[PolypFinding]) -> None:
        for finding in events:
            await findings.send(key=finding.procedure_id.encode(), value=finding.to_bytes())
            logger.info(
                "finding %s procedure=%s frames=%d-%d peak=%.3f",
                finding.status,
                finding.procedure_id,
                finding.first_sequence,
                finding.last_sequence,
                finding.peak_probability,
            )

    async def handle(key: bytes | None, value: bytes | None) -> None:
        frame = Frame.from_bytes(value)
        result = await asyncio.to_thread(detector.process, frame)
        await detections.send(key=frame.procedure_id.encode(), value=result.to_bytes())
        metrics.observe_detection(SERVICE, result.model.name, result.inference_ms, result.flagged, frame.captured_at)
        await publish_findings(tracker.update(result))
        logger.debug(
            "frame processed procedure=%s sequence=%s probability=%.3f",
            frame.procedure_id,
            frame.sequence,
            result.polyp_probability,
        )

    @app.timer(interval=0.5)
    async def close_idle_findings() -> None:
        await publish_findings(tracker.close_idle())

    @app.agent(frames)
    async def detect(stream) -> None:  # noqa: ANN001 - faust stream
        await process_with_dead_letter(stream, service=SERVICE, dead_letter=dead_letter, handle=handle)

    return app
