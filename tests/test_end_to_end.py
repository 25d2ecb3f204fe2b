"""End to end through the real broker: video and Bundles in, results, heatmaps and Observations out."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from fhir.resources.R4B.observation import Observation

from crc_medai.demo import Results
from crc_medai.kafka import Record, collect_records
from crc_medai.settings import REPO_ROOT, Settings
from crc_medai.storage import create_minio
from producers.frames import publish_video
from producers.records import publish_records
from tests.conftest import RunningServices, isolated_settings, running_services

pytestmark = pytest.mark.integration

VIDEO = REPO_ROOT / "samples" / "video" / "procedure-demo.mp4"
RECORDS = REPO_ROOT / "samples" / "records"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def e2e_settings(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return isolated_settings(stack, tmp_path_factory.mktemp("e2e") / "out")


@pytest.fixture(scope="module")
def services(e2e_settings: Settings) -> Iterator[RunningServices]:
    yield from running_services(
        e2e_settings, e2e_settings.output_dir / "logs", ("detection", "prognosis", "fhir-consumer")
    )


@pytest.fixture(scope="module")
def results(e2e_settings: Settings, services: RunningServices) -> tuple[Results, int, int]:
    settings = e2e_settings
    record_summary = asyncio.run(publish_records(settings, [RECORDS]))
    frame_summary = asyncio.run(publish_video(settings, VIDEO, "proc-e2e-0001", realtime=False))
    frames = frame_summary.frames_published
    patients = len(record_summary.published)

    def complete(received: list[Record]) -> bool:
        return Results.parse(received, settings).complete(frames, patients) or services.any_stopped()

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
    for result in flagged:
        assert result.heatmap_bucket == e2e_settings.heatmap_bucket
        assert result.heatmap_key
        assert result.explanation_method
    response = minio.get_object(flagged[0].heatmap_bucket, flagged[0].heatmap_key)
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
    assert sum(finding.frames_flagged for finding in findings) == len(flagged)
    for finding in findings:
        assert finding.first_sequence <= finding.representative_sequence <= finding.last_sequence
        assert finding.heatmap_key
    statuses = [finding.status for finding in parsed.findings]
    assert statuses.count("open") == statuses.count("closed") == len(findings)


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


def test_observations_are_valid_fhir(e2e_settings: Settings, results: tuple[Results, int, int]) -> None:
    parsed, _, patients = results
    findings = len(parsed.latest_findings())
    written = list((e2e_settings.output_dir / "fhir" / "Observation").glob("*.json"))

    assert len(parsed.resources) == len(parsed.findings) + patients
    assert len({event.resource_id for event in parsed.resources}) == findings + patients
    assert len(written) == findings + patients
    for event in parsed.resources:
        observation = Observation.model_validate(event.resource)
        assert observation.id == event.resource_id
    risk = [event.resource for event in parsed.resources if "subject" in event.resource]
    assert len(risk) == patients
    assert all(resource["component"] for resource in risk)
    on_disk = json.loads(written[0].read_text())
    assert on_disk["resourceType"] == "Observation"
