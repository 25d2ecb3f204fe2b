"""Build FHIR R4 resources from polyp findings and prognosis results.

Resources are validated with fhir.resources' R4B models, which match R4 for
Observation. Resource ids are derived from the finding id or the result's event
id, so a replayed result yields the same resource rather than a duplicate.
"""

from __future__ import annotations

import uuid
from typing import Any

from fhir.resources.R4B.observation import Observation
from pydantic import ValidationError

from crc_medai.errors import ProcessingError
from schemas.messages import PolypFinding, PrognosisResult

#: Namespace of the uuid5 ids given to resources built from results.
RESOURCE_NAMESPACE = uuid.UUID("9b1f4d52-4a43-4f0e-9c56-2a4c7c3f7a10")

SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
#: Local code system for results no standard terminology names (recurrence probability, SHAP terms).
CRC_MEDAI_CODES = "https://crc-medai.example/fhir/CodeSystem/results"
PROCEDURE_IDENTIFIER_SYSTEM = "urn:crc-medai:procedure"
EVENT_IDENTIFIER_SYSTEM = "urn:crc-medai:event"
FINDING_IDENTIFIER_SYSTEM = "urn:crc-medai:finding"

# HL7 v3 ObservationValue "AIAST": the content was asserted by artificial intelligence.
AI_ASSERTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}

# Number of SHAP contributions carried as components of the risk Observation.
TOP_CONTRIBUTIONS = 5


class ResourceValidationError(ProcessingError):
    """A resource built from a result does not validate against the FHIR R4B model."""


def resource_id(kind: str, event_id: uuid.UUID) -> str:
    """Return the stable logical id of the resource of ``kind`` built from ``event_id``."""
    return str(uuid.uuid5(RESOURCE_NAMESPACE, f"{kind}:{event_id}"))


def finding_observation(finding: PolypFinding) -> dict[str, Any]:
    """Build the polyp finding Observation of a finding: one per polyp, updated when it closes."""
    notes = [
        {
            "text": f"Finding {finding.status}: {finding.frames_flagged} flagged frame(s), "
            f"frames {finding.first_sequence}-{finding.last_sequence}, peak probability "
            f"{finding.peak_probability:.3f} at frame {finding.representative_sequence}, "
            f"model {finding.model.name} {finding.model.version}."
        }
    ]
    if finding.heatmap_key:
        notes.append(
            {
                "text": f"Grad-CAM heatmap of frame {finding.representative_sequence}: "
                f"s3://{finding.heatmap_bucket}/{finding.heatmap_key} ({finding.explanation_method})."
            }
        )
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": resource_id("finding", finding.finding_id),
        "meta": {"security": [AI_ASSERTED]},
        "identifier": [{"system": FINDING_IDENTIFIER_SYSTEM, "value": str(finding.finding_id)}],
        "status": "preliminary",
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"}]}],
        "code": {
            "coding": [{"system": SNOMED, "code": "68496003", "display": "Polyp of colon"}],
            "text": "Polyp of colon detected in colonoscopy video",
        },
        "focus": [{"identifier": {"system": PROCEDURE_IDENTIFIER_SYSTEM, "value": finding.procedure_id}}],
        "effectivePeriod": {"start": finding.first_seen.isoformat(), "end": finding.last_seen.isoformat()},
        "issued": finding.source_ts.isoformat(),
        "valueQuantity": {
            "value": round(finding.peak_probability, 4),
            "unit": "probability",
            "system": UCUM,
            "code": "1",
        },
        "method": {"text": finding.explanation_method or "U-Net polyp segmentation with presence head"},
        "note": notes,
    }
    if finding.region is not None:
        region = finding.region
        resource["bodySite"] = {
            "text": f"Frame {finding.representative_sequence} region x={region.x} y={region.y} "
            f"w={region.width} h={region.height} px"
        }
    return validate(resource)


def risk_observation(result: PrognosisResult) -> dict[str, Any]:
    """Build the recurrence risk Observation; components carry the top SHAP contributions."""
    horizon = f"{result.horizon_years:g}"
    components = [
        {
            "code": {
                "coding": [{"system": CRC_MEDAI_CODES, "code": f"shap-{item.feature}"}],
                "text": f"SHAP contribution of {item.label} = {item.display_value}",
            },
            "valueQuantity": {"value": round(item.contribution, 6), "unit": result.explanation_scale},
        }
        for item in result.contributions[:TOP_CONTRIBUTIONS]
    ]
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": resource_id("risk", result.event_id),
        "meta": {"security": [AI_ASSERTED]},
        "identifier": [{"system": EVENT_IDENTIFIER_SYSTEM, "value": str(result.event_id)}],
        "status": "preliminary",
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "survey", "display": "Survey"}]}],
        "code": {
            "coding": [{"system": CRC_MEDAI_CODES, "code": f"recurrence-risk-{horizon}y"}],
            "text": f"Probability of colon cancer recurrence within {horizon} years",
        },
        "subject": {"reference": f"Patient/{result.patient_id}"},
        "effectiveDateTime": result.source_ts.isoformat(),
        "valueQuantity": {
            "value": round(result.recurrence_probability, 4),
            "unit": "probability",
            "system": UCUM,
            "code": "1",
        },
        "interpretation": [{"text": f"{result.risk_group} risk"}],
        "method": {"text": f"CatBoost {result.model.name} {result.model.version}, SHAP TreeExplainer"},
        "component": components,
    }
    if result.missing_features:
        resource["note"] = [{"text": "Missing from the record: " + ", ".join(result.missing_features)}]
    return validate(resource)


def validate(resource: dict[str, Any]) -> dict[str, Any]:
    """Validate a resource with the R4B model and return its JSON form."""
    try:
        model = Observation.model_validate(resource)
    except ValidationError as exc:
        raise ResourceValidationError(
            f"Observation {resource.get('id')} is not valid FHIR: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"
        ) from exc
    return model.model_dump(mode="json", exclude_none=True)
