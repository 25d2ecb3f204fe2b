"""Aggregation of per-frame detections into one finding per polyp.

Flagged frames of a procedure whose regions overlap, or whose centres stay
close, belong to the same polyp. A track starts on a flagged frame as a
candidate. It opens (the tracker emits an ``open`` finding) once it has
``min_frames_to_open`` flagged frames within ``confirm_window_s`` of capture
time, so that a single stray flagged frame does not become a finding. At a
low frame rate the window stretches to ``min_frames_to_open`` consecutive
frames. A track closes when no flagged frame has joined it for ``max_gap_s`` of capture
time, so a polyp the detector misses for a few frames stays one finding. It
also closes after ``idle_close_s`` seconds of wall-clock time without a new
flagged frame, because the end of a stream sends no further frame to close it.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

from crc_medai.settings import Settings
from schemas.messages import DetectionResult, PolypFinding, Region

logger = logging.getLogger(__name__)

#: Namespace of the uuid5 finding ids: the same frames always yield the same finding id.
FINDING_NAMESPACE = uuid.UUID("2d0f7f3e-1c55-4a7e-9a57-8e4f2b6c9d31")


def _centre(region: Region) -> tuple[float, float]:
    return region.x + region.width / 2.0, region.y + region.height / 2.0


def box_region(box: tuple[int, int, int, int] | None) -> Region | None:
    """Return the model's (x, y, width, height) box as a message region, at least one pixel wide and high."""
    if box is None:
        return None
    x, y, width, height = box
    return Region(x=x, y=y, width=max(width, 1), height=max(height, 1))


def region_iou(first: Region, second: Region) -> float:
    """Return the intersection over union of two boxes."""
    overlap_width = min(first.x + first.width, second.x + second.width) - max(first.x, second.x)
    overlap_height = min(first.y + first.height, second.y + second.height) - max(first.y, second.y)
    if overlap_width <= 0 or overlap_height <= 0:
        return 0.0
    intersection = overlap_width * overlap_height
    union = first.width * first.height + second.width * second.height - intersection
    return intersection / union


def regions_match(previous: Region | None, current: Region | None, tolerance: float, min_iou: float = 0.1) -> bool:
    """Tell whether two regions plausibly show the same polyp.

    They match when their intersection over union is at least ``min_iou``, or
    when their centres lie within ``tolerance`` times the larger box side of
    each other (the camera moves the polyp across the view between frames). A
    missing region matches, because the presence head can flag a frame whose
    mask is empty.
    """
    if previous is None or current is None:
        return True
    if region_iou(previous, current) >= min_iou:
        return True
    (x0, y0), (x1, y1) = _centre(previous), _centre(current)
    reach = tolerance * max(previous.width, previous.height, current.width, current.height)
    return (x1 - x0) ** 2 + (y1 - y0) ** 2 <= reach**2


@dataclass
class _Track:
    first: DetectionResult
    last: DetectionResult
    peak: DetectionResult
    last_region: Region | None
    frames_flagged: int = 1
    opened: bool = False
    updated_monotonic: float = field(default_factory=time.monotonic)

    @property
    def finding_id(self) -> uuid.UUID:
        return uuid.uuid5(FINDING_NAMESPACE, f"{self.first.procedure_id}:{self.first.sequence}")

    def add(self, result: DetectionResult) -> None:
        self.last = result
        self.last_region = result.region or self.last_region
        self.frames_flagged += 1
        self.updated_monotonic = time.monotonic()
        if result.polyp_probability > self.peak.polyp_probability:
            self.peak = result

    def seconds_since(self, result: DetectionResult, start: DetectionResult) -> float:
        return (result.captured_at - start.captured_at).total_seconds()

    def finding(self, status: str) -> PolypFinding:
        return PolypFinding(
            finding_id=self.finding_id,
            procedure_id=self.first.procedure_id,
            patient_id=self.first.patient_id,
            status=status,
            first_sequence=self.first.sequence,
            last_sequence=self.last.sequence,
            first_seen=self.first.captured_at,
            last_seen=self.last.captured_at,
            frames_flagged=self.frames_flagged,
            peak_probability=self.peak.polyp_probability,
            representative_sequence=self.peak.sequence,
            region=self.peak.region,
            heatmap_key=self.peak.heatmap_key,
            heatmap_bucket=self.peak.heatmap_bucket,
            explanation_method=self.peak.explanation_method,
            model=self.peak.model,
        )


