"""Real-time frame processing: micro-batches, the stale-frame policy and the Grad-CAM budget.

A micro-batch of ``frames`` records goes through two steps, so that a polyp
finding reaches downstream systems without waiting for Grad-CAM:

``DetectionPipeline.detect_batch``
    1. Each record is parsed and its JPEG decoded on its own, so one bad record
       is rejected alone.
    2. A frame whose capture timestamp is older than the latency budget is not
       run through the model. It gets a result with ``skipped_reason="stale"``
       and counts in ``crc_frames_skipped{reason="stale"}``, so the detector
       catches up instead of letting its lag grow. Each batch with stale frames
       logs a WARNING per procedure, and every finding event carries the number of
       the procedure's frames skipped so far (``stale_frames_skipped``), so the
       gap in coverage reaches the DiagnosticReport.
    3. The other frames go through the model in one forward pass.
    4. The finding tracker takes each result in record order. The ``open``
       events it emits are ready to publish at once, without a heatmap.

``DetectionPipeline.explain_batch``
    5. A flagged frame of a finding gets a Grad-CAM heatmap only while its
       procedure is within ``heatmaps_per_s`` (counted on capture time). A
       flagged frame of a candidate that no finding confirms yet gets none,
       because it may be a stray flag that never reaches a clinician, and its
       heatmap would delay the frames behind it, among them the frame that
       confirms a finding. The representative (peak) frame of every
       finding event always gets a heatmap, from a copy of that frame kept
       while it is a track's peak. A new finding's heatmap counts against the
       rate, so the frame that opens it gets no second heatmap.
    6. Each ``open`` event is repeated, still ``open``, with its heatmap; other
       events wait for their heatmap.

The pipeline blocks; the Faust agent runs it in a worker thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import cv2
import numpy as np
import torch

from crc_medai import metrics
from crc_medai.errors import ProcessingError
from crc_medai.logs import pseudonym
from crc_medai.settings import Settings
from crc_medai.storage import create_minio, ensure_bucket, put_png
from processors.detection.explain import GradCamExplainer
from processors.detection.model import PolypDetector, Prediction
from processors.detection.tracking import FindingTracker, box_region
from schemas.messages import DetectionResult, Frame, ModelRef, PolypFinding, utc_now

logger = logging.getLogger(__name__)

#: One outcome per record of a batch: its detection result, or the error that rejects it.
Outcome = DetectionResult | BaseException


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


def select_device(requested: str) -> str:
    """Return the torch device for ``requested``: ``auto`` is CUDA when a GPU is present, else the CPU.

    Raises:
        ProcessingError: CUDA was requested but torch finds no CUDA device.
    """
    # NOTE: only the CPU path has been run; no test machine of this project has had a CUDA device.
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ProcessingError(
            f"detection_device={requested} but torch finds no CUDA device; set CRC_DETECTION_DEVICE=cpu or auto"
        )
    return requested


def configure_torch_threads(requested: int) -> int:
    """Set torch's intra-op threads to ``requested``, or to half the cores this process may use when 0.

    Half, because the worker's Kafka client, JPEG decoding and often the broker
    share the cores, and torch's OpenMP threads degrade badly when they have to
    wait for a core. On a 2-core machine with other jobs running, one frame took
    21-36 ms with one thread and 140-580 ms with two (``PolypDetector.predict``,
    256 x 256 frames, torch 2.15 CPU build).
    """
    threads = requested or max(1, len(os.sched_getaffinity(0)) // 2)
    torch.set_num_threads(threads)
    return threads


class HeatmapRateLimiter:
    """Allows at most ``rate_per_s`` heatmaps per second of capture time for each procedure.

    Capture time rather than wall-clock time is used, so a detector that
    catches up after a pause explains the same frames as one that never fell
    behind. A rate of 0 allows none.
    """

    def __init__(self, rate_per_s: float) -> None:
        self.interval_s = 1.0 / rate_per_s if rate_per_s > 0 else None
        self._last: dict[str, datetime] = {}

    def allows(self, procedure_id: str, captured_at: datetime) -> bool:
        """Tell whether a heatmap of a frame captured at ``captured_at`` fits the procedure's rate."""
        if self.interval_s is None:
            return False
        last = self._last.get(procedure_id)
        return last is None or (captured_at - last).total_seconds() >= self.interval_s

    def record(self, procedure_id: str, captured_at: datetime) -> None:
        """Count a heatmap made for a frame captured at ``captured_at``."""
        last = self._last.get(procedure_id)
        if last is None or captured_at > last:
            self._last[procedure_id] = captured_at


