"""Finding tracker: one finding per polyp across consecutive flagged frames."""

from __future__ import annotations

import uuid
from datetime import timedelta

from processors.detection.tracking import FindingTracker, regions_match
from schemas.messages import DetectionResult, ModelRef, Region, utc_now

START = utc_now()


def result(
    sequence: int, probability: float, region: Region | None = None, procedure: str = "proc-1"
) -> DetectionResult:
    flagged = probability >= 0.5
    return DetectionResult(
        frame_event_id=uuid.uuid4(),
        procedure_id=procedure,
        sequence=sequence,
        captured_at=START + timedelta(milliseconds=33 * sequence),
        polyp_probability=probability,
        flagged=flagged,
        region=region if flagged else None,
        heatmap_key=f"heatmaps/{procedure}/{sequence:06d}.png" if flagged else None,
        heatmap_bucket="bucket" if flagged else None,
        model=ModelRef(name="m", version="1"),
        inference_ms=1.0,
    )


BOX = Region(x=100, y=100, width=40, height=40)
FAR_BOX = Region(x=10, y=10, width=20, height=20)


def feed(tracker: FindingTracker, results: list[DetectionResult]) -> list:
    events = []
    for item in results:
        events += tracker.update(item)
    return events


def test_one_polyp_gives_one_finding() -> None:
    tracker = FindingTracker(max_gap_frames=3)
    frames = (
        [result(0, 0.1)]
        + [result(i, 0.6 + i / 100, BOX) for i in range(1, 11)]
        + [result(i, 0.1) for i in range(11, 16)]
    )

    events = feed(tracker, frames)

    assert [event.status for event in events] == ["open", "closed"]
    assert events[0].finding_id == events[1].finding_id
    closed = events[1]
    assert (closed.first_sequence, closed.last_sequence) == (1, 10)
    assert closed.frames_flagged == 10
    assert closed.representative_sequence == 10
    assert closed.peak_probability == 0.7
    assert closed.heatmap_key == "heatmaps/proc-1/000010.png"
    assert closed.first_seen < closed.last_seen


def test_flicker_inside_gap_keeps_one_finding() -> None:
    tracker = FindingTracker(max_gap_frames=3)
    frames = [result(0, 0.9, BOX), result(1, 0.2), result(2, 0.2), result(3, 0.9, BOX)] + [
        result(i, 0.1) for i in range(4, 9)
    ]

    events = feed(tracker, frames)

    assert [event.status for event in events] == ["open", "closed"]
    assert events[1].frames_flagged == 2


def test_gap_longer_than_limit_splits_findings() -> None:
    tracker = FindingTracker(max_gap_frames=2)
    frames = [result(0, 0.9, BOX)] + [result(i, 0.1) for i in range(1, 5)] + [result(5, 0.9, BOX)]

    events = feed(tracker, frames)

    assert [event.status for event in events] == ["open", "closed", "open"]
    assert events[0].finding_id != events[2].finding_id


def test_distant_regions_are_two_polyps() -> None:
    tracker = FindingTracker(max_gap_frames=3)

    events = feed(tracker, [result(0, 0.9, BOX), result(1, 0.9, FAR_BOX), result(2, 0.9, BOX)])

    assert [event.status for event in events] == ["open", "open"]
    assert tracker.open_findings() == 2


def test_procedures_are_tracked_apart() -> None:
    tracker = FindingTracker()

    events = feed(tracker, [result(0, 0.9, BOX, "proc-a"), result(0, 0.9, BOX, "proc-b")])

    assert {event.procedure_id for event in events} == {"proc-a", "proc-b"}


def test_idle_track_closes_at_end_of_stream() -> None:
    tracker = FindingTracker(idle_close_s=2.0)
    feed(tracker, [result(0, 0.9, BOX), result(1, 0.9, BOX)])

    assert tracker.close_idle(now=0.0) == []
    closed = tracker.close_idle(now=float("inf"))

    assert [event.status for event in closed] == ["closed"]
    assert tracker.open_findings() == 0


def test_replay_gives_same_finding_id() -> None:
    frames = [result(3, 0.9, BOX), result(4, 0.1)]

    first = feed(FindingTracker(), frames)
    second = feed(FindingTracker(), frames)

    assert first[0].finding_id == second[0].finding_id


def test_missing_region_matches_any_track() -> None:
    assert regions_match(None, BOX, 1.0)
    assert regions_match(BOX, None, 1.0)
    assert regions_match(BOX, Region(x=120, y=110, width=40, height=40), 1.0)
    assert not regions_match(BOX, FAR_BOX, 1.0)
