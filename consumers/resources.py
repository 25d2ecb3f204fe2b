"""Build FHIR R4 resources from polyp findings and prognosis results.

Every resource is validated with fhir.resources' R4B models, which match R4
for the resources built here, before it leaves this module. Each one has a
deterministic ``id`` (a uuid5 of its kind and natural key) and an
``identifier`` with system ``urn:crc-medai:<kind>``, so a replayed result
yields the same resource rather than a duplicate, and a FHIR server can key
conditional updates on the identifier. References between emitted resources
use ``Type/id``. Resources we do not emit (the patient's record, the
procedure) are referred to by identifier only.
"""

from __future__ import annotations

import html
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from crc_medai.errors import ProcessingError
from schemas.messages import ModelRef, PolypFinding, PrognosisResult

#: Namespace of the uuid5 ids given to resources built from results.
RESOURCE_NAMESPACE = uuid.UUID("9b1f4d52-4a43-4f0e-9c56-2a4c7c3f7a10")

SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
MEDIA_TYPE = "http://terminology.hl7.org/CodeSystem/media-type"
RISK_PROBABILITY = "http://terminology.hl7.org/CodeSystem/risk-probability"
#: Local code system for results no standard terminology names (recurrence probability, SHAP terms, regions).
CRC_MEDAI_CODES = "https://crc-medai.example/fhir/CodeSystem/results"

PROCEDURE_IDENTIFIER_SYSTEM = "urn:crc-medai:procedure"
PATIENT_RECORD_IDENTIFIER_SYSTEM = "urn:crc-medai:patient-record"
FINDING_IDENTIFIER_SYSTEM = "urn:crc-medai:finding"
HEATMAP_IDENTIFIER_SYSTEM = "urn:crc-medai:heatmap"
RISK_OBSERVATION_IDENTIFIER_SYSTEM = "urn:crc-medai:risk-observation"
RISK_ASSESSMENT_IDENTIFIER_SYSTEM = "urn:crc-medai:risk-assessment"
DEVICE_IDENTIFIER_SYSTEM = "urn:crc-medai:device"

# HL7 v3 ObservationValue "AIAST": the content was asserted by artificial intelligence.
AI_ASSERTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}

# Number of SHAP contributions carried as components of the risk Observation.
TOP_CONTRIBUTIONS = 5

#: Risk groups of PrognosisResult mapped to the R4 risk-probability codes.
RISK_GROUP_CODES = {"low": "low", "intermediate": "moderate", "high": "high"}

PROBABILITY_UNIT = {"unit": "probability", "system": UCUM, "code": "1"}


class ResourceValidationError(ProcessingError):
    """A resource built from a result does not validate against the FHIR R4B model."""


def resource_id(kind: str, key: uuid.UUID | str) -> str:
    """Return the stable logical id of the resource of ``kind`` built from the natural ``key``."""
    return str(uuid.uuid5(RESOURCE_NAMESPACE, f"{kind}:{key}"))


def device_key(model: ModelRef) -> str:
    """Return the natural key of a model version, the value of its Device identifier."""
    return f"{model.name}:{model.version}"


def device_reference(model: ModelRef) -> dict[str, str]:
    """Return the reference to the Device of a model version."""
    return {"reference": f"Device/{resource_id('device', device_key(model))}", "display": device_key(model)}


