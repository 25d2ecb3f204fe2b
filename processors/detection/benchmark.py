"""Detection benchmark: the bare model in process, then the full pipeline through Kafka at 30 fps.

One run of ``crc-medai benchmark-detection`` on the local stack:

1. generates a procedure video at the source frame rate with its ground truth
   (polyp episodes), so time to first detection is measured against known frames;
2. times the bare model in this process: ``PolypDetector.predict`` on one frame
   at a time, and one Grad-CAM overlay with its PNG encoding;
3. starts a real detection worker (``crc-medai detection``) under a topic
   prefix of its own, publishes the video paced at its frame rate, and reads
   back every detection result and finding event with its Kafka timestamp;
4. writes the numbers to ``docs/benchmarks/detection.md`` and, through
   :func:`crc_medai.picture.write_latency_summary`, a latency picture.

End-to-end latency is the Kafka timestamp of a detection record (set by the
worker's producer when it sends the record) minus the frame's capture
timestamp. Time to first detection is, for each polyp episode, the Kafka
timestamp of the first ``open`` finding that overlaps the episode minus the
capture timestamp of the episode's first frame.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from aiokafka import AIOKafkaConsumer

from crc_medai.kafka import create_producer, ensure_topics
from crc_medai.services import start_service, stop_service
from crc_medai.settings import REPO_ROOT, Settings, get_settings
from processors.detection.errors import BenchmarkError
from processors.detection.evaluate import track_frames
from processors.detection.explain import GradCamExplainer
from processors.detection.model import PolypDetector
from processors.detection.realtime import configure_torch_threads, select_device
from processors.detection.synth import write_procedure_video
from processors.detection.tracking import FindingTracker
from producers.frames import encode_jpeg, publish_video
from schemas.messages import DetectionResult, Frame, PolypFinding, utc_now

logger = logging.getLogger(__name__)

DEFAULT_PAGE = REPO_ROOT / "docs" / "benchmarks" / "detection.md"
DEMO_VIDEO = REPO_ROOT / "samples" / "video" / "procedure-demo.mp4"
PROCEDURE_ID = "bench-proc-0001"
WARMUP_PROCEDURE_ID = "bench-warmup"
#: The bars the design sets for this machine.
BAR_FPS = 30.0
BAR_P95_MS = 100.0
BAR_TTFD_MEDIAN_MS = 200.0


def percentile(values: list[float], percent: float) -> float | None:
    """Return the nearest-rank percentile of ``values``, or None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(percent / 100.0 * (len(ordered) - 1))))
    return ordered[rank]


def latency_summary(values_ms: list[float]) -> dict[str, float | int | None]:
    """Return count, p50, p95, p99 and max of latencies in milliseconds."""
    return {
        "count": len(values_ms),
        "p50": percentile(values_ms, 50),
        "p95": percentile(values_ms, 95),
        "p99": percentile(values_ms, 99),
        "max": max(values_ms) if values_ms else None,
    }


def read_video(path: Path) -> list[np.ndarray]:
    """Decode every frame of a video file."""
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, image = capture.read()
        if not ok:
            break
        frames.append(image)
    capture.release()
    return frames


# Bare model, in process


def time_bare_model(detector: PolypDetector, frames: list[np.ndarray], heatmaps: int = 30) -> dict[str, Any]:
    """Time ``predict`` on one frame at a time, batches of 8, and Grad-CAM with PNG encoding."""
    for image in frames[:5]:
        detector.predict([image])
    single_ms = []
    for image in frames:
        started = time.perf_counter()
        detector.predict([image])
        single_ms.append((time.perf_counter() - started) * 1000.0)

    started = time.perf_counter()
    for index in range(0, len(frames), 8):
        detector.predict(frames[index : index + 8])
    batch_fps = len(frames) / (time.perf_counter() - started)

    heatmap_ms = []
    with GradCamExplainer(detector) as explainer:
        for image in frames[: heatmaps + 2][2:]:
            started = time.perf_counter()
            explainer.explain(image)
            heatmap_ms.append((time.perf_counter() - started) * 1000.0)

    return {
        "single_frame_ms": latency_summary(single_ms),
        "single_frame_fps": 1000.0 / statistics.mean(single_ms),
        "batch8_fps": batch_fps,
        "heatmap_ms": latency_summary(heatmap_ms),
    }