class FindingTracker:
    """Turns the detection results of each procedure into open and closed findings.

    Args:
        max_gap_s: capture-time seconds without a flagged frame that one finding tolerates (detector misses).
        min_frames_to_open: flagged frames a track needs before it opens as a finding; 1 opens on the first.
        confirm_window_s: capture-time seconds from a track's first flagged frame in which it must reach
            ``min_frames_to_open``, or ``min_frames_to_open`` consecutive frames when those take longer.
            A candidate that does not is dropped as a stray detection.
        idle_close_s: wall-clock seconds after which a track with no new flagged frame closes.
        region_tolerance: how far apart, in box sides, the centres of two regions of one polyp may lie.
        min_iou: intersection over union at which two regions count as one polyp whatever their centres.
    """

    def __init__(
        self,
        *,
        max_gap_s: float = 1.0,
        min_frames_to_open: int = 2,
        confirm_window_s: float = 0.2,
        idle_close_s: float = 2.0,
        region_tolerance: float = 1.0,
        min_iou: float = 0.1,
    ) -> None:
        if min_frames_to_open < 1:
            raise ValueError(f"min_frames_to_open={min_frames_to_open} is invalid; use 1 or more")
        self.max_gap_s = max_gap_s
        self.min_frames_to_open = min_frames_to_open
        self.confirm_window_s = confirm_window_s
        self.idle_close_s = idle_close_s
        self.region_tolerance = region_tolerance
        self.min_iou = min_iou
        self.candidates_dropped = 0
        self._tracks: dict[str, list[_Track]] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> FindingTracker:
        """Build the tracker that the detection worker runs with these settings."""
        return cls(
            max_gap_s=settings.detection_track_max_gap_s,
            min_frames_to_open=settings.detection_track_min_frames,
            confirm_window_s=settings.detection_track_confirm_window_s,
            idle_close_s=settings.detection_track_idle_close_s,
        )

    def update(self, result: DetectionResult) -> list[PolypFinding]:
        """Add one detection result; return the findings it opens or closes."""
        tracks = self._tracks.setdefault(result.procedure_id, [])
        events = self._end_tracks(tracks, result)

        if result.flagged:
            track = self._match(tracks, result)
            if track is None:
                track = _Track(first=result, last=result, peak=result, last_region=result.region)
                tracks.append(track)
            else:
                track.add(result)
            if not track.opened and track.frames_flagged >= self.min_frames_to_open:
                track.opened = True
                events.append(track.finding("open"))
        return events

    def close_idle(self, now: float | None = None) -> list[PolypFinding]:
        """Close the tracks that no flagged frame joined for ``idle_close_s`` seconds."""
        now = time.monotonic() if now is None else now
        events = []
        for tracks in self._tracks.values():
            remaining = []
            for track in tracks:
                if now - track.updated_monotonic < self.idle_close_s:
                    remaining.append(track)
                elif track.opened:
                    events.append(track.finding("closed"))
                else:
                    self._drop_candidate(track)
            tracks[:] = remaining
        return events

    def confirms(self, result: DetectionResult) -> bool:
        """Tell whether ``result``, already passed to ``update``, joined or opened a finding, not a candidate."""
        tracks = self._tracks.get(result.procedure_id, [])
        return any(track.opened and track.last.sequence == result.sequence for track in tracks)

    def open_findings(self) -> int:
        """Return the number of findings open now, candidates not counted."""
        return sum(track.opened for tracks in self._tracks.values() for track in tracks)

    def representative_frames(self) -> set[tuple[str, int]]:
        """Return (procedure id, sequence) of the peak frame of every track and candidate."""
        return {(track.peak.procedure_id, track.peak.sequence) for tracks in self._tracks.values() for track in tracks}

    def attach_heatmap(self, procedure_id: str, sequence: int, **heatmap: str) -> None:
        """Set the heatmap fields (``heatmap_key``, ``heatmap_bucket``, ``explanation_method``) of a peak frame."""
        for track in self._tracks.get(procedure_id, []):
            if track.peak.sequence == sequence:
                track.peak = track.peak.model_copy(update=heatmap)

    def _end_tracks(self, tracks: list[_Track], result: DetectionResult) -> list[PolypFinding]:
        """Close the tracks whose gap ran out and drop the candidates whose confirmation window did."""
        events = []
        remaining = []
        for track in tracks:
            if track.opened:
                if track.seconds_since(result, track.last) > self.max_gap_s:
                    events.append(track.finding("closed"))
                    continue
            elif self._confirmation_expired(track, result):
                self._drop_candidate(track)
                continue
            remaining.append(track)
        tracks[:] = remaining
        return events

    def _confirmation_expired(self, track: _Track, result: DetectionResult) -> bool:
        """Tell whether a candidate ran out of time to reach ``min_frames_to_open``.

        A candidate always gets ``min_frames_to_open`` consecutive frames, even
        when they span more than ``confirm_window_s``. Otherwise a stream below
        ``(min_frames_to_open - 1) / confirm_window_s`` fps could never open a finding.
        """
        frames_since_first = result.sequence - track.first.sequence
        return (
            track.seconds_since(result, track.first) > self.confirm_window_s
            and frames_since_first >= self.min_frames_to_open
        )

    def _drop_candidate(self, track: _Track) -> None:
        self.candidates_dropped += 1
        logger.debug(
            "candidate dropped sequence=%d frames_flagged=%d (fewer than %d within %.2f s)",
            track.first.sequence,
            track.frames_flagged,
            self.min_frames_to_open,
            self.confirm_window_s,
        )

    def _match(self, tracks: list[_Track], result: DetectionResult) -> _Track | None:
        candidates = [
            track
            for track in tracks
            if regions_match(track.last_region, result.region, self.region_tolerance, self.min_iou)
        ]
        return max(candidates, key=lambda track: (track.opened, track.last.sequence), default=None)