def narrative(lines: Sequence[str]) -> dict[str, str]:
    """Return a generated narrative (``Resource.text``) with one XHTML paragraph per line."""
    paragraphs = "".join(f"<p>{html.escape(line)}</p>" for line in lines)
    return {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{paragraphs}</div>'}


def patient_reference(patient_id: str) -> dict[str, str]:
    """Return the reference to a patient by the pseudonym the records and frames share."""
    return {"reference": f"Patient/{patient_id}"}


def procedure_reference(procedure_id: str) -> dict[str, Any]:
    """Return a logical reference to the colonoscopy Procedure, which this system does not emit."""
    return {
        "type": "Procedure",
        "identifier": {"system": PROCEDURE_IDENTIFIER_SYSTEM, "value": procedure_id},
        "display": f"Colonoscopy {procedure_id}",
    }


def prognosis_key(result: PrognosisResult) -> str:
    """Return the natural key of a prognosis: the scored record and the model version that scored it.

    Scoring the same record again with the same model gives the same key, so
    the same RiskAssessment and risk Observation.
    """
    return f"{result.record_event_id}:{device_key(result.model)}"


# Polyp findings


def seen_period(finding: PolypFinding) -> dict[str, str]:
    """Return the Period from the first to the last flagged frame.

    Raises:
        ResourceValidationError: ``last_seen`` is before ``first_seen``, which FHIR's Period rule per-1 forbids.
    """
    if finding.last_seen < finding.first_seen:
        raise ResourceValidationError(
            f"finding {finding.finding_id} has last_seen {finding.last_seen.isoformat()} before first_seen "
            f"{finding.first_seen.isoformat()}; the detection processor must send capture times in order"
        )
    return {"start": finding.first_seen.isoformat(), "end": finding.last_seen.isoformat()}


def heatmap_media(finding: PolypFinding) -> dict[str, Any] | None:
    """Build the Media of a finding's Grad-CAM heatmap (the MinIO object), or None when it has none."""
    if not finding.heatmap_key or not finding.heatmap_bucket:
        return None
    method = finding.explanation_method or "Grad-CAM"
    resource: dict[str, Any] = {
        "resourceType": "Media",
        "id": resource_id("heatmap", finding.finding_id),
        "meta": {"security": [AI_ASSERTED]},
        "identifier": [{"system": HEATMAP_IDENTIFIER_SYSTEM, "value": str(finding.finding_id)}],
        "status": "completed",
        "type": {"coding": [{"system": MEDIA_TYPE, "code": "image", "display": "Image"}]},
        "partOf": [procedure_reference(finding.procedure_id)],
        "createdPeriod": seen_period(finding),
        "issued": finding.source_ts.isoformat(),
        "device": device_reference(finding.model),
        "content": {
            "contentType": "image/png",
            "url": f"s3://{finding.heatmap_bucket}/{quote(finding.heatmap_key)}",
            "title": f"Grad-CAM heatmap of frame {finding.representative_sequence} ({method})",
        },
    }
    if finding.patient_id:
        resource["subject"] = patient_reference(finding.patient_id)
    resource["text"] = narrative([resource["content"]["title"], resource["content"]["url"]])
    return validate(resource)


#: Method of every finding Observation: the detection model, not the heatmap.
DETECTION_METHOD = "U-Net polyp segmentation with presence head"


def finding_observation(finding: PolypFinding) -> dict[str, Any]:
    """Build the polyp finding Observation of a finding: one per polyp, updated when it closes.

    ``subject`` names the patient when the capture agent sent the patient's
    pseudonym with the frames; ``partOf`` refers to the procedure by identifier.
    """
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": resource_id("finding", finding.finding_id),
        "meta": {"security": [AI_ASSERTED]},
        "identifier": [{"system": FINDING_IDENTIFIER_SYSTEM, "value": str(finding.finding_id)}],
        "partOf": [procedure_reference(finding.procedure_id)],
        "status": "preliminary",
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"}]}],
        "code": {
            "coding": [{"system": SNOMED, "code": "68496003", "display": "Polyp of colon"}],
            "text": "Polyp of colon detected in colonoscopy video",
        },
        "effectivePeriod": seen_period(finding),
        "issued": finding.source_ts.isoformat(),
        "valueQuantity": {"value": round(finding.peak_probability, 4), **PROBABILITY_UNIT},
        # The heatmap's method is in the Media title, so an event with or without a heatmap names the same method.
        "method": {"text": DETECTION_METHOD},
        "device": device_reference(finding.model),
        "component": _finding_components(finding),
        "note": [{"text": _finding_summary(finding)}],
    }
    if finding.patient_id:
        resource["subject"] = patient_reference(finding.patient_id)
    resource["text"] = narrative(_finding_narrative(finding))
    media = heatmap_media(finding)
    if media is not None:
        resource["derivedFrom"] = [{"reference": f"Media/{media['id']}", "display": media["content"]["title"]}]
    return validate(resource)


