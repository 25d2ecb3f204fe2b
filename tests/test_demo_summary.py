"""The demo summary: heatmap counts, flagged frames in findings, the model name and the SHAP scale."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from crc_medai.demo import Results, build_summary, flagged_in_findings, referenced_heatmaps, render_summary
from crc_medai.settings import Settings
from crc_medai.storage import create_minio, ensure_bucket, put_png
from schemas.messages import (
    DetectionResult,
    FeatureContribution,
    HorizonProbability,
    ModelRef,
    PolypFinding,
    PrognosisResult,
    utc_now,
)

MODEL = ModelRef(name="polyp-unet", version="1")
START = utc_now()


def detection(
    sequence: int, flagged: bool, heatmap_key: str | None = None, bucket: str = "b", stale: bool = False
) -> DetectionResult:
    return DetectionResult(
        frame_event_id=uuid.uuid4(),
        procedure_id="proc-demo",
        sequence=sequence,
        captured_at=START + timedelta(milliseconds=33 * sequence),
        polyp_probability=0.9 if flagged else 0.1,
        flagged=flagged,
        model=MODEL,
        inference_ms=1.0,
        heatmap_key=heatmap_key,
        heatmap_bucket=bucket if heatmap_key else None,
        skipped_reason="stale" if stale else None,
    )


def finding(first: int, last: int, heatmap_key: str, bucket: str = "b") -> PolypFinding:
    return PolypFinding(
        finding_id=uuid.uuid4(),
        procedure_id="proc-demo",
        status="closed",
        first_sequence=first,
        last_sequence=last,
        first_seen=START,
        last_seen=START,
        frames_flagged=last - first + 1,
        peak_probability=0.9,
        representative_sequence=first,
        heatmap_key=heatmap_key,
        heatmap_bucket=bucket,
        model=MODEL,
    )


def prognosis() -> PrognosisResult:
    return PrognosisResult(
        record_event_id=uuid.uuid4(),
        patient_id="pt-demo",
        horizon_years=5,
        recurrence_probability=0.4,
        risk_group="intermediate",
        base_value=0.0,
        contributions=[
            FeatureContribution(
                feature="nodes", label="Positive lymph nodes", value=4, display_value="4", contribution=0.5
            )
        ],
        model=ModelRef(name="crc-recurrence-survival-catboost", version="2"),
        inference_ms=1.0,
        explanation_scale="log-hazard",
        probabilities=[HorizonProbability(horizon_years=5, probability=0.4)],
    )


def demo_results(bucket: str) -> Results:
    # Frames 2-4 form a finding; frame 8 is flagged alone. Frame 2's heatmap is in its result,
    # frame 3's only in the finding (a rate-limited frame explained later).
    return Results(
        detections=[
            detection(0, False),
            detection(1, False, stale=True),
            detection(2, True, "heatmaps/p/2.png", bucket),
            detection(3, True),
            detection(4, True),
            detection(8, True),
        ],
        findings=[finding(2, 4, "heatmaps/p/3.png", bucket), finding(2, 4, "heatmaps/p/2.png", bucket)],
        prognoses=[prognosis()],
    )


def test_referenced_heatmaps_from_both_topics() -> None:
    assert referenced_heatmaps(demo_results("b")) == [("b", "heatmaps/p/2.png"), ("b", "heatmaps/p/3.png")]


def test_flagged_in_findings_counts_span() -> None:
    results = demo_results("b")

    assert flagged_in_findings(results.detections, results.findings) == 3


@pytest.mark.integration
def test_summary_counts_and_wording(settings: Settings, tmp_path: Path) -> None:
    minio = create_minio(settings)
    ensure_bucket(minio, settings.heatmap_bucket)
    put_png(minio, settings.heatmap_bucket, "heatmaps/p/2.png", b"\x89PNG")
    put_png(minio, settings.heatmap_bucket, "heatmaps/p/3.png", b"\x89PNG")

    summary = build_summary(
        settings,
        demo_results(settings.heatmap_bucket),
        expected_detections=6,
        expected_prognoses=1,
        rejected_files={},
        complete=True,
        stopped=[],
        seconds=1.0,
    )
    text = render_summary(summary, settings, tmp_path, tmp_path / "summary.json")

    assert summary["heatmaps"] == {"stored": 2, "missing": []}
    assert summary["complete"] is True
    assert "heatmaps in MinIO (referenced by detection results or findings): 2 stored, 0 missing" in text
    assert "flagged: 4 frames (3 of them in findings; the rest too short-lived" in text
    assert "frames skipped as stale (older than the latency budget, not examined): 1" in text
    assert "detection model: polyp-unet version 1" in text
    assert "on the log-hazard scale, positive raises the risk: Positive lymph nodes = 4: +0.500" in text


@pytest.mark.integration
def test_summary_reports_missing_heatmap(settings: Settings, tmp_path: Path) -> None:
    minio = create_minio(settings)
    ensure_bucket(minio, settings.heatmap_bucket)
    put_png(minio, settings.heatmap_bucket, "heatmaps/p/2.png", b"\x89PNG")

    summary = build_summary(
        settings,
        demo_results(settings.heatmap_bucket),
        expected_detections=6,
        expected_prognoses=1,
        rejected_files={},
        complete=True,
        stopped=[],
        seconds=1.0,
    )

    assert summary["heatmaps"] == {"stored": 1, "missing": ["heatmaps/p/3.png"]}
    assert summary["complete"] is False
