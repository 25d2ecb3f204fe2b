"""Real-time detection: micro-batches, stale frames, the Grad-CAM rate and CPU/CUDA selection."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from consumers.reports import ReportedFinding, diagnostic_report
from crc_medai import metrics
from crc_medai.errors import ProcessingError
from crc_medai.kafka import Record, collect_records, create_producer, ensure_topics
from crc_medai.logs import pseudonym
from crc_medai.settings import Settings
from crc_medai.storage import create_minio
from processors.detection.benchmark import (
    PipelineRecords,
    percentile,
    pipeline_figures,
    render_page,
    tracker_tradeoff,
)
from processors.detection.realtime import (
    DetectionPipeline,
    FrameDecodeError,
    HeatmapRateLimiter,
    configure_torch_threads,
    heatmap_key,
    select_device,
)
from processors.detection.synth import generate_frame
from schemas.messages import DetectionResult, Frame, ModelRef, PolypFinding, utc_now
from tests.conftest import RunningServices, isolated_settings, running_services

START = datetime(2026, 1, 1, 12, 0, 0).astimezone()


def jpeg_frame(sequence: int, captured_at: datetime, procedure: str = "proc-rt", seed: int = 0) -> Frame:
    image, _ = generate_frame(np.random.default_rng(seed + sequence), size=128, with_polyp=True)
    ok, buffer = cv2.imencode(".jpg", image)
    assert ok
    return Frame(
        procedure_id=procedure,
        sequence=sequence,
        captured_at=captured_at,
        width=128,
        height=128,
        image=buffer.tobytes(),
    )


def stale_count() -> float:
    return metrics.FRAMES_SKIPPED.labels(reason="stale")._value.get()


def test_rate_limiter_one_per_interval() -> None:
    limiter = HeatmapRateLimiter(rate_per_s=2.0)
    allowed = []
    for index in range(30):
        captured_at = START + timedelta(milliseconds=100 * index)
        if limiter.allows("proc-a", captured_at):
            limiter.record("proc-a", captured_at)
            allowed.append(index)

    assert allowed == [0, 5, 10, 15, 20, 25]


def test_rate_limiter_per_procedure() -> None:
    limiter = HeatmapRateLimiter(rate_per_s=1.0)
    limiter.record("proc-a", START)

    assert not limiter.allows("proc-a", START + timedelta(milliseconds=500))
    assert limiter.allows("proc-b", START + timedelta(milliseconds=500))
    assert limiter.allows("proc-a", START + timedelta(seconds=1))


def test_rate_limiter_zero_allows_none() -> None:
    assert not HeatmapRateLimiter(rate_per_s=0.0).allows("proc-a", START)


def test_select_device_auto() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"

    assert select_device("auto") == expected
    assert select_device("cpu") == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_select_device_cuda_missing() -> None:
    with pytest.raises(ProcessingError, match="CRC_DETECTION_DEVICE=cpu"):
        select_device("cuda")


def test_torch_threads_default_cores() -> None:
    previous = torch.get_num_threads()
    try:
        assert configure_torch_threads(1) == 1
        assert torch.get_num_threads() == 1
        assert configure_torch_threads(0) >= 1
    finally:
        torch.set_num_threads(previous)


# The tests below run the pipeline against the real MinIO of the local stack.


@pytest.fixture
def pipeline_settings(settings: Settings) -> Settings:
    # Threshold 0 flags every frame, so the heatmap budget and the tracker are exercised deterministically.
    return settings.model_copy(
        update={"detection_threshold": 0.0, "detection_latency_budget_ms": 1e9, "detection_heatmaps_per_s": 2.0}
    )


@pytest.mark.integration
def test_batch_keeps_order_and_rejects_alone(pipeline_settings: Settings) -> None:
    pipeline = DetectionPipeline(pipeline_settings)
    values = [jpeg_frame(0, utc_now()).to_bytes(), b"not json", jpeg_frame(1, utc_now()).to_bytes()]
    bad_image = jpeg_frame(2, utc_now()).model_copy(update={"image": b""})
    values.append(bad_image.to_bytes())

    output = pipeline.process_batch(values)
    pipeline.close()

    assert len(output.outcomes) == 4
    assert isinstance(output.outcomes[0], DetectionResult)
    assert output.outcomes[0].sequence == 0
    assert isinstance(output.outcomes[1], ValueError)
    assert isinstance(output.outcomes[2], DetectionResult)
    assert output.outcomes[2].sequence == 1
    assert isinstance(output.outcomes[3], FrameDecodeError)
    assert "0 bytes" in str(output.outcomes[3])


@pytest.mark.integration
def test_stale_frame_gets_skipped_result(pipeline_settings: Settings) -> None:
    settings = pipeline_settings.model_copy(update={"detection_latency_budget_ms": 2000.0})
    pipeline = DetectionPipeline(settings)
    before = stale_count()
    old = jpeg_frame(0, utc_now() - timedelta(seconds=5))
    fresh = jpeg_frame(1, utc_now())

    output = pipeline.process_batch([old.to_bytes(), fresh.to_bytes()])
    pipeline.close()

    skipped, processed = output.outcomes
    assert skipped.skipped_reason == "stale"
    assert skipped.frame_event_id == old.event_id
    assert skipped.flagged is False
    assert skipped.heatmap_key is None
    assert processed.skipped_reason is None
    assert processed.flagged is True
    assert stale_count() == before + 1


@pytest.mark.integration
def test_stale_frames_warned_and_counted(pipeline_settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    settings = pipeline_settings.model_copy(update={"detection_latency_budget_ms": 2000.0})
    pipeline = DetectionPipeline(settings)
    backlog = utc_now() - timedelta(seconds=5)
    stale = [jpeg_frame(index, backlog + timedelta(milliseconds=33 * index)).to_bytes() for index in range(3)]
    now = utc_now()
    fresh = [jpeg_frame(index, now + timedelta(milliseconds=33 * index)).to_bytes() for index in range(3, 8)]

    with caplog.at_level(logging.WARNING, logger="processors.detection.realtime"):
        output = pipeline.process_batch(stale + fresh)
    pipeline.close()

    warnings = [record for record in caplog.records if "skipped as stale" in record.getMessage()]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "count=3" in message
    assert f"procedure={pseudonym('proc-rt')}" in message
    assert "proc-rt" not in message
    oldest_ms = float(message.split("oldest_age_ms=")[1].split()[0])
    assert oldest_ms >= 5000
    assert pipeline.stale_skipped == {"proc-rt": 3}
    assert output.findings
    assert all(finding.stale_frames_skipped == 3 for finding in output.findings)


@pytest.mark.integration
def test_fresh_batch_logs_no_stale_warning(pipeline_settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    pipeline = DetectionPipeline(pipeline_settings)

    with caplog.at_level(logging.WARNING, logger="processors.detection.realtime"):
        output = pipeline.process_batch([jpeg_frame(index, utc_now()).to_bytes() for index in range(4)])
    pipeline.close()

    assert not [record for record in caplog.records if "skipped as stale" in record.getMessage()]
    assert all(finding.stale_frames_skipped == 0 for finding in output.findings)


def reported(stale_frames_skipped: int | None) -> ReportedFinding:
    return ReportedFinding(
        finding_id=str(uuid.uuid4()),
        observation_id="finding-1",
        status="closed",
        first_seen=START.isoformat(),
        last_seen=START.isoformat(),
        issued=START.isoformat(),
        stale_frames_skipped=stale_frames_skipped,
    )


@pytest.mark.parametrize(("counts", "expected"), [([None], None), ([0, None], None), ([2, 7], 7)])
def test_report_conclusion_names_stale_frames(counts: list[int | None], expected: int | None) -> None:
    report = diagnostic_report("proc-rt", [reported(count) for count in counts])

    if expected is None:
        assert "stale" not in report["conclusion"]
    else:
        assert f"At least {expected} frame(s)" in report["conclusion"]
        assert "skipped without being examined" in report["conclusion"]
    assert report["conclusion"].endswith("Not reviewed by a clinician.")


@pytest.mark.integration
def test_zero_budget_skips_nothing(pipeline_settings: Settings) -> None:
    settings = pipeline_settings.model_copy(update={"detection_latency_budget_ms": 0.0})
    pipeline = DetectionPipeline(settings)
    old = jpeg_frame(0, utc_now() - timedelta(hours=1))

    (result,) = pipeline.process_batch([old.to_bytes()]).outcomes
    pipeline.close()

    assert result.skipped_reason is None
    assert result.flagged is True


@pytest.mark.integration
def test_heatmaps_bounded_by_rate(pipeline_settings: Settings) -> None:
    pipeline = DetectionPipeline(pipeline_settings)
    start = utc_now()
    # 30 frames at 30 fps: 1 s of capture time, so 2 heatmaps per second allow 2 by rate.
    frames = [jpeg_frame(index, start + timedelta(milliseconds=1000 * index / 30)) for index in range(30)]

    outputs = [pipeline.process_batch([frame.to_bytes() for frame in frames[i : i + 8]]) for i in range(0, 30, 8)]
    pipeline.close()

    results = [result for output in outputs for result in output.outcomes]
    findings = [finding for output in outputs for finding in output.findings]
    with_heatmap = [result for result in results if result.heatmap_key]
    finding_frames = {finding.representative_sequence for finding in findings}
    assert all(result.flagged for result in results)
    # Each frame shows a polyp at a new place, so the tracker may open more than one finding.
    assert findings
    assert {finding.status for finding in findings} == {"open"}
    assert len(with_heatmap) <= 2 + len(finding_frames)
    assert {result.sequence for result in with_heatmap} >= finding_frames
    minio = create_minio(pipeline_settings)
    for result in with_heatmap:
        assert minio.stat_object(result.heatmap_bucket, result.heatmap_key).size > 0


@pytest.mark.integration
def test_finding_published_before_its_heatmap(pipeline_settings: Settings) -> None:
    # A rate of 0 leaves the finding's frame without a heatmap until the finding requires one.
    settings = pipeline_settings.model_copy(update={"detection_heatmaps_per_s": 0.0})
    pipeline = DetectionPipeline(settings)
    start = utc_now()
    frames = [jpeg_frame(index, start + timedelta(milliseconds=33 * index)) for index in range(4)]

    detected = pipeline.detect_batch([frame.to_bytes() for frame in frames])
    output = pipeline.explain_batch(detected)
    closed = pipeline.tracker.close_idle(now=float("inf"))
    pipeline.close()

    (confirmed,) = detected.confirmed
    assert confirmed.status == "open"
    assert confirmed.heatmap_key is None
    assert all(result.heatmap_key is None for result in detected.outcomes)
    (repeated,) = output.findings
    assert repeated.status == "open"
    assert repeated.finding_id == confirmed.finding_id
    assert repeated.heatmap_key is not None
    assert repeated.model_dump(exclude={"heatmap_key", "heatmap_bucket", "explanation_method", "event_id"}) == (
        confirmed.model_dump(exclude={"heatmap_key", "heatmap_bucket", "explanation_method", "event_id"})
    )
    representative = output.outcomes[repeated.representative_sequence]
    assert representative.heatmap_key == repeated.heatmap_key
    assert sum(result.heatmap_key is not None for result in output.outcomes) == 1
    assert [finding.status for finding in closed] == ["closed"]
    assert closed[0].heatmap_key == repeated.heatmap_key


@pytest.mark.integration
def test_failed_heatmap_rejects_frame_only(
    pipeline_settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = pipeline_settings.model_copy(update={"detection_track_min_frames": 1})
    pipeline = DetectionPipeline(settings)

    def fail(image: np.ndarray) -> None:
        raise RuntimeError("Grad-CAM failed")

    monkeypatch.setattr(pipeline.explainer, "explain", fail)
    start = utc_now()
    frames = [jpeg_frame(index, start + timedelta(milliseconds=33 * index)) for index in range(2)]

    detected = pipeline.detect_batch([frame.to_bytes() for frame in frames])
    with caplog.at_level(logging.ERROR, logger="processors.detection.realtime"):
        output = pipeline.explain_batch(detected)
    pipeline.close()

    # Frame 0 was within the heatmap rate, so its failed heatmap rejects it; frame 1 was not.
    assert [type(outcome).__name__ for outcome in output.outcomes] == ["RuntimeError", "DetectionResult"]
    assert output.outcomes[1].heatmap_key is None
    assert [finding.status for finding in detected.confirmed] == ["open"]
    assert output.findings == []
    assert any("publishing it without a heatmap" in record.getMessage() for record in caplog.records)


def heatmap_count(outcome: str) -> float:
    return metrics.HEATMAPS.labels(outcome=outcome)._value.get()


@pytest.mark.integration
def test_candidate_frames_get_no_heatmap(pipeline_settings: Settings) -> None:
    settings = pipeline_settings.model_copy(update={"detection_track_min_frames": 3})
    pipeline = DetectionPipeline(settings)
    start = utc_now()
    # The same image every frame keeps every frame on one track, with frame 0 as its peak.
    # Frame 4 comes 520 ms after frame 2, past the rate's interval of 500 ms.
    offsets_ms = [0, 33, 66, 99, 586]
    frames = [
        jpeg_frame(index, start + timedelta(milliseconds=offset), seed=-index)
        for index, offset in enumerate(offsets_ms)
    ]
    before = {outcome: heatmap_count(outcome) for outcome in ("unconfirmed", "rate_limited", "computed")}

    candidates = [pipeline.process_batch([frame.to_bytes()]) for frame in frames[:2]]
    detected = pipeline.detect_batch([frames[2].to_bytes()])
    output = pipeline.explain_batch(detected)
    later = [pipeline.process_batch([frame.to_bytes()]) for frame in frames[3:]]
    pipeline.close()

    assert [output.findings for output in candidates] == [[], []]
    assert all(output.outcomes[0].heatmap_key is None for output in candidates)
    # Frames 0 and 1 had no finding yet. Frames 2 and 3 were over the rate. Frames 0 and 4 got heatmaps.
    assert heatmap_count("unconfirmed") - before["unconfirmed"] == 2
    assert heatmap_count("rate_limited") - before["rate_limited"] == 2
    assert heatmap_count("computed") - before["computed"] == 2
    (confirmed,) = detected.confirmed
    assert (confirmed.representative_sequence, confirmed.heatmap_key) == (0, None)
    (repeated,) = output.findings
    assert repeated.heatmap_key == heatmap_key(frames[0])
    # The finding's heatmap took the rate's slot, so the frame that opened it gets none, nor does frame 3.
    assert output.outcomes[0].heatmap_key is None
    assert later[0].outcomes[0].heatmap_key is None
    assert later[1].outcomes[0].heatmap_key == heatmap_key(frames[4])
    assert [output.findings for output in later] == [[], []]


# Through Kafka: the detection worker as a child process.


@pytest.fixture(scope="module")
def worker_settings(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    settings = isolated_settings(stack, tmp_path_factory.mktemp("realtime") / "out")
    # Old frames are 5 minutes old; fresh ones must stay within the budget even when a send is retried.
    return settings.model_copy(update={"detection_latency_budget_ms": 30_000.0})


@pytest.fixture(scope="module")
def worker(worker_settings: Settings) -> Iterator[RunningServices]:
    yield from running_services(worker_settings, Path(worker_settings.output_dir) / "logs", ("detection",))


async def send_frames(settings: Settings, frames: list[bytes]) -> None:
    await ensure_topics(settings)
    producer = create_producer(settings)
    await producer.start()
    try:
        for value in frames:
            await producer.send_and_wait(settings.topic("frames"), value=value, key=b"proc-rt")
    finally:
        await producer.stop()


@pytest.mark.integration
def test_worker_publishes_stale_and_fresh(worker_settings: Settings, worker: RunningServices) -> None:
    settings = worker_settings
    old = utc_now() - timedelta(minutes=5)
    frames = [jpeg_frame(index, old + timedelta(milliseconds=33 * index)).to_bytes() for index in range(3)]
    frames.append(b"\x00garbage")

    def fresh_frames() -> list[bytes]:
        # Captured when sent, so they stay within the budget even while the worker is starting.
        return [jpeg_frame(index, utc_now()).to_bytes() for index in range(3, 6)]

    asyncio.run(send_frames(settings, frames))

    def done(records: list[Record]) -> bool:
        results = [record for record in records if record.topic == settings.topic("detections")]
        return worker.any_stopped() or len(results) >= 3

    first = asyncio.run(collect_records(settings, ["detections"], until=done, timeout_s=180))
    asyncio.run(send_frames(settings, fresh_frames()))
    records = asyncio.run(
        collect_records(
            settings,
            ["detections", "dlq.detection"],
            until=lambda records: worker.any_stopped() or len(records) >= 7,
            timeout_s=120,
        )
    )

    assert len(first) >= 3, worker.logs()
    results = sorted(
        (DetectionResult.from_bytes(record.value) for record in records if record.topic.endswith("detections")),
        key=lambda result: result.sequence,
    )
    dead = [record for record in records if record.topic.endswith("dlq.detection")]
    assert [result.sequence for result in results] == [0, 1, 2, 3, 4, 5]
    assert [result.skipped_reason for result in results[:3]] == ["stale", "stale", "stale"]
    assert [result.skipped_reason for result in results[3:]] == [None, None, None]
    assert [record.value for record in dead] == [b"\x00garbage"]
    assert worker.processes["detection"].poll() is None


# Benchmark arithmetic on hand-made records.


def bench_result(sequence: int, flagged: bool, captured_ms: int, skipped: bool = False) -> DetectionResult:
    return DetectionResult(
        frame_event_id=uuid.uuid4(),
        procedure_id="bench",
        sequence=sequence,
        captured_at=datetime.fromtimestamp(captured_ms / 1000.0, tz=UTC),
        polyp_probability=0.9 if flagged else 0.1,
        flagged=flagged,
        model=ModelRef(name="m", version="1"),
        inference_ms=1.0,
        skipped_reason="stale" if skipped else None,
    )


def bench_finding(first: int, last: int, status: str, finding_id: uuid.UUID) -> PolypFinding:
    captured = datetime.fromtimestamp(0, tz=UTC)
    return PolypFinding(
        finding_id=finding_id,
        procedure_id="bench",
        status=status,
        first_sequence=first,
        last_sequence=last,
        first_seen=captured,
        last_seen=captured,
        frames_flagged=last - first + 1,
        peak_probability=0.9,
        representative_sequence=first,
        model=ModelRef(name="m", version="1"),
    )


def test_benchmark_figures_from_records() -> None:
    # 10 frames captured 100 ms apart, each published 40 ms after capture; frame 9 skipped as stale.
    records = PipelineRecords(
        results=[(bench_result(i, 3 <= i <= 6, 100 * i, skipped=i == 9), 100 * i + 40) for i in range(10)]
    )
    polyp, split, stray = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    heatmap = {"heatmap_key": "heatmaps/bench/3.png", "heatmap_bucket": "b", "explanation_method": "grad-cam"}
    records.findings = [
        (bench_finding(3, 5, "open", polyp), 560),
        (bench_finding(3, 5, "open", polyp).model_copy(update=heatmap), 600),
        (bench_finding(3, 5, "closed", polyp).model_copy(update=heatmap), 900),
        (bench_finding(6, 6, "open", split).model_copy(update=heatmap), 700),
        (bench_finding(8, 8, "open", stray), 850),
    ]
    truth = {"frame_count": 10, "episodes": [{"first_frame": 2, "last_frame": 6}, {"first_frame": 7, "last_frame": 7}]}

    figures = pipeline_figures(records, truth)

    assert figures["processed"] == 9
    assert figures["skipped_stale"] == 1
    assert figures["end_to_end_ms"]["p50"] == pytest.approx(40.0)
    assert figures["findings"] == 3
    assert figures["findings_unmatched"] == 1
    assert figures["episodes_detected"] == 1
    first, second = figures["ttfd_per_episode"]
    assert first["ttfd_ms"] == pytest.approx(360.0)
    assert first["first_flagged"] == 3
    assert first["opened_on_frame"] == 5
    assert first["published_after_ms"] == pytest.approx(60.0)
    assert figures["published_after_median_ms"] == pytest.approx(60.0)
    assert second["ttfd_ms"] is None
    assert figures["ttfd_median_ms"] == pytest.approx(360.0)
    # Only the polyp's finding opened without a heatmap and was repeated with it.
    assert figures["finding_heatmap_after_ms"]["count"] == 1
    assert figures["finding_heatmap_after_ms"]["p50"] == pytest.approx(40.0)


def test_benchmark_page_renders_figures() -> None:
    records = PipelineRecords(results=[(bench_result(i, 3 <= i <= 6, 100 * i), 100 * i + 40) for i in range(10)])
    records.findings = [(bench_finding(3, 5, "open", uuid.uuid4()), 560)]
    truth = {"frame_count": 10, "episodes": [{"first_frame": 2, "last_frame": 6}]}
    latency = {"p50": 10.0, "p95": 12.0, "p99": 13.0}
    config = {
        "seed": 11,
        "seconds": 1.0,
        "fps": 10.0,
        "size": 256,
        "batch_size": 8,
        "batch_wait_ms": 1.0,
        "latency_budget_ms": 500.0,
        "heatmaps_per_s": 2.0,
        "threshold": 0.5,
        "track_min_frames": 3,
        "track_confirm_window_s": 0.2,
        "track_max_gap_s": 1.0,
    }
    report = {
        "date": "2026-12-05 06:00 UTC",
        "command": "crc-medai benchmark-detection",
        "machine": {"cores": "2"},
        "model": "polyp-unet 0.0.1 (test.pt)",
        "config": config,
        "bare": {"single_frame_ms": latency, "heatmap_ms": latency, "single_frame_fps": 90.0, "batch8_fps": 100.0},
        "pipeline": pipeline_figures(records, truth),
        "demo_findings": [],
        "demo_findings_matched": 0,
        "notes": [],
    }

    page = render_page(report)

    # The finding opened on frame 5, captured at 500 ms and published at 560 ms. The episode began at 200 ms.
    assert "| 2-6 | 3 | 5 | 60.0 | 360.0 |" in page
    assert "| open finding after the capture of the frame that opened it, median (ms) | 60.0 |" in page
    assert "a median of 60 ms after the capture of the frame that opened the finding" in page
    assert "| time to first detection, median <= 200 ms | 360.0 ms | **not met** |" in page


def test_tracker_tradeoff_replays_results() -> None:
    # Frames 3-6 flagged, captured 100 ms apart and published 40 ms after capture; the episode starts at frame 2.
    records = PipelineRecords(results=[(bench_result(i, 3 <= i <= 6, 100 * i), 100 * i + 40) for i in range(10)])
    truth = {"frame_count": 10, "episodes": [{"first_frame": 2, "last_frame": 6}]}

    rows = tracker_tradeoff(records, truth, Settings(), min_frames_choices=(1, 3, 5))

    assert [row["min_frames"] for row in rows] == [1, 3, 5]
    assert [row["ttfd_median_ms"] for row in rows[:2]] == [pytest.approx(140.0), pytest.approx(340.0)]
    assert [row["findings"] for row in rows] == [1, 1, 0]
    assert rows[2]["episodes_detected"] == 0
    assert rows[2]["ttfd_median_ms"] is None


def test_percentile_nearest_rank() -> None:
    values = [float(value) for value in range(101)]

    assert percentile(values, 50) == 50.0
    assert percentile(values, 95) == 95.0
    assert percentile([], 50) is None