def _finding_summary(finding: PolypFinding) -> str:
    return (
        f"Finding {finding.status}: {finding.frames_flagged} flagged frame(s), "
        f"frames {finding.first_sequence}-{finding.last_sequence}, peak probability "
        f"{finding.peak_probability:.3f} at frame {finding.representative_sequence}, "
        f"model {finding.model.name} {finding.model.version}."
    )


def _finding_narrative(finding: PolypFinding) -> list[str]:
    lines = [f"Polyp of colon detected by AI in colonoscopy {finding.procedure_id}.", _finding_summary(finding)]
    if finding.region is not None:
        region = finding.region
        lines.append(
            f"Region in frame {finding.representative_sequence}: x={region.x} y={region.y} "
            f"width={region.width} height={region.height} pixels."
        )
    return lines


def _finding_components(finding: PolypFinding) -> list[dict[str, Any]]:
    """Components: the representative frame, the flagged frame count and the region in that frame."""
    components = [
        _component(
            "representative-frame", "Frame with the peak probability", valueInteger=finding.representative_sequence
        ),
        _component("frames-flagged", "Number of flagged frames", valueInteger=finding.frames_flagged),
    ]
    if finding.region is not None:
        region = finding.region
        for name, value in (("x", region.x), ("y", region.y), ("width", region.width), ("height", region.height)):
            text = f"Region {name} in the representative frame, pixels from the top left corner"
            if name in {"width", "height"}:
                text = f"Region {name} in the representative frame, pixels"
            components.append(_component(f"region-{name}", text, valueInteger=value))
    return components


def _component(code: str, text: str, **value: Any) -> dict[str, Any]:
    return {"code": {"coding": [{"system": CRC_MEDAI_CODES, "code": code}], "text": text}, **value}


# Prognosis results


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
    key = prognosis_key(result)
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": resource_id("risk-observation", key),
        "meta": {"security": [AI_ASSERTED]},
        "identifier": [{"system": RISK_OBSERVATION_IDENTIFIER_SYSTEM, "value": key}],
        "status": "preliminary",
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "survey", "display": "Survey"}]}],
        "code": {
            "coding": [{"system": CRC_MEDAI_CODES, "code": f"recurrence-risk-{horizon}y"}],
            "text": f"Probability of colon cancer recurrence within {horizon} years",
        },
        "subject": patient_reference(result.patient_id),
        "effectiveDateTime": result.source_ts.isoformat(),
        "valueQuantity": {"value": round(result.recurrence_probability, 4), **PROBABILITY_UNIT},
        "interpretation": [{"text": f"{result.risk_group} risk"}],
        "method": {"text": _prognosis_method(result)},
        "device": device_reference(result.model),
        "component": components,
    }
    if result.missing_features:
        resource["note"] = [{"text": "Missing from the record: " + ", ".join(result.missing_features)}]
    resource["text"] = narrative(
        [
            f"{resource['code']['text']}: {result.recurrence_probability:.1%} ({result.risk_group} risk), "
            f"model {result.model.name} {result.model.version}.",
            *result.top_contributions,
        ]
    )
    return validate(resource)