@dataclass(frozen=True)
class _KeptFrame:
    frame: Frame
    image: np.ndarray


#: A frame's identity within the pipeline: (procedure id, sequence).
FrameId = tuple[str, int]


@dataclass
class BatchOutput:
    """Detection results and finding events of one micro-batch."""

    outcomes: list[Outcome]
    """One per record, in record order."""
    findings: list[PolypFinding] = field(default_factory=list)
    """Finding events, in the order they are to be published."""


@dataclass
class DetectedBatch:
    """A micro-batch after the model and the finding tracker, before its Grad-CAM heatmaps."""

    outcomes: list[Outcome] = field(default_factory=list)
    """One per record, in record order. No result references a heatmap yet."""
    findings: list[PolypFinding] = field(default_factory=list)
    """The tracker's events, in the order it emitted them."""
    flagged_frames: dict[FrameId, _KeptFrame] = field(default_factory=dict)
    """The batch's flagged frames, kept for their heatmaps."""
    within_rate: list[FrameId] = field(default_factory=list)
    """The flagged frames of findings that the heatmap rate allows."""

    @property
    def confirmed(self) -> list[PolypFinding]:
        """The ``open`` events, to publish before the batch's heatmaps are computed."""
        return [finding for finding in self.findings if finding.status == "open"]


