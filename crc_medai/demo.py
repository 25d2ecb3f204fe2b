"""The main job: sample video and patient records in, FHIR resources out, over the real stack.

The demo starts the local stack and the three services. It publishes the
sample video and Bundles under a topic prefix of its own, then reads back the
result topics and checks the heatmap objects in MinIO. The summary it prints
is built only from what came back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from minio.error import S3Error

from crc_medai.kafka import DEAD_LETTER_TOPICS, Record, collect_records, ensure_topics
from crc_medai.picture import PictureError, write_latency_summary
from crc_medai.services import free_port, start_service, stop_service, wait_ready
from crc_medai.settings import Settings, get_settings
from crc_medai.storage import create_minio
from producers.frames import publish_video
from producers.records import publish_records
from schemas.messages import DetectionResult, FhirResourceEvent, PolypFinding, PrognosisResult

logger = logging.getLogger(__name__)

SERVICES = ("detection", "prognosis", "fhir-consumer")
#: Resources the FHIR consumer builds from every finding event and every prognosis.
FINDING_RESOURCES = frozenset({"Observation", "DiagnosticReport"})
PROGNOSIS_RESOURCES = frozenset({"Observation", "RiskAssessment"})
#: The sample record's patient who undergoes the demo colonoscopy.
DEMO_PATIENT_ID = "pt-0001"
#: Seconds the demo waits for every service's /readyz to return 200 before it streams anyway.
READY_TIMEOUT_S = 120.0
RESULT_TOPICS = ("detections", "findings", "prognoses", "fhir-resources", *DEAD_LETTER_TOPICS)


@dataclass
class Results:
    """Parsed results of one run, as read back from Kafka."""

    detections: list[DetectionResult] = field(default_factory=list)
    findings: list[PolypFinding] = field(default_factory=list)
    prognoses: list[PrognosisResult] = field(default_factory=list)
    resources: list[FhirResourceEvent] = field(default_factory=list)
    dead_letters: list[Record] = field(default_factory=list)

    @classmethod
    def parse(cls, records: list[Record], settings: Settings) -> Results:
        """Sort records by topic and parse each into its message type."""
        results = cls()
        by_topic = {
            settings.topic("detections"): (DetectionResult, results.detections),
            settings.topic("findings"): (PolypFinding, results.findings),
            settings.topic("prognoses"): (PrognosisResult, results.prognoses),
            settings.topic("fhir-resources"): (FhirResourceEvent, results.resources),
        }
        for record in records:
            if record.topic in by_topic:
                message_type, target = by_topic[record.topic]
                target.append(message_type.from_bytes(record.value))
            else:
                results.dead_letters.append(record)
        return results

    def complete(self, frames: int, patients: int) -> bool:
        """Tell whether every frame, finding and patient has its results, FHIR resources included."""
        if len(self.detections) < frames or len(self.prognoses) < patients:
            return False
        if any(finding.status == "open" for finding in self.latest_findings()):
            return False
        return self.fhir_complete()

    def fhir_complete(self) -> bool:
        """Tell whether every finding event and prognosis has its FHIR resources on the topic."""
        built: dict[object, set[str]] = {}
        for event in self.resources:
            built.setdefault(event.source_event_id, set()).add(event.resource_type)
        return all(FINDING_RESOURCES <= built.get(finding.event_id, set()) for finding in self.findings) and all(
            PROGNOSIS_RESOURCES <= built.get(result.event_id, set()) for result in self.prognoses
        )

    def latest_findings(self) -> list[PolypFinding]:
        """Return the last state of every finding, in order of appearance."""
        latest: dict[object, PolypFinding] = {}
        for finding in self.findings:
            latest[finding.finding_id] = finding
        return sorted(latest.values(), key=lambda finding: (finding.procedure_id, finding.first_sequence))


def run_demo(*, video: Path, records: Path, realtime: bool = True, timeout_s: float = 300.0) -> int:
    """Run the main job end to end and print its summary; return 0 when every result came back."""
    from infra.stack import ensure_up

    run_id = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    base = get_settings()
    run_dir = base.output_dir / f"demo-{run_id}"
    settings = base.model_copy(update={"topic_prefix": f"demo-{run_id}.", "output_dir": run_dir})

    print(f"CRC-MedAI demo run {run_id}: starting the local stack (first run downloads and builds it)...", flush=True)
    ensure_up(settings)
    asyncio.run(ensure_topics(settings))
    print_champions(settings)

    if not realtime:
        # Frames published as fast as possible are older than a live latency budget by design.
        settings = settings.model_copy(update={"detection_latency_budget_ms": 0.0})
    processes = start_ready_services(settings, run_dir)
    try:
        summary = asyncio.run(_stream_and_collect(settings, video, records, realtime, timeout_s, processes))
    finally:
        for name, process in processes.items():
            stop_service(process, name)

    summary_path = run_dir / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    print(render_summary(summary, settings, run_dir, summary_path))
    return 0 if summary["complete"] else 1


def start_ready_services(settings: Settings, run_dir: Path) -> dict[str, subprocess.Popen[bytes]]:
    """Start the services, each with its own metrics port, and wait until each /readyz returns 200.

    Streaming starts only then, so frames captured while a model loads are not skipped as stale.
    """
    started = {}
    for name in SERVICES:
        port = free_port(settings.metrics_host)
        service_settings = settings.model_copy(update={"metrics_port": port})
        process = start_service(name, service_settings, run_dir / "logs" / f"{name}.log")
        started[name] = (process, f"http://{settings.metrics_host}:{port}")
    print("waiting for the services to load their models and join the broker...", flush=True)
    not_ready = wait_ready(started, READY_TIMEOUT_S)
    if not_ready:
        print(f"not ready after {READY_TIMEOUT_S:.0f} s: {', '.join(not_ready)}; see their logs in {run_dir / 'logs'}")
    return {name: process for name, (process, _) in started.items()}


def print_champions(settings: Settings) -> None:
    """Register the shipped weights where the registry has no model yet, and print the champions the services load."""
    if not settings.model_registry_enabled:
        print("model registry disabled: the services load the weights files")
        return
    from crc_medai.lifecycle.kinds import model_kind
    from crc_medai.lifecycle.registry import CHAMPION, ModelRegistry

    registry = ModelRegistry(settings)
    for kind in ("detection", "prognosis"):
        registry.bootstrap(kind)
        champion = registry.alias(kind, CHAMPION)
        version = champion.version if champion else "none (set one with 'crc-medai models promote')"
        print(f"{kind} model: {model_kind(kind).registered_name} {CHAMPION} version {version}", flush=True)


async def _stream_and_collect(
    settings: Settings,
    video: Path,
    records: Path,
    realtime: bool,
    timeout_s: float,
    processes: dict,
) -> dict[str, Any]:
    started = time.monotonic()
    record_summary = await publish_records(settings, [records])
    print(f"published {len(record_summary.published)} patient record(s), rejected {len(record_summary.rejected)}")
    print(f"streaming {video.name} {'at its frame rate' if realtime else 'as fast as possible'}...", flush=True)
    frame_summary = await publish_video(
        settings, video, "proc-demo-0001", realtime=realtime, patient_id=DEMO_PATIENT_ID
    )
    print(f"published {frame_summary.frames_published} frames at {frame_summary.fps:.1f} fps")

    expected_detections = frame_summary.frames_published
    expected_prognoses = len(record_summary.published)

    def complete(received: list[Record]) -> bool:
        return Results.parse(received, settings).complete(expected_detections, expected_prognoses)

    def stopped_services() -> list[str]:
        return [name for name, process in processes.items() if process.poll() is not None]

    # Stop waiting as soon as a service has died, because no more results can come. Its log has the cause.
    received = await collect_records(
        settings,
        RESULT_TOPICS,
        until=lambda records: complete(records) or bool(stopped_services()),
        timeout_s=timeout_s,
    )
    results = Results.parse(received, settings)
    picture = write_demo_picture(settings, results, realtime=realtime)
    return build_summary(
        settings,
        results,
        expected_detections=expected_detections,
        expected_prognoses=expected_prognoses,
        rejected_files=record_summary.rejected,
        complete=complete(received),
        stopped=stopped_services(),
        seconds=time.monotonic() - started,
        picture=picture,
    )


def write_demo_picture(settings: Settings, results: Results, *, realtime: bool) -> Path | None:
    """Draw the run's detection latency and throughput under its output folder; return None without detections."""
    if not results.detections:
        return None
    first_capture = min(result.captured_at for result in results.detections)
    model = results.detections[0].model
    try:
        return write_latency_summary(
            settings.output_dir / "latency.png",
            title="CRC-MedAI demo: frame capture to detection result",
            latencies_ms=[
                (result.source_ts - result.captured_at).total_seconds() * 1000.0 for result in results.detections
            ],
            completed_at_s=[(result.source_ts - first_capture).total_seconds() for result in results.detections],
            notes=[
                "latency: the frame's captured_at to the DetectionResult's source_ts (result published)",
                f"{len(results.detections)} results read back from {settings.topic('detections')}",
                f"frames published {'at the video frame rate' if realtime else 'as fast as possible'}",
                f"detection model {model.name} {model.version}",
            ],
        )
    except PictureError as exc:
        # A clock step between capture agent and processor can make a latency negative. The summary still prints.
        logger.warning("latency picture not written error=%s", exc)
        return None


