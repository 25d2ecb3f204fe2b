"""Map one HL7 v2 ADT or ORU message to a FHIR R4 collection Bundle for one patient.

The mapping is modelled on the HL7 v2-to-FHIR implementation guide: PID to
Patient, DG1 to Condition, OBR to DiagnosticReport, OBX to Observation, RXA to
MedicationStatement. It writes what the prognosis features need and what a
reader of the record expects. Only PID-3.1 (the pseudonym), PID-7 and PID-8 are
read from PID, so no names, addresses or other identifiers leave it. The table
is in docs/hl7v2-mapping.md.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from processors.prognosis.fhir_codes import (
    AJCC_SYSTEM,
    ATC_SYSTEM,
    COLON_CANCER,
    ICD10_SYSTEM,
    LOCAL_SYSTEM,
    LOINC_SYSTEM,
    OBSERVATION_CATEGORY_SYSTEM,
    OBSERVATION_MAPPINGS,
    SNOMED_SYSTEM,
)
from producers.hl7.errors import (
    REQUIRED_FIELD_MISSING,
    SEGMENT_SEQUENCE_ERROR,
    TABLE_VALUE_NOT_FOUND,
    UNSUPPORTED_EVENT_CODE,
    UNSUPPORTED_MESSAGE_TYPE,
    UNSUPPORTED_VERSION_ID,
    ErrorLocation,
    Hl7ContentError,
    Hl7ParseError,
    UnsupportedMessageError,
)
from producers.hl7.parser import Hl7Message, Segment, parse_datetime

#: Message types and trigger events handled, by MSH-9.1 message code.
SUPPORTED_EVENTS: dict[str, frozenset[str]] = {
    "ADT": frozenset({"A01", "A04", "A08"}),
    "ORU": frozenset({"R01"}),
}
#: MSH-12 versions whose ADT and ORU segments this mapping reads.
SUPPORTED_VERSIONS = frozenset(
    {"2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2", "2.9", "2.9.1"}
)

YES_NO_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0136"
UCUM_SYSTEM = "http://unitsofmeasure.org"

#: HL7 table 0396 coding system names (CWE.3) to FHIR code system URIs.
#: ``99CRC`` is this project's local table for the codes of LOCAL_SYSTEM, and
#: ``AJCC`` names the AJCC TNM categories, which table 0396 does not list.
CODING_SYSTEMS = {
    "LN": LOINC_SYSTEM,
    "SCT": SNOMED_SYSTEM,
    "I10": ICD10_SYSTEM,
    "ATC": ATC_SYSTEM,
    "UCUM": UCUM_SYSTEM,
    "HL70136": YES_NO_SYSTEM,
    "AJCC": AJCC_SYSTEM,
    "99CRC": LOCAL_SYSTEM,
}

#: PID-8 administrative sex (HL7 table 0001) to Patient.gender, as in the v2-to-FHIR concept map.
#: Numeric codes are rejected: ISO/IEC 5218 sends 1 male and 2 female, while other systems
#: send 0 female and 1 male, so a digit cannot be read safely.
ADMINISTRATIVE_SEX = {"F": "female", "M": "male", "O": "other", "A": "other", "N": "other", "U": "unknown"}

#: OBX-11 observation result status (HL7 table 0085) to Observation.status.
OBSERVATION_STATUS = {
    "F": "final",
    "C": "corrected",
    "P": "preliminary",
    "R": "preliminary",
    "S": "preliminary",
    "I": "registered",
    "O": "registered",
    "X": "cancelled",
    "N": "cancelled",
    "D": "entered-in-error",
    "W": "entered-in-error",
    "U": "final",
}

#: OBR-25 result status (HL7 table 0123) to DiagnosticReport.status; empty maps to ``unknown``.
REPORT_STATUS = {
    "O": "registered",
    "I": "registered",
    "S": "registered",
    "A": "partial",
    "P": "preliminary",
    "R": "preliminary",
    "C": "corrected",
    "F": "final",
    "X": "cancelled",
}

#: RXA-20 completion status (HL7 table 0322) to MedicationStatement.status.
COMPLETION_STATUS = {"CP": "completed", "PA": "completed", "RE": "not-taken", "NA": "not-taken"}

NUMERIC_TYPES = frozenset({"NM", "SN"})
CODED_TYPES = frozenset({"CWE", "CE", "CNE", "CF"})
TEXT_TYPES = frozenset({"ST", "TX", "FT"})
DATE_TYPES = frozenset({"DT", "DTM", "TS"})
SIMPLE_CODE_TYPES = frozenset({"ID", "IS"})
SUPPORTED_VALUE_TYPES = NUMERIC_TYPES | CODED_TYPES | TEXT_TYPES | DATE_TYPES | SIMPLE_CODE_TYPES

#: FHIR id rule, kept to 40 characters because the patient id also prefixes the other resource ids.
PATIENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9\-.]{1,40}$")
NUMBER_PATTERN = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
ENTRY_INDEX = re.compile(r"^Bundle\.entry\[(\d+)\]")
#: HL7 field number behind each FHIR element, by (segment id, element), to locate errors found in the Bundle.
ELEMENT_FIELDS = {
    ("PID", "gender"): 8,
    ("PID", "birthDate"): 7,
    ("PID", "id"): 3,
    ("DG1", "code"): 3,
    ("DG1", "onsetDateTime"): 5,
    ("OBR", "code"): 4,
    ("OBR", "status"): 25,
    ("OBX", "code"): 3,
    ("OBX", "status"): 11,
    ("OBX", "effectiveDateTime"): 14,
    ("OBX", "value"): 5,
    ("OBX", "valueCodeableConcept"): 5,
    ("OBX", "valueQuantity"): 5,
    ("OBX", "valueBoolean"): 5,
    ("OBX", "valueString"): 5,
    ("OBX", "value[x]"): 5,
    ("RXA", "medicationCodeableConcept"): 5,
}
FULL_URL_NAMESPACE = uuid.UUID("5b0c6a8e-2f4d-4c1b-8e8f-6a3d2b9c7e41")

#: Codes of the Observations that feed a model feature, with the category the feature mapping writes.
FEATURE_CATEGORIES = {
    (code.system, code.code): mapping.category for mapping in OBSERVATION_MAPPINGS for code in mapping.codes()
}


@dataclass
class ConvertedMessage:
    """A Bundle built from one HL7 v2 message and the segment behind each entry.

    ``entry_locations[i]`` is the segment that produced ``bundle["entry"][i]``,
    so that an error found in the Bundle can be reported against the segment.
    """

    patient_id: str
    bundle: dict[str, Any]
    message_time: datetime
    entry_locations: list[ErrorLocation] = field(default_factory=list)

    def location_of(self, element: str | None) -> ErrorLocation | None:
        """Return the segment behind an element path such as ``Bundle.entry[3].resource.valueQuantity``.

        The field is added where the element has one HL7 source field, for example OBX-5 for value[x].
        """
        match = ENTRY_INDEX.match(element or "")
        if not match or int(match.group(1)) >= len(self.entry_locations):
            return None
        location = self.entry_locations[int(match.group(1))]
        resource_element = (element or "")[match.end() :].removeprefix(".resource.").split(".")[0].split("[")[0]
        field_number = ELEMENT_FIELDS.get((location.segment, resource_element))
        return replace(location, field=field_number) if field_number else location


class _BundleBuilder:
    """Builder of Bundle entries with deterministic ``urn:uuid`` fullUrls, and of the segment behind each."""

    def __init__(self, message_key: str) -> None:
        self.message_key = message_key
        self.entries: list[dict[str, Any]] = []
        self.locations: list[ErrorLocation] = []

    def add(self, resource: dict[str, Any], location: ErrorLocation) -> str:
        full_url = f"urn:uuid:{uuid.uuid5(FULL_URL_NAMESPACE, f'{self.message_key}/{len(self.entries)}')}"
        self.entries.append({"fullUrl": full_url, "resource": resource})
        self.locations.append(location)
        return full_url


def check_header(message: Hl7Message) -> None:
    """Check MSH-9, MSH-10 and MSH-12 before anything is mapped.

    Raises:
        UnsupportedMessageError: the message type, trigger event or version is not handled (AR).
        Hl7ParseError: MSH-10 is empty, so no acknowledgment can refer to the message (AR).
    """
    header = message.header
    if not message.control_id:
        raise Hl7ParseError(
            "MSH-10 message control id is empty; an acknowledgment cannot refer to the message, so send a unique id",
            header.location(10),
            error_code=REQUIRED_FIELD_MISSING,
        )
    code, event = message.message_code, message.trigger_event
    if code not in SUPPORTED_EVENTS:
        raise UnsupportedMessageError(
            f"message type {code!r} is not handled; send ADT^A01, ADT^A04, ADT^A08 or ORU^R01",
            header.location(9, 1),
            error_code=UNSUPPORTED_MESSAGE_TYPE,
        )
    if event not in SUPPORTED_EVENTS[code]:
        raise UnsupportedMessageError(
            f"trigger event {code}^{event} is not handled; send ADT^A01, ADT^A04, ADT^A08 or ORU^R01",
            header.location(9, 2),
            error_code=UNSUPPORTED_EVENT_CODE,
        )
    if message.version not in SUPPORTED_VERSIONS:
        raise UnsupportedMessageError(
            f"version {message.version!r} is not handled; send HL7 v2.3 to v2.9",
            header.location(12),
            error_code=UNSUPPORTED_VERSION_ID,
        )


def bundle_from_message(message: Hl7Message, received_at: datetime) -> ConvertedMessage:
    """Map an ADT^A01/A04/A08 or ORU^R01 message to a FHIR R4 collection Bundle.

    ``received_at`` (aware) becomes Bundle.timestamp when MSH-7 is empty or has
    no UTC offset.

    Raises:
        UnsupportedMessageError, Hl7ParseError: see :func:`check_header` (AR).
        Hl7ContentError: a required segment or field is missing, or a value
            cannot be mapped (AE); the error names the segment and field.
    """
    check_header(message)
    message_time = _message_time(message, received_at)
    pid = _single_pid(message)
    patient_id = _patient_id(pid)

    builder = _BundleBuilder(f"{message.header.value(4)}/{message.control_id}")
    patient_url = builder.add(_patient(pid, patient_id), pid.location())
    subject = {"reference": patient_url}
    _add_clinical_segments(message, builder, subject, patient_id)

    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": message_time.isoformat(),
        "entry": builder.entries,
    }
    return ConvertedMessage(patient_id, bundle, message_time, builder.locations)


def _message_time(message: Hl7Message, received_at: datetime) -> datetime:
    raw = message.header.value(7)
    if not raw:
        return received_at
    moment = parse_datetime(raw, message.header.location(7))
    return moment.instant or received_at


def _single_pid(message: Hl7Message) -> Segment:
    segments = message.all("PID")
    if len(segments) != 1:
        raise Hl7ContentError(
            f"expected exactly one PID segment, found {len(segments)}; send one patient per message",
            ErrorLocation("PID"),
            error_code=SEGMENT_SEQUENCE_ERROR,
        )
    return segments[0]


def _patient_id(pid: Segment) -> str:
    # The value is not quoted in errors, because PID-3 may contain a real medical record number.
    patient_id = pid.value(3)
    if not patient_id:
        raise Hl7ContentError(
            "PID-3 patient identifier is empty; send the patient pseudonym in the first repetition",
            pid.location(3, 1),
            error_code=REQUIRED_FIELD_MISSING,
        )
    if not PATIENT_ID_PATTERN.match(patient_id):
        raise Hl7ContentError(
            "PID-3.1 is not a valid pseudonym; use 1 to 40 letters, digits, '-' or '.'",
            pid.location(3, 1),
        )
    return patient_id


def _patient(pid: Segment, patient_id: str) -> dict[str, Any]:
    patient: dict[str, Any] = {"resourceType": "Patient", "id": patient_id}
    sex = pid.value(8)
    if sex:
        if sex not in ADMINISTRATIVE_SEX:
            raise Hl7ContentError(
                f"administrative sex {sex!r} is not in HL7 table 0001; send F, M, O, U, A or N "
                "(numeric codes are rejected because systems disagree on what 0, 1 and 2 mean)",
                pid.location(8),
                error_code=TABLE_VALUE_NOT_FOUND,
            )
        patient["gender"] = ADMINISTRATIVE_SEX[sex]

    birth = pid.value(7)
    if birth:
        # A time of birth is dropped, because FHIR birthDate is a date and the age needs only the date.
        patient["birthDate"] = parse_datetime(birth, pid.location(7)).fhir[:10]
    return patient


def _add_clinical_segments(
    message: Hl7Message, builder: _BundleBuilder, subject: dict[str, str], patient_id: str
) -> None:
    """Map DG1, OBR, OBX, NTE and RXA in message order; other segments carry nothing that is mapped."""
    report: dict[str, Any] | None = None
    report_segment: Segment | None = None
    order_key = ""
    last_observation: dict[str, Any] | None = None
    for segment in message.segments:
        if segment.name == "DG1":
            builder.add(_condition_from_dg1(segment, subject, patient_id), segment.location())
        elif segment.name == "OBR":
            order_key = _order_key(message, segment)
            report, report_segment = _diagnostic_report(segment, subject, patient_id, order_key), segment
            builder.add(report, segment.location())
            last_observation = None
        elif segment.name == "OBX":
            observation = _observation(segment, report_segment, subject, patient_id, order_key)
            observation_url = builder.add(observation, segment.location())
            last_observation = observation
            if report is not None:
                report.setdefault("result", []).append({"reference": observation_url})
            condition = _condition_from_observation(observation, patient_id)
            if condition is not None:
                builder.add(condition, segment.location())
        elif segment.name == "NTE" and last_observation is not None:
            comment = "\n".join(segment.value(3, repetition=index) for index in range(len(segment.repetitions(3))))
            if comment:
                last_observation.setdefault("note", []).append({"text": comment})
        elif segment.name == "RXA":
            builder.add(_medication_statement(segment, subject, patient_id), segment.location())


def _resource_id(patient_id: str, kind: str, *identity: str) -> str:
    """Build a deterministic resource id, so that a later message about the same item replaces the earlier version.

    The record intake keeps one version per ``Type/id``: a corrected result
    (same order, OBX-3, OBX-4 and OBX-1) or an updated diagnosis (same DG1-3)
    replaces the earlier one, and results of different orders stay apart.
    """
    digest = hashlib.sha256("|".join(identity).encode("utf-8")).hexdigest()[:12]
    return f"{patient_id}-{kind}-{digest}"


def _order_key(message: Hl7Message, segment: Segment) -> str:
    """Identify an order by OBR-3 filler or OBR-2 placer order number, else by the message and OBR-1."""
    return segment.value(3) or segment.value(2) or f"{message.header.value(4)}/{message.control_id}/{segment.value(1)}"


def _first_code(concept: dict[str, Any]) -> str:
    coding = (concept.get("coding") or [{}])[0]
    return f"{coding.get('system', '')}|{coding.get('code', '')}" if coding else concept.get("text", "")


def _codeable_concept(segment: Segment, number: int, repetition: int = 0) -> dict[str, Any] | None:
    """Read a CWE/CE field: the primary triplet and the alternate triplet become codings."""
    components = segment.components(number, repetition)
    codings = []
    for offset in (0, 3):
        triplet = [*components[offset : offset + 3], "", "", ""][:3]
        code, display, system_name = (part.strip() for part in triplet)
        if code:
            codings.append(_coding(code, display, system_name))
    if not codings:
        text = components[1].strip() if len(components) > 1 else ""
        return {"text": text} if text else None
    concept: dict[str, Any] = {"coding": codings}
    text = components[8].strip() if len(components) > 8 else ""
    if text:
        concept["text"] = text
    return concept


def _coding(code: str, display: str, system_name: str) -> dict[str, str]:
    coding: dict[str, str] = {}
    system = CODING_SYSTEMS.get(system_name.upper()) or (system_name if ":" in system_name else None)
    if system:
        coding["system"] = system
    coding["code"] = code
    if display:
        coding["display"] = display
    return coding


def _condition_from_dg1(segment: Segment, subject: dict[str, str], patient_id: str) -> dict[str, Any]:
    code = _codeable_concept(segment, 3)
    if code is None:
        raise Hl7ContentError(
            "DG1-3 diagnosis code is empty; send an ICD-10 (I10) or SNOMED CT (SCT) code",
            segment.location(3),
            error_code=REQUIRED_FIELD_MISSING,
        )
    condition: dict[str, Any] = {
        "resourceType": "Condition",
        "id": _resource_id(patient_id, "cond", "DG1", _first_code(code)),
        "code": code,
        "subject": subject,
    }
    onset = segment.value(5)
    if onset:
        condition["onsetDateTime"] = parse_datetime(onset, segment.location(5)).fhir
    return condition


def _diagnostic_report(segment: Segment, subject: dict[str, str], patient_id: str, order_key: str) -> dict[str, Any]:
    code = _codeable_concept(segment, 4)
    if code is None:
        raise Hl7ContentError(
            "OBR-4 universal service identifier is empty; send the report type, for example "
            "11529-5^Surgical pathology study^LN",
            segment.location(4),
            error_code=REQUIRED_FIELD_MISSING,
        )
    status_code = segment.value(25)
    if status_code and status_code not in REPORT_STATUS:
        raise Hl7ContentError(
            f"result status {status_code!r} is not in HL7 table 0123; send one of {sorted(REPORT_STATUS)}",
            segment.location(25),
            error_code=TABLE_VALUE_NOT_FOUND,
        )
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": _resource_id(patient_id, "rprt", order_key),
        "status": REPORT_STATUS.get(status_code, "unknown"),
        "code": code,
        "subject": subject,
    }
    effective = segment.value(7)
    if effective:
        report["effectiveDateTime"] = parse_datetime(effective, segment.location(7)).fhir
    return report


def _observation(
    segment: Segment, report_segment: Segment | None, subject: dict[str, str], patient_id: str, order_key: str
) -> dict[str, Any]:
    code = _codeable_concept(segment, 3)
    if code is None:
        raise Hl7ContentError(
            "OBX-3 observation identifier is empty; send a LOINC (LN) or local (99CRC) code",
            segment.location(3),
            error_code=REQUIRED_FIELD_MISSING,
        )
    status_code = segment.value(11)
    if status_code not in OBSERVATION_STATUS:
        raise Hl7ContentError(
            f"result status {status_code!r} is not in HL7 table 0085; send one of {sorted(OBSERVATION_STATUS)}",
            segment.location(11),
            error_code=REQUIRED_FIELD_MISSING if not status_code else TABLE_VALUE_NOT_FOUND,
        )

    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "id": _resource_id(patient_id, "obs", order_key, _first_code(code), segment.value(4), segment.value(1)),
        "status": OBSERVATION_STATUS[status_code],
    }
    category = _feature_category(code)
    if category:
        observation["category"] = [{"coding": [{"system": OBSERVATION_CATEGORY_SYSTEM, "code": category}]}]
    observation["code"] = code
    observation["subject"] = subject

    effective = segment.value(14) or (report_segment.value(7) if report_segment else "")
    if effective:
        location = segment.location(14) if segment.value(14) else report_segment.location(7)  # type: ignore[union-attr]
        observation["effectiveDateTime"] = parse_datetime(effective, location).fhir
    observation.update(_observation_value(segment))
    return observation


def _feature_category(code: dict[str, Any]) -> str | None:
    for coding in code.get("coding", []):
        category = FEATURE_CATEGORIES.get((coding.get("system"), coding.get("code")))
        if category:
            return category
    return None


def _observation_value(segment: Segment) -> dict[str, Any]:
    """Map OBX-5 by the OBX-2 value type; an empty OBX-5 gives no value[x]."""
    value_type = segment.value(2).upper()
    repetitions = segment.repetitions(5)
    if not repetitions:
        return {}
    if value_type not in SUPPORTED_VALUE_TYPES:
        raise Hl7ContentError(
            f"value type {value_type or 'empty'!r} is not mapped; send OBX-5 as one of {sorted(SUPPORTED_VALUE_TYPES)}",
            segment.location(2),
            error_code=TABLE_VALUE_NOT_FOUND if value_type else REQUIRED_FIELD_MISSING,
        )
    if value_type in NUMERIC_TYPES:
        return _quantity(segment, value_type)
    if value_type in CODED_TYPES:
        return _coded_value(segment, repetitions)
    if value_type in SIMPLE_CODE_TYPES:
        code = segment.value(5)
        if code in ("Y", "N"):
            return {"valueBoolean": code == "Y"}
        return {"valueCodeableConcept": {"coding": [{"code": code}]}}
    if value_type in DATE_TYPES:
        return {"valueDateTime": parse_datetime(segment.value(5), segment.location(5)).fhir}
    lines = [segment.value(5, repetition=index) for index in range(len(repetitions))]
    return {"valueString": "\n".join(lines)}


def _coded_value(segment: Segment, repetitions: list[str]) -> dict[str, Any]:
    concepts = [_codeable_concept(segment, 5, index) for index in range(len(repetitions))]
    codings = [coding for concept in concepts if concept for coding in concept.get("coding", [])]
    if len(codings) == 1 and codings[0].get("system") == YES_NO_SYSTEM and codings[0]["code"] in ("Y", "N"):
        return {"valueBoolean": codings[0]["code"] == "Y"}
    if not codings:
        texts = [concept["text"] for concept in concepts if concept and concept.get("text")]
        return {"valueCodeableConcept": {"text": "\n".join(texts)}} if texts else {}
    return {"valueCodeableConcept": {"coding": codings}}


def _quantity(segment: Segment, value_type: str) -> dict[str, Any]:
    if len(segment.repetitions(5)) > 1:
        raise Hl7ContentError(
            f"a numeric ({value_type}) value must not repeat; send one number per OBX",
            segment.location(5),
        )
    components = segment.components(5)
    if value_type == "SN":
        comparator = components[0].strip() if components else ""
        number = components[1].strip() if len(components) > 1 else ""
        if comparator not in ("", "=") or any(part.strip() for part in components[2:]):
            raise Hl7ContentError(
                "only a plain structured numeric ('=' or empty comparator, one number) is mapped; "
                "send the value as NM or ST",
                segment.location(5),
            )
    else:
        number = segment.value(5)
    if not NUMBER_PATTERN.match(number):
        raise Hl7ContentError(
            f"{number!r} is not a number, but OBX-2 is {value_type}; send a decimal number such as 3 or 0.5",
            segment.location(5),
        )

    try:
        decimal = Decimal(number)
    except InvalidOperation as error:
        raise Hl7ContentError(f"{number!r} is not a number", segment.location(5)) from error
    quantity: dict[str, Any] = {"value": int(decimal) if decimal == decimal.to_integral_value() else float(decimal)}
    unit = _codeable_concept(segment, 6)
    if unit:
        coding = (unit.get("coding") or [{}])[0]
        quantity["unit"] = coding.get("display") or coding.get("code") or unit.get("text")
        if coding.get("system") == UCUM_SYSTEM:
            quantity["system"], quantity["code"] = UCUM_SYSTEM, coding["code"]
    return {"valueQuantity": quantity}


def _condition_from_observation(observation: dict[str, Any], patient_id: str) -> dict[str, Any] | None:
    """Build a Condition when a final, corrected or preliminary OBX has colon cancer as its coded value.

    Colon cancer is SNOMED CT 363406005 (``COLON_CANCER``) or an ICD-10 code starting with C18. Returns None otherwise.
    """
    concept = observation.get("valueCodeableConcept") or {}
    codings = concept.get("coding") or []
    if observation["status"] not in ("final", "corrected", "preliminary") or not any(
        _is_colon_cancer(coding) for coding in codings
    ):
        return None
    condition: dict[str, Any] = {
        "resourceType": "Condition",
        "id": _resource_id(patient_id, "cond", "OBX", observation["id"]),
        "code": concept,
        "subject": observation["subject"],
    }
    if "effectiveDateTime" in observation:
        condition["onsetDateTime"] = observation["effectiveDateTime"]
    return condition


def _is_colon_cancer(coding: dict[str, Any]) -> bool:
    system, code = coding.get("system"), str(coding.get("code", ""))
    return (system == SNOMED_SYSTEM and code == COLON_CANCER.code) or (
        system == ICD10_SYSTEM and code.startswith("C18")
    )


def _medication_statement(segment: Segment, subject: dict[str, str], patient_id: str) -> dict[str, Any]:
    medication = _codeable_concept(segment, 5)
    if medication is None:
        raise Hl7ContentError(
            "RXA-5 administered code is empty; send the drug as a WHO ATC (ATC) code",
            segment.location(5),
            error_code=REQUIRED_FIELD_MISSING,
        )
    completion = segment.value(20) or "CP"
    if completion not in COMPLETION_STATUS:
        raise Hl7ContentError(
            f"completion status {completion!r} is not in HL7 table 0322; send CP, PA, RE or NA",
            segment.location(20),
            error_code=TABLE_VALUE_NOT_FOUND,
        )
    statement: dict[str, Any] = {
        "resourceType": "MedicationStatement",
        "id": _resource_id(patient_id, "med", _first_code(medication), segment.value(3)),
        "status": COMPLETION_STATUS[completion],
        "medicationCodeableConcept": medication,
        "subject": subject,
    }
    start = segment.value(3)
    if start:
        statement["effectiveDateTime"] = parse_datetime(start, segment.location(3)).fhir
    return statement