class DetectionPipeline:
    """Runs detection, the stale-frame policy, Grad-CAM and the finding tracker on micro-batches.

    ``process_batch`` and ``close_idle`` may be called from different threads;
    a lock serialises them.
    """

    def __init__(self, settings: Settings, detector: PolypDetector | None = None) -> None:
        self.settings = settings
        self.detector = detector or PolypDetector.load(
            settings.detection_model_path, device=select_device(settings.detection_device)
        )
        self.explainer = GradCamExplainer(self.detector)
        self.minio = create_minio(settings)
        ensure_bucket(self.minio, settings.heatmap_bucket)
        self.model_ref = ModelRef(name=self.detector.name, version=self.detector.version)
        self.tracker = FindingTracker.from_settings(settings)
        self.limiter = HeatmapRateLimiter(settings.detection_heatmaps_per_s)
        self._kept: dict[tuple[str, int], _KeptFrame] = {}
        # NOTE: counted in this worker's memory, so frames skipped by a previous
        # run of the worker, or by another worker before a rebalance, are not included.
        self.stale_skipped: dict[str, int] = {}
        """Frames skipped as stale so far, per procedure id."""
        self._lock = threading.Lock()

    def close(self) -> None:
        """Release the Grad-CAM hooks."""
        self.explainer.close()

    def use_detector(self, detector: PolypDetector, model_ref: ModelRef) -> None:
        """Run the next batches with ``detector``, named ``model_ref`` in results; the batch in flight finishes first.

        Open findings and kept frames stay, so a polyp seen by both versions remains one finding.
        """
        with self._lock:
            self.explainer.close()
            self.detector = detector
            self.explainer = GradCamExplainer(detector)
            self.model_ref = model_ref

    def process_batch(self, values: list[bytes | None]) -> BatchOutput:
        """Run both steps on the record values of one micro-batch, with the findings in publishing order."""
        detected = self.detect_batch(values)
        output = self.explain_batch(detected)
        return BatchOutput(outcomes=output.outcomes, findings=detected.confirmed + output.findings)

    def detect_batch(self, values: list[bytes | None]) -> DetectedBatch:
        """Decode the records, skip stale frames, run the model and the tracker (module docstring, steps 1-4)."""
        with self._lock:
            outcomes: list[Outcome | tuple[Frame, np.ndarray]] = [self._decode(value) for value in values]
            self._skip_stale(outcomes)
            self._predict(outcomes)
            batch = DetectedBatch()
            for outcome in outcomes:
                if isinstance(outcome, tuple):
                    outcome = self._detect_result(batch, *outcome)
                batch.outcomes.append(outcome)
                if isinstance(outcome, DetectionResult):
                    events = self.tracker.update(outcome)
                    batch.findings += [self._stamp_stale(event) for event in events]
                    if outcome.flagged:
                        self._budget_heatmap(batch, outcome, events)
            # Any flagged frame of the batch may be the peak of a track from now on.
            self._kept.update(batch.flagged_frames)
            self._forget_frames()
            return batch

    def explain_batch(self, batch: DetectedBatch) -> BatchOutput:
        """Compute the batch's heatmaps and return its results and the finding events still to publish.

        Those are the ``open`` events of ``batch.confirmed`` again, now with
        their heatmap, and every other event. A frame whose heatmap fails is
        rejected alone. A finding whose heatmap fails is published without one,
        and its ``open`` event is not repeated.
        """
        with self._lock:
            explained: dict[FrameId, dict[str, str] | Exception] = {}
            for identity in batch.within_rate:
                explained[identity] = self._try_explain(batch.flagged_frames[identity])
            findings = []
            for finding in batch.findings:
                with_heatmap = self._explain_finding(finding, batch.flagged_frames, explained)
                if finding.status == "open" and with_heatmap.heatmap_key is None:
                    continue
                findings.append(with_heatmap)
            outcomes: list[Outcome] = []
            for outcome in batch.outcomes:
                if isinstance(outcome, DetectionResult):
                    # A frame explained for a finding carries its heatmap in its own result too.
                    heatmap = explained.get((outcome.procedure_id, outcome.sequence))
                    if isinstance(heatmap, Exception):
                        outcome = heatmap
                    elif heatmap is not None:
                        outcome = outcome.model_copy(update=heatmap)
                outcomes.append(outcome)
            return BatchOutput(outcomes=outcomes, findings=findings)

    def close_idle(self) -> list[PolypFinding]:
        """Close the findings that no flagged frame joined for a while; see ``FindingTracker.close_idle``."""
        with self._lock:
            events = [self._stamp_stale(self._explain_finding(event, {}, {})) for event in self.tracker.close_idle()]
            self._forget_frames()
            return events

    def _decode(self, value: bytes | None) -> Outcome | tuple[Frame, np.ndarray]:
        try:
            frame = Frame.from_bytes(value)
            return frame, decode_frame(frame)
        except Exception as exc:  # noqa: BLE001 - the error becomes this record's outcome and is dead-lettered
            return exc

    def _skip_stale(self, outcomes: list) -> None:
        """Replace each decoded frame older than the latency budget by its skipped result; a budget of 0 skips none."""
        if self.settings.detection_latency_budget_ms == 0:
            return
        now = utc_now()
        budget_s = self.settings.detection_latency_budget_ms / 1000.0
        oldest_age_s: dict[str, float] = {}
        skipped: dict[str, int] = {}
        for index, outcome in enumerate(outcomes):
            if not isinstance(outcome, tuple):
                continue
            frame = outcome[0]
            age_s = (now - frame.captured_at).total_seconds()
            if age_s > budget_s:
                outcomes[index] = self._skipped_result(frame, "stale")
                metrics.record_frame_skipped("stale")
                skipped[frame.procedure_id] = skipped.get(frame.procedure_id, 0) + 1
                oldest_age_s[frame.procedure_id] = max(age_s, oldest_age_s.get(frame.procedure_id, 0.0))
        for procedure_id, count in skipped.items():
            self._warn_stale(procedure_id, count, oldest_age_s[procedure_id])

    def _warn_stale(self, procedure_id: str, count: int, oldest_age_s: float) -> None:
        """Count a batch's stale frames of one procedure and log them, because those frames were never examined."""
        total = self.stale_skipped.get(procedure_id, 0) + count
        self.stale_skipped[procedure_id] = total
        logger.warning(
            "frames skipped as stale, not examined by the detector count=%d procedure=%s oldest_age_ms=%.0f "
            "latency_budget_ms=%s procedure_total=%d",
            count,
            pseudonym(procedure_id),
            oldest_age_s * 1000.0,
            self.settings.detection_latency_budget_ms,
            total,
        )

    def _predict(self, outcomes: list) -> None:
        """Run the model once on every frame still pending and replace each by its (frame, image, prediction)."""
        pending = [index for index, outcome in enumerate(outcomes) if isinstance(outcome, tuple)]
        if not pending:
            return
        started = time.perf_counter()
        try:
            predictions = self.detector.predict([outcomes[index][1] for index in pending])
        except Exception as exc:  # noqa: BLE001 - every frame of the failed pass is dead-lettered with the error
            for index in pending:
                outcomes[index] = exc
            return
        # NOTE: inference_ms is the batch's forward time shared evenly among its frames.
        per_frame_ms = (time.perf_counter() - started) * 1000.0 / len(pending)
        for index, prediction in zip(pending, predictions, strict=True):
            frame, image = outcomes[index]
            outcomes[index] = (frame, image, prediction, per_frame_ms)

    def _detect_result(
        self, batch: DetectedBatch, frame: Frame, image: np.ndarray, prediction: Prediction, inference_ms: float
    ) -> DetectionResult:
        flagged = prediction.probability >= self.settings.detection_threshold
        if flagged:
            batch.flagged_frames[frame.procedure_id, frame.sequence] = _KeptFrame(frame, image)
        return self._result(
            frame,
            polyp_probability=float(prediction.probability),
            flagged=flagged,
            region=box_region(prediction.region) if flagged else None,
            inference_ms=inference_ms,
        )

    def _budget_heatmap(self, batch: DetectedBatch, result: DetectionResult, events: list[PolypFinding]) -> None:
        """Queue a flagged frame's heatmap when a finding confirms the frame and the procedure's rate allows it.

        ``events`` are the tracker's events for this frame. A finding that it
        opens gets its heatmap in ``explain_batch``, and that heatmap uses the
        rate's next slot.
        """
        opened = [event for event in events if event.status == "open"]
        if opened:
            self.limiter.record(result.procedure_id, result.captured_at)
        if any(event.representative_sequence == result.sequence for event in opened):
            # The finding's heatmap is this frame's own, counted as computed when it is made.
            return
        if not self.tracker.confirms(result):
            metrics.record_heatmap("unconfirmed")
        elif self.limiter.allows(result.procedure_id, result.captured_at):
            self.limiter.record(result.procedure_id, result.captured_at)
            batch.within_rate.append((result.procedure_id, result.sequence))
        else:
            metrics.record_heatmap("rate_limited")

    def _skipped_result(self, frame: Frame, reason: str) -> DetectionResult:
        return self._result(frame, polyp_probability=0.0, flagged=False, inference_ms=0.0, skipped_reason=reason)

    def _result(self, frame: Frame, **outcome: Any) -> DetectionResult:
        """Build the result of ``frame``; ``outcome`` contains the model's decision or the reason it was skipped."""
        return DetectionResult(
            frame_event_id=frame.event_id,
            procedure_id=frame.procedure_id,
            patient_id=frame.patient_id,
            sequence=frame.sequence,
            captured_at=frame.captured_at,
            source_ts=utc_now(),
            model=self.model_ref,
            **outcome,
        )

    def _explain(self, frame: Frame, image: np.ndarray) -> dict[str, str]:
        """Compute, store and count one Grad-CAM overlay; return the result fields that reference it."""
        started = time.perf_counter()
        explanation = self.explainer.explain(image)
        key = heatmap_key(frame)
        put_png(self.minio, self.settings.heatmap_bucket, key, explanation.overlay_png)
        metrics.HEATMAP_SECONDS.observe(time.perf_counter() - started)
        metrics.record_heatmap("computed")
        heatmap = {
            "heatmap_key": key,
            "heatmap_bucket": self.settings.heatmap_bucket,
            "explanation_method": explanation.method,
        }
        # Later events of a track whose peak this frame is carry the heatmap.
        self.tracker.attach_heatmap(frame.procedure_id, frame.sequence, **heatmap)
        return heatmap

    def _try_explain(self, kept_frame: _KeptFrame) -> dict[str, str] | Exception:
        """Return ``_explain``'s fields for a kept frame, or the error that stopped it."""
        try:
            return self._explain(kept_frame.frame, kept_frame.image)
        except Exception as exc:  # noqa: BLE001 - the caller decides what a failed heatmap rejects
            return exc

    def _explain_finding(
        self,
        finding: PolypFinding,
        frames: dict[FrameId, _KeptFrame],
        explained: dict[FrameId, dict[str, str] | Exception],
    ) -> PolypFinding:
        """Give a finding event the heatmap of its representative frame, computing it unless ``explained`` has it.

        The frame is looked up in ``frames`` (the batch's), then among the kept peaks.
        """
        if finding.heatmap_key is not None:
            return finding
        identity = (finding.procedure_id, finding.representative_sequence)
        if identity not in explained:
            kept = frames.get(identity) or self._kept.get(identity)
            if kept is None:
                return finding
            explained[identity] = self._try_explain(kept)
        heatmap = explained[identity]
        if isinstance(heatmap, Exception):
            logger.error(
                "heatmap of a finding's frame failed finding=%s sequence=%d; publishing it without a heatmap",
                finding.finding_id,
                finding.representative_sequence,
                exc_info=heatmap,
            )
            return finding
        return finding.model_copy(update=heatmap)

    def _stamp_stale(self, finding: PolypFinding) -> PolypFinding:
        """Set the number of the procedure's frames skipped as stale so far on a finding event."""
        return finding.model_copy(update={"stale_frames_skipped": self.stale_skipped.get(finding.procedure_id, 0)})

    def _forget_frames(self) -> None:
        """Drop kept frames that are no longer the peak of any track."""
        peak_frames = self.tracker.representative_frames()
        for identity in list(self._kept):
            if identity not in peak_frames:
                del self._kept[identity]