def findings_in_process(detector: PolypDetector, frames: list[np.ndarray], fps: float, settings: Settings) -> list:
    """Run the model and the finding tracker over decoded frames; return the closed findings as frame ranges."""
    tracker = FindingTracker.from_settings(settings)
    _, events = track_frames(detector, frames, fps, tracker, settings.detection_threshold)
    return [[event.first_sequence, event.last_sequence] for event, _ in events if event.status == "closed"]


# Full pipeline through Kafka


@dataclass
class PipelineRecords:
    """Detection results and finding events read back, each with its Kafka timestamp in ms."""

    results: list[tuple[DetectionResult, int]] = field(default_factory=list)
    findings: list[tuple[PolypFinding, int]] = field(default_factory=list)


async def wait_for_worker(settings: Settings, timeout_s: float) -> float:
    """Send warm-up frames until the worker publishes a result; return the seconds it took."""
    image = np.zeros((256, 256, 3), dtype=np.uint8)
    producer = create_producer(settings)
    consumer = _consumer(settings, ["detections"])
    await producer.start()
    await consumer.start()
    started = time.monotonic()
    try:
        sequence = 0
        while time.monotonic() - started < timeout_s:
            frame = Frame(
                procedure_id=WARMUP_PROCEDURE_ID,
                sequence=sequence,
                captured_at=utc_now(),
                width=256,
                height=256,
                image=encode_jpeg(image),
            )
            await producer.send_and_wait(settings.topic("frames"), frame.to_bytes(), key=WARMUP_PROCEDURE_ID.encode())
            sequence += 1
            batches = await consumer.getmany(timeout_ms=1000)
            if any(batches.values()):
                return time.monotonic() - started
        raise TimeoutError(f"the detection worker published no result within {timeout_s:.0f} s; see its log")
    finally:
        await consumer.stop()
        await producer.stop()


def _consumer(settings: Settings, topics: list[str]) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        *(settings.topic(name) for name in topics),
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_bytes=32 * 1024 * 1024,
    )


async def collect_pipeline(settings: Settings, frames: int, stop: asyncio.Event, timeout_s: float) -> PipelineRecords:
    """Read detections and findings of the benchmark procedure until every frame has a result."""
    consumer = _consumer(settings, ["detections", "findings"])
    records = PipelineRecords()
    await consumer.start()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for batch in batches.values():
                for message in batch:
                    if message.key != PROCEDURE_ID.encode():
                        continue
                    if message.topic == settings.topic("detections"):
                        records.results.append((DetectionResult.from_bytes(message.value), message.timestamp))
                    else:
                        records.findings.append((PolypFinding.from_bytes(message.value), message.timestamp))
            open_ids = {finding.finding_id for finding, _ in records.findings if finding.status == "open"}
            closed_ids = {finding.finding_id for finding, _ in records.findings if finding.status == "closed"}
            if stop.is_set() and len(records.results) >= frames and open_ids <= closed_ids:
                break
    finally:
        await consumer.stop()
    return records


async def run_pipeline(settings: Settings, video: Path, frames: int, timeout_s: float) -> PipelineRecords:
    """Publish the video paced at its frame rate while collecting what the worker publishes."""
    published = asyncio.Event()
    collector = asyncio.create_task(collect_pipeline(settings, frames, published, timeout_s))
    await asyncio.sleep(1.0)
    summary = await publish_video(settings, video, PROCEDURE_ID, realtime=True)
    logger.info("benchmark video published frames=%d seconds=%.1f", summary.frames_published, summary.seconds)
    published.set()
    return await collector


