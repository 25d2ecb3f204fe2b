"""FHIR Observations built from results: validity, stable ids and content."""

from __future__ import annotations

import uuid

from fhir.resources.R4B.observation import Observation

from consumers.fhir_consumer import write_resource
from consumers.resources import TOP_CONTRIBUTIONS, finding_observation, resource_id, risk_observation
from schemas.messages import FeatureContribution, ModelRef, PolypFinding, PrognosisResult, Region, utc_now

MODEL = ModelRef(name="polyp-unet", version="1")


def finding(**changes) -> PolypFinding:
    now = utc_now()
    fields = {
        "finding_id": uuid.uuid4(),
        "procedure_id": "proc-1",
        "status": "closed",
        "first_sequence": 40,
        "last_sequence": 55,
        "first_seen": now,
        "last_seen": now,
        "frames_flagged": 14,
        "peak_probability": 0.93,
        "representative_sequence": 42,
        "region": Region(x=10, y=20, width=30, height=40),
        "heatmap_key": "heatmaps/proc-1/000042.png",
        "heatmap_bucket": "crc-heatmaps",
        "explanation_method": "Grad-CAM on encoder stage 4, presence logit",
        "model": MODEL,
    }
    fields.update(changes)
    return PolypFinding(**fields)


def prognosis(contributions: int = 8, missing: list[str] | None = None) -> PrognosisResult:
    return PrognosisResult(
        record_event_id=uuid.uuid4(),
        patient_id="pt-0001",
        horizon_years=5,
        recurrence_probability=0.61,
        risk_group="high",
        base_value=-0.1,
        contributions=[
            FeatureContribution(
                feature=f"f{index}", label=f"Feature {index}", value=index, display_value=str(index), contribution=0.1
            )
            for index in range(contributions)
        ],
        missing_features=missing or [],
        model=ModelRef(name="recurrence-catboost", version="1"),
        inference_ms=2.0,
    )


def test_finding_observation_is_valid() -> None:
    resource = finding_observation(finding())

    assert Observation.model_validate(resource).id == resource["id"]
    assert resource["code"]["coding"][0] == {
        "system": "http://snomed.info/sct",
        "code": "68496003",
        "display": "Polyp of colon",
    }
    assert resource["valueQuantity"]["value"] == 0.93
    assert resource["meta"]["security"][0]["code"] == "AIAST"
    assert resource["effectivePeriod"]["start"] <= resource["effectivePeriod"]["end"]
    assert any("s3://crc-heatmaps/heatmaps/proc-1/000042.png" in note["text"] for note in resource["note"])


def test_finding_id_is_stable_per_finding() -> None:
    opened = finding(status="open")
    closed = finding(finding_id=opened.finding_id, status="closed")

    first = finding_observation(opened)
    second = finding_observation(closed)

    assert first["id"] == second["id"] == resource_id("finding", opened.finding_id)
    assert finding_observation(finding())["id"] != first["id"]


def test_finding_without_region_or_heatmap() -> None:
    resource = finding_observation(finding(region=None, heatmap_key=None, heatmap_bucket=None))

    assert "bodySite" not in resource
    assert len(resource["note"]) == 1


def test_risk_observation_carries_top_contributions() -> None:
    resource = risk_observation(prognosis(contributions=8))

    assert Observation.model_validate(resource).subject.reference == "Patient/pt-0001"
    assert len(resource["component"]) == TOP_CONTRIBUTIONS
    assert resource["valueQuantity"]["value"] == 0.61
    assert resource["code"]["text"] == "Probability of colon cancer recurrence within 5 years"


def test_risk_observation_reports_missing_features() -> None:
    resource = risk_observation(prognosis(missing=["nodes", "differ"]))

    assert resource["note"][0]["text"] == "Missing from the record: nodes, differ"


def test_write_resource_replaces_same_id(tmp_path) -> None:
    resource = finding_observation(finding())

    first = write_resource(tmp_path, resource)
    second = write_resource(tmp_path, resource)

    assert first == second
    assert list((tmp_path / "fhir" / "Observation").iterdir()) == [first]
