"""Aggregation of per-frame detections into one finding per polyp.

Consecutive flagged frames of a procedure whose regions stay close belong to
the same polyp. A track opens on its first flagged frame and closes when no
flagged frame has joined it for ``max_gap_frames`` frames, or for
``idle_close_s`` seconds of wall-clock time (the end of a stream sends no
further frame to close it).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from schemas.messages import DetectionResult, PolypFinding, Region

#: Namespace of the uuid5 finding ids: the same frames always yield the same finding id.
FINDING_NAMESPACE = uuid.UUID("2d0f7f3e-1c55-4a7e-9a57-8e4f2b6c9d31")


def _centre(region: Region) -> tuple[float, float]:
    return region.x + region.width / 2.0, region.y + region.height / 2.0


def regions_match(previous: Region | None, current: Region | None, tolerance: float) -> bool:
    """Tell whether two regions plausibly show the same polyp.

    Their centres must lie within ``tolerance`` times the larger box side of
    each other. A missing region matches, because the presence head can flag a
    frame whose mask is empty.
    """
    if previous is None or current is None:
        return True
    (x0, y0), (x1, y1) = _centre(previous), _centre(current)
    reach = tolerance * max(previous.width, previous.height, current.width, current.height)
    return (x1 - x0) ** 2 + (y1 - y0) ** 2 <= reach**2


@dataclass
class _Track:
    first: DetectionResult
    last: DetectionResult
    peak: DetectionResult
    frames_flagged: int = 1
    updated_monotonic: float = field(default_factory=time.monotonic)

    @property
    def finding_id(self) -> uuid.UUID:
        return uuid.uuid5(FINDING_NAMESPACE, f"{self.first.procedure_id}:{self.first.sequence}")

    def add(self, result: DetectionResult) -> None:
        self.last = result
        self.frames_flagged += 1
        self.updated_monotonic = time.monotonic()
        if result.polyp_probability > self.peak.polyp_probability:
            self.peak = result

    def finding(self, status: str) -> PolypFinding:
        return PolypFinding(
            finding_id=self.finding_id,
            procedure_id=self.first.procedure_id,
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
        max_gap_frames: unflagged frames tolerated inside one finding (detector flicker).
        idle_close_s: wall-clock seconds after which a track with no new flagged frame closes.
        region_tolerance: how far apart, in box sides, two regions of one polyp may lie.
    """

    def __init__(self, *, max_gap_frames: int = 8, idle_close_s: float = 2.0, region_tolerance: float = 1.0) -> None:
        self.max_gap_frames = max_gap_frames
        self.idle_close_s = idle_close_s
        self.region_tolerance = region_tolerance
        self._tracks: dict[str, list[_Track]] = {}

    def update(self, result: DetectionResult) -> list[PolypFinding]:
        """Add one detection result; return the findings it opens or closes."""
        tracks = self._tracks.setdefault(result.procedure_id, [])
        ended = [track for track in tracks if result.sequence - track.last.sequence > self.max_gap_frames]
        events = [track.finding("closed") for track in ended]
        tracks[:] = [track for track in tracks if result.sequence - track.last.sequence <= self.max_gap_frames]

        if result.flagged:
            track = self._match(tracks, result)
            if track is None:
                track = _Track(first=result, last=result, peak=result)
                tracks.append(track)
                events.append(track.finding("open"))
            else:
                track.add(result)
        return events

    def close_idle(self, now: float | None = None) -> list[PolypFinding]:
        """Close the tracks that no flagged frame joined for ``idle_close_s`` seconds."""
        now = time.monotonic() if now is None else now
        events = []
        for tracks in self._tracks.values():
            kept = []
            for track in tracks:
                if now - track.updated_monotonic >= self.idle_close_s:
                    events.append(track.finding("closed"))
                else:
                    kept.append(track)
            tracks[:] = kept
        return events

    def open_findings(self) -> int:
        """Return the number of findings still open."""
        return sum(len(tracks) for tracks in self._tracks.values())

    def _match(self, tracks: list[_Track], result: DetectionResult) -> _Track | None:
        candidates = [
            track for track in tracks if regions_match(track.last.region, result.region, self.region_tolerance)
        ]
        return max(candidates, key=lambda track: track.last.sequence, default=None)