def pipeline_figures(records: PipelineRecords, truth: dict) -> dict[str, Any]:
    """Compute throughput, latency, skipped frames, heatmap latency and time to first detection."""
    results = sorted(records.results, key=lambda item: item[0].sequence)
    captured = {result.sequence: result.captured_at.timestamp() * 1000.0 for result, _ in results}
    processed = [(result, stamp) for result, stamp in results if result.skipped_reason is None]
    latencies = [stamp - captured[result.sequence] for result, stamp in processed]
    heatmap_latencies = [stamp - captured[result.sequence] for result, stamp in processed if result.heatmap_key]
    first_capture_ms = min(captured.values())
    span_s = (max(stamp for _, stamp in results) - first_capture_ms) / 1000.0
    source_span_s = (max(captured.values()) - first_capture_ms) / 1000.0

    return {
        "frames_published": truth["frame_count"],
        "results": len(results),
        "processed": len(processed),
        "skipped_stale": sum(result.skipped_reason == "stale" for result, _ in results),
        "flagged": sum(result.flagged for result, _ in processed),
        "heatmaps": len(heatmap_latencies),
        "source_fps": (len(results) - 1) / source_span_s if source_span_s > 0 else None,
        "processed_fps": len(processed) / span_s if span_s > 0 else None,
        "end_to_end_ms": latency_summary(latencies),
        "heatmap_frames_end_to_end_ms": latency_summary(heatmap_latencies),
        "latencies_ms": latencies,
        "completed_at_s": [(stamp - first_capture_ms) / 1000.0 for _, stamp in processed],
        "finding_heatmap_after_ms": latency_summary(finding_heatmap_delays(records)),
        **time_to_first_detection(records, truth, captured, first_flagged(results, truth)),
    }


def finding_heatmap_delays(records: PipelineRecords) -> list[float]:
    """Return, per finding that opened without a heatmap, how long its repeated ``open`` event took to follow.

    The figure is the difference of the two events' Kafka timestamps: the time
    Grad-CAM and the batch's other heatmaps took before the heatmap reached the finding.
    """
    first_open: dict[object, int] = {}
    delays = []
    for finding, stamp in sorted(records.findings, key=lambda item: item[1]):
        if finding.status != "open":
            continue
        if finding.heatmap_key is None:
            first_open.setdefault(finding.finding_id, stamp)
        elif finding.finding_id in first_open:
            delays.append(float(stamp - first_open.pop(finding.finding_id)))
    return delays


def tracker_tradeoff(
    records: PipelineRecords, truth: dict, settings: Settings, min_frames_choices: tuple[int, ...] = (1, 2, 3)
) -> list[dict[str, Any]]:
    """Replay the finding tracker over the published results with other minimum frame counts.

    The replay uses the Kafka timestamp of the result of the frame that opened
    a finding as the timestamp of the ``open`` event. The worker sends that
    event before the batch's heatmaps and results, so replayed times are later
    than the worker's by up to one batch's Grad-CAM time. The replay shows what
    fewer or more confirming frames would cost in false findings and gain in
    time to first detection, measured on the same run.
    """
    results = sorted(records.results, key=lambda item: item[0].sequence)
    captured = {result.sequence: result.captured_at.timestamp() * 1000.0 for result, _ in results}
    rows = []
    for min_frames in min_frames_choices:
        tracker = FindingTracker.from_settings(settings.model_copy(update={"detection_track_min_frames": min_frames}))
        replay = PipelineRecords(results=results)
        for result, stamp in results:
            replay.findings += [(finding, stamp) for finding in tracker.update(result)]
        replay.findings += [(finding, results[-1][1]) for finding in tracker.close_idle(now=float("inf"))]
        figures = time_to_first_detection(replay, truth, captured, first_flagged(results, truth))
        rows.append(
            {
                "min_frames": min_frames,
                "findings": figures["findings"],
                "findings_unmatched": figures["findings_unmatched"],
                "episodes_detected": figures["episodes_detected"],
                "ttfd_median_ms": figures["ttfd_median_ms"],
            }
        )
    return rows