def build_summary(
    settings: Settings,
    results: Results,
    *,
    expected_detections: int,
    expected_prognoses: int,
    rejected_files: dict[str, str],
    complete: bool,
    stopped: list[str],
    seconds: float,
    picture: Path | None = None,
) -> dict[str, Any]:
    """Build the run summary from parsed results and check every heatmap object in MinIO.

    The heatmaps counted are those that detection results or finding events
    refer to, each object once.
    """
    minio = create_minio(settings)
    findings = results.latest_findings()
    heatmaps = referenced_heatmaps(results)
    missing_heatmaps = [key for bucket, key in heatmaps if not _object_exists(minio, bucket, key)]
    latencies = sorted(
        (result.source_ts - result.captured_at).total_seconds() * 1000.0 for result in results.detections
    )
    return {
        "complete": complete and not missing_heatmaps,
        "seconds": round(seconds, 1),
        "stopped_services": stopped,
        "frames": {
            "expected": expected_detections,
            "processed": len(results.detections),
            "flagged": sum(result.flagged for result in results.detections),
            "flagged_in_findings": flagged_in_findings(results.detections, findings),
            "skipped_stale": sum(result.skipped_reason == "stale" for result in results.detections),
            "latency_ms_p50": _percentile(latencies, 50),
            "latency_ms_p95": _percentile(latencies, 95),
            "model": _model_name(results.detections[0]) if results.detections else None,
        },
        "findings": [
            {
                "status": finding.status,
                "frames": f"{finding.first_sequence}-{finding.last_sequence}",
                "frames_flagged": finding.frames_flagged,
                "peak_confidence": round(finding.peak_probability, 3),
                "peak_frame": finding.representative_sequence,
                "heatmap": f"s3://{finding.heatmap_bucket}/{finding.heatmap_key}",
            }
            for finding in findings
        ],
        "heatmaps": {"stored": len(heatmaps) - len(missing_heatmaps), "missing": missing_heatmaps},
        "prognoses": {
            "expected": expected_prognoses,
            "received": len(results.prognoses),
            "patients": [
                {
                    "patient": result.patient_id,
                    "recurrence_probability": round(result.recurrence_probability, 3),
                    "horizon_years": result.horizon_years,
                    "risk_group": result.risk_group,
                    "explanation_scale": result.explanation_scale,
                    "top_contributions": [
                        f"{item.label} = {item.display_value}: {item.contribution:+.3f}"
                        for item in result.contributions[:3]
                    ],
                    "missing": result.missing_features,
                }
                for result in sorted(results.prognoses, key=lambda result: result.patient_id)
            ],
        },
        # A DiagnosticReport is published again as each finding closes; count each resource once.
        "fhir_resources": dict(
            Counter(type_ for type_, _ in {(e.resource_type, e.resource_id) for e in results.resources})
        ),
        "dead_letters": [
            {
                "topic": record.topic,
                "source": record.headers.get("crc-origin-source"),
                "error": record.headers.get("crc-error"),
            }
            for record in results.dead_letters
        ],
        "rejected_files": rejected_files,
        "latency_picture": str(picture) if picture else None,
    }


