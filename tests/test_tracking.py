"""Finding tracker: one finding per polyp across consecutive flagged frames."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest
from pydantic import ValidationError

from crc_medai.settings import Settings
from processors.detection.tracking import FindingTracker, region_iou, regions_match
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
    tracker = FindingTracker(max_gap_s=0.1, min_frames_to_open=1)
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


def test_confirms_only_frames_of_findings() -> None:
    tracker = FindingTracker(min_frames_to_open=3)
    frames = [result(0, 0.9, BOX), result(1, 0.9, BOX), result(2, 0.9, BOX), result(3, 0.9, FAR_BOX)]
    confirmed = []
    for item in frames:
        tracker.update(item)
        confirmed.append(tracker.confirms(item))

    # Frames 0 and 1 are a candidate's, frame 2 opens the finding, frame 3 starts a new candidate elsewhere.
    assert confirmed == [False, False, True, False]
    assert tracker.confirms(result(4, 0.9, BOX)) is False
    tracker.update(result(4, 0.9, BOX))
    assert tracker.confirms(result(4, 0.9, BOX)) is True


def test_missed_frames_inside_gap_keep_one_finding() -> None:
    tracker = FindingTracker(max_gap_s=0.5, min_frames_to_open=2)
    # 12 missed frames (0.4 s at 33 ms) between two runs of one polyp that moved a little.
    moved = Region(x=130, y=110, width=40, height=40)
    frames = (
        [result(i, 0.9, BOX) for i in range(0, 4)]
        + [result(i, 0.2) for i in range(4, 16)]
        + [result(i, 0.9, moved) for i in range(16, 20)]
        + [result(i, 0.1) for i in range(20, 40)]
    )

    events = feed(tracker, frames)

    assert [event.status for event in events] == ["open", "closed"]
    assert events[1].frames_flagged == 8
    assert (events[1].first_sequence, events[1].last_sequence) == (0, 19)


def test_gap_longer_than_limit_splits_findings() -> None:
    tracker = FindingTracker(max_gap_s=0.1, min_frames_to_open=1)
    frames = [result(0, 0.9, BOX)] + [result(i, 0.1) for i in range(1, 5)] + [result(5, 0.9, BOX)]

    events = feed(tracker, frames)

    assert [event.status for event in events] == ["open", "closed", "open"]
    assert events[0].finding_id != events[2].finding_id


def test_stray_flag_opens_nothing() -> None:
    tracker = FindingTracker(min_frames_to_open=3, confirm_window_s=0.2)
    # Flagged frames 0, 4 and 8 are 133 ms apart: never 3 within 200 ms.
    frames = [result(i, 0.9 if i % 4 == 0 else 0.1, BOX) for i in range(0, 30)]

    events = feed(tracker, frames)

    assert events == []
    assert tracker.candidates_dropped >= 2
    assert tracker.open_findings() == 0


def test_opens_on_confirming_frame() -> None:
    tracker = FindingTracker(min_frames_to_open=3, confirm_window_s=0.2)

    events = [feed(tracker, [result(i, 0.6 + i / 10, BOX)]) for i in range(4)]

    assert [len(step) for step in events] == [0, 0, 1, 0]
    opened = events[2][0]
    assert opened.status == "open"
    assert opened.first_sequence == 0
    assert opened.last_sequence == 2
    assert opened.frames_flagged == 3


@pytest.mark.parametrize("fps", [5.0, 2.0])
def test_low_frame_rate_still_opens(fps: float) -> None:
    # At 5 fps, 3 frames span 400 ms, more than the 200 ms confirm window.
    tracker = FindingTracker(min_frames_to_open=3, confirm_window_s=0.2)
    frames = [
        result(i, 0.9, BOX).model_copy(update={"captured_at": START + timedelta(seconds=i / fps)}) for i in range(4)
    ]

    events = feed(tracker, frames)

    assert [event.status for event in events] == ["open"]
    assert events[0].last_sequence == 2


def test_low_frame_rate_drops_broken_run() -> None:
    tracker = FindingTracker(min_frames_to_open=3, confirm_window_s=0.2)
    probabilities = [0.9, 0.9, 0.1, 0.9, 0.1, 0.1]
    frames = [
        result(i, probability, BOX).model_copy(update={"captured_at": START + timedelta(seconds=i / 5.0)})
        for i, probability in enumerate(probabilities)
    ]

    events = feed(tracker, frames)

    assert events == []
    assert tracker.candidates_dropped == 1


def test_distant_regions_are_two_polyps() -> None:
    tracker = FindingTracker(min_frames_to_open=1)

    events = feed(tracker, [result(0, 0.9, BOX), result(1, 0.9, FAR_BOX), result(2, 0.9, BOX)])

    assert [event.status for event in events] == ["open", "open"]
    assert tracker.open_findings() == 2


def test_procedures_are_tracked_apart() -> None:
    tracker = FindingTracker(min_frames_to_open=1)

    events = feed(tracker, [result(0, 0.9, BOX, "proc-a"), result(0, 0.9, BOX, "proc-b")])

    assert {event.procedure_id for event in events} == {"proc-a", "proc-b"}


def test_idle_track_closes_at_end_of_stream() -> None:
    tracker = FindingTracker(idle_close_s=2.0, min_frames_to_open=2)
    feed(tracker, [result(0, 0.9, BOX), result(1, 0.9, BOX)])

    assert tracker.close_idle(now=0.0) == []
    closed = tracker.close_idle(now=float("inf"))

    assert [event.status for event in closed] == ["closed"]
    assert tracker.open_findings() == 0


def test_idle_close_follows_settings() -> None:
    tracker = FindingTracker.from_settings(Settings(detection_track_idle_close_s=5.0, detection_track_min_frames=2))
    feed(tracker, [result(0, 0.9, BOX), result(1, 0.9, BOX)])
    opened_at = time.monotonic()

    assert tracker.close_idle(now=opened_at + 4.0) == []
    assert [event.status for event in tracker.close_idle(now=opened_at + 6.0)] == ["closed"]


@pytest.mark.parametrize(("idle_close_s", "accepted"), [(1.0, True), (0.5, False)])
def test_idle_close_checked_against_gap(idle_close_s: float, accepted: bool) -> None:
    values = {"detection_track_idle_close_s": idle_close_s, "detection_track_max_gap_s": 1.0}

    if accepted:
        assert Settings(**values).detection_track_idle_close_s == idle_close_s
    else:
        with pytest.raises(ValidationError, match=f"detection_track_idle_close_s={idle_close_s} is invalid"):
            Settings(**values)


def test_raised_gap_needs_longer_idle_close(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRC_DETECTION_TRACK_MAX_GAP_S", "3")

    with pytest.raises(ValidationError, match="at least 3 or lower CRC_DETECTION_TRACK_MAX_GAP_S"):
        Settings()


def test_idle_candidate_dropped_silently() -> None:
    tracker = FindingTracker(min_frames_to_open=3)
    feed(tracker, [result(0, 0.9, BOX)])

    assert tracker.close_idle(now=float("inf")) == []
    assert tracker.candidates_dropped == 1


def test_replay_gives_same_finding_id() -> None:
    frames = [result(3, 0.9, BOX), result(4, 0.9, BOX), result(5, 0.9, BOX), result(6, 0.1)]

    first = feed(FindingTracker(), frames)
    second = feed(FindingTracker(), frames)

    assert len(first) == 1
    assert first[0].finding_id == second[0].finding_id


def test_attach_heatmap_to_peak() -> None:
    tracker = FindingTracker(min_frames_to_open=1)
    peak = result(0, 0.9, BOX).model_copy(update={"heatmap_key": None, "heatmap_bucket": None})
    feed(tracker, [peak])

    tracker.attach_heatmap("proc-1", 0, heatmap_key="k.png", heatmap_bucket="b", explanation_method="m")
    (closed,) = tracker.close_idle(now=float("inf"))

    assert tracker.representative_frames() == set()
    assert (closed.heatmap_key, closed.heatmap_bucket, closed.explanation_method) == ("k.png", "b", "m")


def test_region_iou_values() -> None:
    assert region_iou(BOX, BOX) == 1.0
    assert region_iou(BOX, FAR_BOX) == 0.0
    half = Region(x=120, y=100, width=40, height=40)
    assert region_iou(BOX, half) == pytest.approx(800 / 2400)


def test_missing_region_matches_any_track() -> None:
    assert regions_match(None, BOX, 1.0)
    assert regions_match(BOX, None, 1.0)
    assert regions_match(BOX, Region(x=120, y=110, width=40, height=40), 1.0)
    assert not regions_match(BOX, FAR_BOX, 1.0)


def test_overlap_matches_beyond_centre_tolerance() -> None:
    wide = Region(x=0, y=100, width=400, height=40)
    assert regions_match(BOX, wide, tolerance=0.0, min_iou=0.05)
    assert not regions_match(BOX, wide, tolerance=0.0, min_iou=0.5)


def test_invalid_min_frames_rejected() -> None:
    with pytest.raises(ValueError, match="min_frames_to_open=0"):
        FindingTracker(min_frames_to_open=0)