def first_flagged(results: list[tuple[DetectionResult, int]], truth: dict) -> list[int | None]:
    """Return, per episode, the sequence of the first frame the model flagged inside it."""
    flagged = [result.sequence for result, _ in results if result.flagged]
    return [
        next((sequence for sequence in flagged if episode["first_frame"] <= sequence <= episode["last_frame"]), None)
        for episode in truth["episodes"]
    ]


def time_to_first_detection(
    records: PipelineRecords, truth: dict, captured: dict[int, float], flagged_first: list[int | None]
) -> dict[str, Any]:
    """Match open findings to ground-truth episodes and measure the time from each episode's first frame."""
    opens = sorted(
        ((finding, stamp) for finding, stamp in records.findings if finding.status == "open"),
        key=lambda item: item[1],
    )
    closed = {finding.finding_id: finding for finding, _ in records.findings if finding.status == "closed"}
    per_episode = []
    matched: set = set()
    for episode, first_flag in zip(truth["episodes"], flagged_first, strict=True):
        first, last = episode["first_frame"], episode["last_frame"]
        overlapping = []
        for finding, stamp in opens:
            end = closed[finding.finding_id].last_sequence if finding.finding_id in closed else finding.last_sequence
            if finding.first_sequence <= last and end >= first:
                overlapping.append((finding, stamp))
        # Every finding on the episode counts as matched; the first one to open gives the time.
        matched.update(finding.finding_id for finding, _ in overlapping)
        hit = overlapping[0] if overlapping else None
        if hit is None or first not in captured:
            per_episode.append(
                {
                    "frames": [first, last],
                    "ttfd_ms": None,
                    "first_flagged": first_flag,
                    "opened_on_frame": None,
                    "published_after_ms": None,
                }
            )
            continue
        opened_on = hit[0].last_sequence
        per_episode.append(
            {
                "frames": [first, last],
                "ttfd_ms": hit[1] - captured[first],
                "first_flagged": first_flag,
                "opened_on_frame": opened_on,
                "published_after_ms": hit[1] - captured[opened_on] if opened_on in captured else None,
            }
        )
    detected = [item["ttfd_ms"] for item in per_episode if item["ttfd_ms"] is not None]
    published_after = [item["published_after_ms"] for item in per_episode if item["published_after_ms"] is not None]
    return {
        "episodes": len(truth["episodes"]),
        "episodes_detected": len(detected),
        "findings": len({finding.finding_id for finding, _ in opens}),
        "findings_unmatched": len({finding.finding_id for finding, _ in opens} - matched),
        "ttfd_per_episode": per_episode,
        "ttfd_median_ms": statistics.median(detected) if detected else None,
        "published_after_median_ms": statistics.median(published_after) if published_after else None,
    }


# Report