def referenced_heatmaps(results: Results) -> list[tuple[str, str]]:
    """Return the distinct (bucket, key) of the heatmaps that detection results and finding events refer to."""
    referenced = [(item.heatmap_bucket, item.heatmap_key) for item in [*results.detections, *results.findings]]
    return sorted({(bucket, key) for bucket, key in referenced if bucket and key})


def flagged_in_findings(detections: list[DetectionResult], findings: list[PolypFinding]) -> int:
    """Count the flagged frames that lie within a finding's frame range of the same procedure."""
    spans = [(finding.procedure_id, finding.first_sequence, finding.last_sequence) for finding in findings]
    return sum(
        any(result.procedure_id == procedure and first <= result.sequence <= last for procedure, first, last in spans)
        for result in detections
        if result.flagged
    )


def _model_name(result: DetectionResult) -> str:
    return f"{result.model.name} version {result.model.version}"


def _object_exists(minio, bucket: str, key: str) -> bool:  # noqa: ANN001
    try:
        minio.stat_object(bucket, key)
    except S3Error:
        return False
    return True


def _percentile(values: list[float], percent: float) -> float | None:
    if not values:
        return None
    index = min(len(values) - 1, max(0, round(percent / 100.0 * (len(values) - 1))))
    return round(values[index], 1)


