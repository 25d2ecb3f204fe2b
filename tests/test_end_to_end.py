"""End to end through the real broker: video and Bundles in, results, heatmaps and Observations out."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator

import pytest
from fhir.resources.R4B import get_fhir_model_class

from crc_medai.demo import Results
from crc_medai.kafka import Record, collect_records
from crc_medai.settings import REPO_ROOT, Settings
from crc_medai.storage import create_minio
from producers.frames import publish_video
from producers.records import publish_records
from schemas.messages import FhirResourceEvent
from tests.conftest import RunningServices, isolated_settings, running_services

pytestmark = pytest.mark.integration

VIDEO = REPO_ROOT / "samples" / "video" / "procedure-demo.mp4"
RECORDS = REPO_ROOT / "samples" / "records"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def ground_truth_episodes() -> list[tuple[int, int]]:
    """Return the first and last frame of every polyp episode of the sample video."""
    truth = json.loads(VIDEO.with_suffix(".json").read_text(encoding="utf-8"))
    return [tuple(frames) for polyp in truth["polyps"] for frames in polyp["frame_ranges"]]


@pytest.fixture(scope="module")
def e2e_settings(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    settings = isolated_settings(stack, tmp_path_factory.mktemp("e2e") / "out")
    # The video is published as fast as possible, so its frames are older than a live latency budget.
    return settings.model_copy(update={"detection_latency_budget_ms": 0.0})


@pytest.fixture(scope="module")
def services(e2e_settings: Settings) -> Iterator[RunningServices]:
    yield from running_services(
        e2e_settings, e2e_settings.output_dir / "logs", ("detection", "prognosis", "fhir-consumer")
    )


@pytest.fixture(scope="module")
def results(e2e_settings: Settings, services: RunningServices) -> tuple[Results, int, int]:
    settings = e2e_settings
    record_summary = asyncio.run(publish_records(settings, [RECORDS]))
    frame_summary = asyncio.run(publish_video(settings, VIDEO, "proc-e2e-0001", realtime=False, patient_id="pt-0001"))
    frames = frame_summary.frames_published
    patients = len(record_summary.published)

    def complete(received: list[Record]) -> bool:
        parsed = Results.parse(received, settings)
        return parsed.complete(frames, patients) or services.any_stopped()

    received = asyncio.run(
        collect_records(
            settings, ["detections", "findings", "prognoses", "fhir-resources"], until=complete, timeout_s=420
        )
    )
    return Results.parse(received, settings), frames, patients


def test_every_frame_gets_a_detection(results: tuple[Results, int, int]) -> None:
    parsed, frames, _ = results
    sequences = sorted(result.sequence for result in parsed.detections)

    assert frames > 0
    assert sequences == list(range(frames))
    assert {result.procedure_id for result in parsed.detections} == {"proc-e2e-0001"}


def test_polyps_are_flagged_with_heatmaps_in_minio(e2e_settings: Settings, results: tuple[Results, int, int]) -> None:
    parsed, _, _ = results
    flagged = [result for result in parsed.detections if result.flagged]
    minio = create_minio(e2e_settings)

    assert flagged, "the sample video shows polyps, but no frame was flagged"
    assert len(flagged) < len(parsed.detections), "every frame was flagged, including polyp-free stretches"
    # Grad-CAM runs on flagged frames only, at a bounded rate per procedure.
    explained = [result for result in flagged if result.heatmap_key]
    assert explained, "no flagged frame got a heatmap"
    for result in explained:
        assert result.heatmap_bucket == e2e_settings.heatmap_bucket
        assert result.explanation_method
    response = minio.get_object(explained[0].heatmap_bucket, explained[0].heatmap_key)
    try:
        assert response.read(8) == PNG_SIGNATURE
    finally:
        response.close()
        response.release_conn()
    for result in parsed.detections:
        if not result.flagged:
            assert result.heatmap_key is None


def test_each_polyp_gives_one_closed_finding(results: tuple[Results, int, int]) -> None:
    parsed, _, _ = results
    findings = parsed.latest_findings()
    flagged = [result for result in parsed.detections if result.flagged]

    assert findings, "flagged frames produced no finding"
    assert len(findings) < len(flagged), "findings were not aggregated across frames"
    assert all(finding.status == "closed" for finding in findings)
    # Flags too short-lived to confirm a finding are dropped by the tracker.
    assert sum(finding.frames_flagged for finding in findings) <= len(flagged)
    episodes = [range(first, last + 1) for first, last in ground_truth_episodes()]
    for episode in episodes:
        assert any(
            finding.first_sequence <= episode[-1] and finding.last_sequence >= episode[0] for finding in findings
        ), f"no finding covers the polyp seen on frames {episode[0]}-{episode[-1]}"
    assert len(findings) <= len(episodes) + 2, f"{len(findings)} findings for {len(episodes)} polyps"
    for finding in findings:
        assert finding.first_sequence <= finding.representative_sequence <= finding.last_sequence
        assert finding.heatmap_key
    # Each finding opens before it closes. A second open event repeats the first with the heatmap that
    # was not ready when the finding was confirmed.
    for finding in findings:
        events = [event for event in parsed.findings if event.finding_id == finding.finding_id]
        statuses = [event.status for event in events]
        assert statuses in (["open", "closed"], ["open", "open", "closed"]), statuses
        if len(events) == 3:
            assert events[0].heatmap_key is None
            assert events[1].heatmap_key


def test_every_patient_gets_a_prognosis(results: tuple[Results, int, int]) -> None:
    parsed, _, patients = results

    assert patients >= 1
    assert len(parsed.prognoses) == patients
    for result in parsed.prognoses:
        assert 0.0 <= result.recurrence_probability <= 1.0
        assert result.contributions
        total = result.base_value + sum(item.contribution for item in result.contributions)
        assert result.explanation_scale == "log-hazard"
        assert total == pytest.approx(result.model_output, abs=1e-6)
        assert [item.horizon_years for item in result.probabilities] == [3.0, 5.0]
        assert result.probabilities[0].probability <= result.probabilities[1].probability
        assert result.decision_path


# Resources the FHIR consumer builds from each input: per finding event and per prognosis result.
def test_fhir_resources_are_valid(e2e_settings: Settings, results: tuple[Results, int, int]) -> None:
    parsed, _, patients = results
    findings = parsed.latest_findings()
    latest: dict[str, FhirResourceEvent] = {event.resource_id: event for event in parsed.resources}
    kinds = Counter(event.resource_type for event in latest.values())
    written = {path.stem for path in (e2e_settings.output_dir / "fhir").rglob("*.json")}

    assert parsed.fhir_complete()
    assert kinds["RiskAssessment"] == patients
    assert kinds["Observation"] == len(findings) + patients
    assert kinds["DiagnosticReport"] == len({finding.procedure_id for finding in findings})
    assert kinds["Media"] == len(findings)
    assert kinds["Device"] == 2
    assert written == set(latest)
    for event in parsed.resources:
        resource = get_fhir_model_class(event.resource_type).model_validate(event.resource)
        assert resource.id == event.resource_id
    systems = {
        event.resource_id: event.resource["identifier"][0]["system"]
        for event in latest.values()
        if event.resource_type == "Observation"
    }
    risk = [latest[key].resource for key, system in systems.items() if system == "urn:crc-medai:risk-observation"]
    assert len(risk) == patients
    # The frames named the patient examined, so the finding resources name it as their subject.
    for event in latest.values():
        if (
            event.resource_type in ("Media", "DiagnosticReport")
            or systems.get(event.resource_id) == "urn:crc-medai:finding"
        ):
            assert event.resource["subject"] == {"reference": "Patient/pt-0001"}
    assert all(resource["component"] for resource in risk)
    on_disk = json.loads(next((e2e_settings.output_dir / "fhir" / "RiskAssessment").glob("*.json")).read_text())
    assert [item["whenRange"]["high"]["value"] for item in on_disk["prediction"]] == [3, 5]


def test_diagnostic_report_lists_every_finding(results: tuple[Results, int, int]) -> None:
    parsed, _, _ = results
    reports = [event.resource for event in parsed.resources if event.resource_type == "DiagnosticReport"]
    observations = {
        event.resource_id
        for event in parsed.resources
        if event.resource.get("code", {}).get("coding", [{}])[0].get("code") == "68496003"
    }

    assert reports
    assert reports[-1]["status"] == "preliminary"
    assert {item["reference"] for item in reports[-1]["result"]} == {f"Observation/{item}" for item in observations}