def machine_description(device: str, threads: int) -> dict[str, str]:
    """Describe the machine the benchmark ran on."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": cpu,
        "cores": str(len(os.sched_getaffinity(0))),
        "load_average_at_start": f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "torch_threads": str(threads),
        "platform": platform.platform(),
    }


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _verdict(passed: bool | None) -> str:
    if passed is None:
        return "not measured"
    return "met" if passed else "**not met**"


def render_page(report: dict[str, Any]) -> str:
    """Render the benchmark page in Markdown."""
    bare, pipe, machine, config = report["bare"], report["pipeline"], report["machine"], report["config"]
    e2e = pipe["end_to_end_ms"]
    overhead = None if e2e["p50"] is None else e2e["p50"] - bare["single_frame_ms"]["p50"]
    fps_ok = pipe["skipped_stale"] == 0 and pipe["results"] >= pipe["frames_published"]
    ttfd = pipe["ttfd_median_ms"]
    lines = [
        "# Detection benchmark",
        "",
        f"Measured {report['date']} with `{report['command']}` on the local stack",
        "(Kafka, MinIO and Redis from `crc-medai stack up`), with the other engineers' jobs",
        "sharing the machine. Numbers vary from run to run with that load.",
        "",
        "## Machine",
        "",
        *[f"- {name.replace('_', ' ')}: {value}" for name, value in machine.items()],
        "",
        "## Set-up",
        "",
        f"- Video: generated procedure, seed {config['seed']}, {config['seconds']} s at {config['fps']:g} fps,",
        f"  {config['size']} x {config['size']} pixels, {pipe['frames_published']} frames,"
        f" {pipe['episodes']} polyp episodes (ground truth from the generator).",
        f"- Worker settings: batch size {config['batch_size']}, batch wait {config['batch_wait_ms']:g} ms,"
        f" latency budget {config['latency_budget_ms']:g} ms,"
        f" at most {config['heatmaps_per_s']:g} heatmaps per second per procedure, threshold {config['threshold']}.",
        f"- Tracker: a finding opens after {config['track_min_frames']} flagged frames within"
        f" {config['track_confirm_window_s']:g} s. It tolerates {config['track_max_gap_s']:g} s of missed frames.",
        f"- Model: {report['model']}.",
        "",
        "## Results",
        "",
        "| measure | value |",
        "|---|---|",
        f"| bare model, one frame per call: p50 / p95 / p99 (ms) | {_ms(bare['single_frame_ms']['p50'])} /"
        f" {_ms(bare['single_frame_ms']['p95'])} / {_ms(bare['single_frame_ms']['p99'])} |",
        f"| bare model throughput, one frame per call / batches of 8 (fps) | {bare['single_frame_fps']:.1f} /"
        f" {bare['batch8_fps']:.1f} |",
        f"| Grad-CAM overlay in process: p50 / p95 (ms) | {_ms(bare['heatmap_ms']['p50'])} /"
        f" {_ms(bare['heatmap_ms']['p95'])} |",
        f"| source rate fed through Kafka (fps) | {pipe['source_fps']:.1f} |",
        f"| pipeline throughput, frames run through the model (fps) | {pipe['processed_fps']:.1f} |",
        f"| results published / frames published | {pipe['results']} / {pipe['frames_published']} |",
        f"| frames skipped as stale | {pipe['skipped_stale']} |",
        f"| end-to-end latency p50 / p95 / p99 / max (ms) | {_ms(e2e['p50'])} / {_ms(e2e['p95'])} /"
        f" {_ms(e2e['p99'])} / {_ms(e2e['max'])} |",
        f"| pipeline overhead: end-to-end p50 minus bare model p50 (ms) | {_ms(overhead)} |",
        f"| frames with a heatmap: count, end-to-end p50 / p95 (ms) | {pipe['heatmaps']},"
        f" {_ms(pipe['heatmap_frames_end_to_end_ms']['p50'])} / {_ms(pipe['heatmap_frames_end_to_end_ms']['p95'])} |",
        f"| open findings without a heatmap: count, its heatmap followed after p50 (ms) |"
        f" {pipe['finding_heatmap_after_ms']['count']}, {_ms(pipe['finding_heatmap_after_ms']['p50'])} |",
        f"| findings / ground-truth episodes / episodes detected | {pipe['findings']} / {pipe['episodes']} /"
        f" {pipe['episodes_detected']} |",
        f"| open finding after the capture of the frame that opened it, median (ms) |"
        f" {_ms(pipe['published_after_median_ms'])} |",
        f"| time to first detection, median (ms) | {_ms(ttfd)} |",
        "",
        "Time to first detection per episode, from the capture of the episode's first frame to the Kafka",
        "timestamp of the `open` finding. It adds up the frames the model misses while only part of the",
        "polyp is in view, the frames the tracker waits for to confirm a finding, and the pipeline latency:",
        "the time from the capture of the frame that opened the finding to the Kafka timestamp of the event.",
        "",
        "| episode frames | first frame the model flagged | finding opened on frame |"
        " event after that frame's capture (ms) | time to first detection (ms) |",
        "|---|---|---|---|---|",
        *[
            f"| {item['frames'][0]}-{item['frames'][1]} | {item['first_flagged']} | {item['opened_on_frame']} |"
            f" {_ms(item['published_after_ms'])} | {_ms(item['ttfd_ms'])} |"
            for item in pipe["ttfd_per_episode"]
        ],
        "",
        *_tradeoff_lines(pipe.get("tracker_tradeoff", []), config["track_min_frames"]),
        f"Findings from the same model and tracker run in process over `samples/video/procedure-demo.mp4`"
        f" (15 fps, 4 ground-truth episodes): {len(report['demo_findings'])} findings, of which"
        f" {report['demo_findings_matched']} overlap a ground-truth episode; frame ranges {report['demo_findings']}.",
        "",
        "## Against the bars",
        "",
        "| bar | measured | verdict |",
        "|---|---|---|",
        f"| sustain a {BAR_FPS:g} fps source | {pipe['results']}/{pipe['frames_published']} results,"
        f" {pipe['skipped_stale']} skipped as stale | {_verdict(fps_ok)} |",
        f"| end-to-end p95 <= {BAR_P95_MS:g} ms | {_ms(e2e['p95'])} ms |"
        f" {_verdict(None if e2e['p95'] is None else e2e['p95'] <= BAR_P95_MS)} |",
        f"| time to first detection, median <= {BAR_TTFD_MEDIAN_MS:g} ms | {_ms(ttfd)} ms |"
        f" {_verdict(None if ttfd is None else ttfd <= BAR_TTFD_MEDIAN_MS)} |",
        "",
        *standing_notes(report),
        "",
        *report["notes"],
        "",
    ]
    if report.get("picture"):
        lines += [f"Latency distribution and throughput over time: `{report['picture']}` beside this page.", ""]
    return "\n".join(lines)


def _tradeoff_lines(rows: list[dict[str, Any]], configured: int) -> list[str]:
    if not rows:
        return []
    return [
        "The tracker replayed over the same published results with other numbers of flagged frames to open a",
        "finding. The timestamp of the result of the frame that opened a finding is used as the finding's own.",
        "The worker sends a finding before the batch's heatmaps and results, so the configured row can be later",
        "than the time to first detection above:",
        "",
        "| flagged frames to open | findings | findings on no episode | episodes detected |"
        " time to first detection, median (ms) |",
        "|---|---|---|---|---|",
        *[
            f"| {row['min_frames']}{' (configured)' if row['min_frames'] == configured else ''} | {row['findings']} |"
            f" {row['findings_unmatched']} | {row['episodes_detected']} | {_ms(row['ttfd_median_ms'])} |"
            for row in rows
        ],
        "",
    ]


def standing_notes(report: dict[str, Any]) -> list[str]:
    """Explain, from the measured figures, what the time to first detection and the findings count are made of."""
    pipe, fps = report["pipeline"], report["config"]["fps"]
    episodes = [item for item in pipe["ttfd_per_episode"] if item["first_flagged"] is not None]
    misses = [item["first_flagged"] - item["frames"][0] for item in episodes]
    confirm = [
        item["opened_on_frame"] - item["first_flagged"]
        for item in episodes
        if item["opened_on_frame"] is not None and item["opened_on_frame"] >= item["first_flagged"]
    ]
    early = [
        item for item in episodes if item["opened_on_frame"] is not None and item["opened_on_frame"] < item["frames"][0]
    ]

    notes = []
    if misses:
        median_miss = statistics.median(misses)
        notes.append(
            f"Where the time to first detection goes: the model flagged its first frame of an episode a median of"
            f" {median_miss:g} frames ({1000.0 * median_miss / fps:.0f} ms at {fps:g} fps) after the episode began,"
            " while only part of the polyp was in view."
        )

    if confirm:
        median_confirm = statistics.median(confirm)
        notes.append(
            f"The tracker then opened the finding a median of {median_confirm:g} frames"
            f" ({1000.0 * median_confirm / fps:.0f} ms) after that first flagged frame, because it waits for"
            f" {report['config']['track_min_frames']} flagged frames."
        )

    if pipe["published_after_median_ms"] is not None:
        notes.append(
            f"The open event reached Kafka a median of {pipe['published_after_median_ms']:.0f} ms after the capture"
            " of the frame that opened the finding: the pipeline latency."
        )

    heatmap_after = pipe["finding_heatmap_after_ms"]
    if heatmap_after["count"]:
        notes.append(
            "An open finding goes out before Grad-CAM runs, so no time to first detection waits for a heatmap."
            " Frames of a candidate that no finding confirms yet get no heatmap, so none delays the frame that"
            f" confirms it. For {heatmap_after['count']} finding(s) the heatmap followed in a repeated open event,"
            f" {heatmap_after['p50']:.0f} ms later at the median."
        )

    if early:
        notes.append(
            f"{len(early)} episode(s) had a finding open before their first frame: a false flag just before the polyp"
            " entered the view started the track that the polyp then joined."
        )

    extra = pipe["findings"] - pipe["findings_unmatched"] - pipe["episodes_detected"]
    if extra > 0:
        notes.append(
            f"{extra} finding(s) beyond one per detected episode: the model missed a polyp for longer than the"
            " tracker's gap tolerance, or its region jumped, so the tracker split the episode."
        )

    if pipe["findings_unmatched"]:
        notes.append(
            f"{pipe['findings_unmatched']} of {pipe['findings']} findings overlap no ground-truth episode: the model"
            " flagged polyp-free frames in runs long enough to confirm a finding."
        )
    return [f"- {note}" for note in notes]


def write_picture(path: Path, pipe: dict[str, Any], fps: float) -> Path:
    """Draw the latency picture with :mod:`crc_medai.picture`."""
    from crc_medai.picture import write_latency_summary

    return write_latency_summary(
        path,
        title=f"Detection pipeline at {fps:g} fps: capture to result published",
        latencies_ms=pipe["latencies_ms"],
        completed_at_s=pipe["completed_at_s"],
        notes=[f"{pipe['skipped_stale']} frames skipped as stale", f"{pipe['heatmaps']} heatmaps"],
    )


# Command


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="crc-medai benchmark-detection", description="Benchmark the detection model and pipeline."
    )
    # 60 s give about 12 polyp episodes; 20 s gave 4, too few for a stable median time to first detection.
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the generated video (default 60)")
    parser.add_argument("--fps", type=float, default=30.0, help="source frame rate fed through Kafka (default 30)")
    parser.add_argument("--seed", type=int, default=11, help="generator seed of the video (default 11)")
    parser.add_argument("--size", type=int, default=256, help="frame side in pixels (default 256)")
    parser.add_argument("--page", type=Path, default=DEFAULT_PAGE, help="Markdown page to write")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the pipeline (default 300)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run both measurements and return the report."""
    from infra.stack import ensure_up

    run_id = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    base = get_settings()
    run_dir = base.output_dir / f"benchmark-detection-{run_id}"
    # Without the registry the worker loads detection_model_path, the file that the bare model is timed on.
    # With it, the worker would run the registry's champion, which may be another version.
    settings = base.model_copy(
        update={
            "topic_prefix": f"bench-{run_id}.",
            "output_dir": run_dir,
            "heatmap_bucket": f"bench-{run_id}",
            "model_registry_enabled": False,
        }
    )
    ensure_up(settings)

    video = run_dir / "procedure.mp4"
    truth = write_procedure_video(video, seed=args.seed, seconds=args.seconds, fps=args.fps, size=args.size)
    frames = read_video(video)

    device = select_device(settings.detection_device)
    threads = configure_torch_threads(settings.detection_torch_threads)
    machine = machine_description(device, threads)
    detector = PolypDetector.load(settings.detection_model_path, device=device)
    print(f"timing the bare model on {len(frames)} frames...", flush=True)
    bare = time_bare_model(detector, frames)
    demo_findings = findings_in_process(detector, read_video(DEMO_VIDEO), 15.0, settings)
    demo_truth = json.loads(DEMO_VIDEO.with_suffix(".json").read_text(encoding="utf-8"))
    demo_matched = sum(
        any(first <= episode["last_frame"] and last >= episode["first_frame"] for episode in demo_truth["episodes"])
        for first, last in demo_findings
    )

    print("starting the detection worker and streaming the video through Kafka...", flush=True)
    asyncio.run(ensure_topics(settings))
    worker = start_service("detection", settings, run_dir / "logs" / "detection.log")
    try:
        warmup_s = asyncio.run(wait_for_worker(settings, timeout_s=args.timeout))
        records = asyncio.run(run_pipeline(settings, video, len(frames), args.timeout))
    finally:
        stop_service(worker, "detection")
    worker_models = sorted({f"{result.model.name} {result.model.version}" for result, _ in records.results})
    if worker_models != [f"{detector.name} {detector.version}"]:
        raise BenchmarkError(
            f"the worker ran {', '.join(worker_models) or 'no model'}, not the timed {detector.name}"
            f" {detector.version}; see {run_dir / 'logs' / 'detection.log'}"
        )
    pipe = pipeline_figures(records, truth)
    pipe["tracker_tradeoff"] = tracker_tradeoff(records, truth, settings)

    notes = [
        f"NOTE: the worker needed {warmup_s:.1f} s from start to its first result (model load, group join);"
        " that time is not part of any figure above.",
    ]
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["crc-medai benchmark-detection", *sys.argv[2:]]),
        "machine": machine,
        "model": f"{detector.name} {detector.version} ({settings.detection_model_path.name})",
        "config": {
            "seed": args.seed,
            "seconds": args.seconds,
            "fps": args.fps,
            "size": args.size,
            "batch_size": settings.detection_batch_size,
            "batch_wait_ms": settings.detection_batch_wait_ms,
            "latency_budget_ms": settings.detection_latency_budget_ms,
            "heatmaps_per_s": settings.detection_heatmaps_per_s,
            "threshold": settings.detection_threshold,
            "track_min_frames": settings.detection_track_min_frames,
            "track_confirm_window_s": settings.detection_track_confirm_window_s,
            "track_max_gap_s": settings.detection_track_max_gap_s,
        },
        "bare": bare,
        "pipeline": pipe,
        "demo_findings": demo_findings,
        "demo_findings_matched": demo_matched,
        "notes": notes,
        "run_dir": str(run_dir),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, write the page and the picture, print the report as JSON."""
    args = _parse_args(argv)
    report = run(args)
    picture = args.page.with_name(args.page.stem + "-latency.png")
    report["picture"] = write_picture(picture, report["pipeline"], args.fps).name
    args.page.parent.mkdir(parents=True, exist_ok=True)
    args.page.write_text(render_page(report), encoding="utf-8")
    raw = Path(report["run_dir"]) / "report.json"
    raw.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    summary = {key: value for key, value in report["pipeline"].items() if key not in ("latencies_ms", "completed_at_s")}
    print(json.dumps({"bare": report["bare"], "pipeline": summary, "page": str(args.page), "raw": str(raw)}, indent=1))
    return 0