def risk_assessment(result: PrognosisResult) -> dict[str, Any]:
    """Build the RiskAssessment of a prognosis: one prediction per horizon (3 and 5 years for model 2.x).

    NOTE: ``basis`` refers to the whole patient record by identifier, because
    PrognosisResult does not list the ids of the record's resources that the
    features were read from.
    """
    key = prognosis_key(result)
    resource: dict[str, Any] = {
        "resourceType": "RiskAssessment",
        "id": resource_id("risk-assessment", key),
        "meta": {"security": [AI_ASSERTED]},
        "identifier": [{"system": RISK_ASSESSMENT_IDENTIFIER_SYSTEM, "value": key}],
        "status": "preliminary",
        "method": {"text": _prognosis_method(result)},
        "code": {
            "coding": [{"system": CRC_MEDAI_CODES, "code": "recurrence-risk"}],
            "text": "Risk of colon cancer recurrence",
        },
        "subject": patient_reference(result.patient_id),
        "occurrenceDateTime": result.source_ts.isoformat(),
        "performer": device_reference(result.model),
        "basis": [
            {
                "type": "Bundle",
                "identifier": {"system": PATIENT_RECORD_IDENTIFIER_SYSTEM, "value": str(result.record_event_id)},
                "display": "Patient record the model features were read from",
            }
        ],
        "prediction": _predictions(result),
        "note": _assessment_notes(result),
    }
    resource["text"] = narrative(
        [
            f"Recurrence within {item['whenRange']['high']['value']:g} years: {item['probabilityDecimal']:.1%}"
            for item in resource["prediction"]
        ]
        + [f"Risk group: {result.risk_group}. Model {result.model.name} {result.model.version}."]
    )
    return validate(resource)


def _predictions(result: PrognosisResult) -> list[dict[str, Any]]:
    # Model 1.x results carry one horizon only, in horizon_years and recurrence_probability.
    horizons = [(item.horizon_years, item.probability) for item in result.probabilities]
    horizons = horizons or [(result.horizon_years, result.recurrence_probability)]
    rationale = "Largest contributions: " + "; ".join(result.top_contributions) if result.top_contributions else None

    predictions = []
    for years, probability in horizons:
        prediction: dict[str, Any] = {
            "outcome": {
                "coding": [{"system": CRC_MEDAI_CODES, "code": "recurrence"}],
                "text": "Colon cancer recurrence",
            },
            "probabilityDecimal": round(probability, 4),
            "whenRange": {
                "low": {"value": 0, "unit": "years", "system": UCUM, "code": "a"},
                "high": {"value": years, "unit": "years", "system": UCUM, "code": "a"},
            },
        }
        if years == result.horizon_years:
            code = RISK_GROUP_CODES[result.risk_group]
            prediction["qualitativeRisk"] = {
                "coding": [{"system": RISK_PROBABILITY, "code": code}],
                "text": f"{result.risk_group} risk group",
            }
        if rationale:
            prediction["rationale"] = rationale
        predictions.append(prediction)
    return predictions


def _assessment_notes(result: PrognosisResult) -> list[dict[str, str]]:
    notes = []
    if result.decision_path:
        notes.append({"text": "Decision path of the surrogate tree: " + " -> ".join(result.decision_path)})
    if result.missing_features:
        notes.append({"text": "Missing from the record: " + ", ".join(result.missing_features)})
    return notes


def _prognosis_method(result: PrognosisResult) -> str:
    return (
        f"CatBoost model {result.model.name} {result.model.version}; "
        f"contributions by SHAP TreeExplainer on the {result.explanation_scale} scale"
    )


# Validation


def validate(resource: dict[str, Any]) -> dict[str, Any]:
    """Validate a resource with its fhir.resources R4B model and return its JSON form.

    Raises:
        ResourceValidationError: The resource does not match the model; the message names the element.
    """
    resource_type = resource.get("resourceType", "")
    try:
        model_class = get_fhir_model_class(resource_type)
    except (KeyError, ValueError) as exc:
        raise ResourceValidationError(f"resourceType {resource_type!r} is not an R4B resource type") from exc
    try:
        model = model_class.model_validate(resource)
    except ValidationError as exc:
        first = exc.errors()[0]
        location = ".".join(str(part) for part in first["loc"])
        raise ResourceValidationError(
            f"{resource_type} {resource.get('id')} is not valid FHIR R4: {location}: {first['msg']}; "
            "the builder in consumers/ produced it, so fix the builder or the input value it copied"
        ) from exc
    return model.model_dump(mode="json", exclude_none=True)