def render_summary(summary: dict[str, Any], settings: Settings, run_dir: Path, summary_path: Path) -> str:
    """Render the summary as the text a user reads at the end of the demo."""
    frames = summary["frames"]
    lines = [
        "",
        "=== CRC-MedAI demo summary (built from the result topics, MinIO and the FHIR consumer) ===",
        f"status: {'complete' if summary['complete'] else 'INCOMPLETE'} in {summary['seconds']} s",
        f"frames processed: {frames['processed']}/{frames['expected']}, "
        f"capture-to-result latency p50 {frames['latency_ms_p50']} ms, p95 {frames['latency_ms_p95']} ms",
        f"flagged: {frames['flagged']} frames ({frames['flagged_in_findings']} of them in findings; "
        "the rest too short-lived to confirm as a polyp)",
        f"frames skipped as stale (older than the latency budget, not examined): {frames['skipped_stale']}",
        f"detection model: {frames['model']}",
        f"polyp findings: {len(summary['findings'])} (one per polyp tracked across frames; false flags count too)",
    ]

    for finding in summary["findings"]:
        lines.append(
            f"  frames {finding['frames']} ({finding['frames_flagged']} flagged, {finding['status']}): "
            f"peak confidence {finding['peak_confidence']} at frame {finding['peak_frame']}, "
            f"heatmap {finding['heatmap']}"
        )

    heatmaps = summary["heatmaps"]
    lines.append(
        f"heatmaps in MinIO (referenced by detection results or findings): {heatmaps['stored']} stored, "
        f"{len(heatmaps['missing'])} missing"
    )

    prognoses = summary["prognoses"]
    lines.append(f"recurrence risk: {prognoses['received']}/{prognoses['expected']} patients")
    for patient in prognoses["patients"]:
        lines.append(
            f"  {patient['patient']}: {patient['recurrence_probability']:.1%} within "
            f"{patient['horizon_years']:g} years ({patient['risk_group']} risk); "
            f"top SHAP contributions on the {patient['explanation_scale']} scale, positive raises the risk: "
            + "; ".join(patient["top_contributions"])
        )
        if patient["missing"]:
            lines.append(f"    missing from the record: {', '.join(patient['missing'])}")

    lines.append(f"FHIR resources written: {summary['fhir_resources']}")
    lines.append(f"dead-lettered: {len(summary['dead_letters'])}")
    for dead in summary["dead_letters"]:
        lines.append(f"  {dead['topic']} {dead['source'] or ''}: {dead['error']}")

    if summary["stopped_services"]:
        lines.append(f"services that stopped early: {summary['stopped_services']} (see their logs)")
    lines += [
        "where to find every output:",
        f"  Kafka topics ({settings.kafka_bootstrap_servers}): {settings.topic('detections')}, "
        f"{settings.topic('findings')}, {settings.topic('prognoses')}, "
        f"{settings.topic('fhir-resources')}, {settings.topic('dlq.*')}",
        f"  heatmaps: MinIO bucket {settings.heatmap_bucket} at http://{settings.minio_endpoint} "
        f"(keys heatmaps/<procedure>/...)",
        f"  FHIR resources: {run_dir / 'fhir'}",
        f"  service logs: {run_dir / 'logs'}",
        f"  this summary as JSON: {summary_path}",
    ]
    if summary["latency_picture"]:
        lines.append(f"  latency and throughput picture: {summary['latency_picture']} (and .html beside it)")
    return "\n".join(lines)
