"""Mapping between FHIR R4 Bundles and the recurrence model features.

``features_from_bundle`` reads one patient's collection Bundle (Patient,
Condition, Observations, MedicationStatements) into the model features and
reports the reason for each absent feature. ``bundle_from_trial_row`` writes the
inverse: a Bundle for one trial patient, used for the sample records. The codes
are in ``fhir_codes`` and the table of the mapping is in FHIR_MAPPING.md.

Bundles are validated with the ``fhir.resources`` R4B models. R4B (4.3) keeps
the R4 (4.0.1) structure of the resources used here; fhir.resources 8 has no
separate R4 package and defaults to R5.

Regenerate the sample records with::

    python -m processors.prognosis.fhir_mapping --out samples/records --count 6
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import uuid
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pydantic
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle

from processors.prognosis.data import FEATURE_NAMES, FeatureValue, row_features
from processors.prognosis.errors import InvalidBundleError
from processors.prognosis.fhir_codes import (
    ARM_DRUGS,
    COLON_CANCER,
    COLON_CANCER_ICD10,
    CONDITION_CLINICAL_SYSTEM,
    CONDITION_VERIFICATION_SYSTEM,
    DATA_ABSENT_REASON_URL,
    FLUOROURACIL,
    GENDER_SEX,
    GRADE_CODES,
    ICD10_CM_SYSTEM,
    ICD10_SYSTEM,
    IGNORED_ADMINISTRATION_STATUSES,
    IGNORED_MEDICATION_STATUSES,
    LEVAMISOLE,
    N_CATEGORY_CODES,
    OBSERVATION_CATEGORY_SYSTEM,
    OBSERVATION_MAPPINGS,
    REGIONAL_NODE_METASTASIS_ICD10,
    STAGE_GROUP_CODES,
    SURGERY_INTERVAL_CODES,
    T_CATEGORY_CODES,
    USABLE_OBSERVATION_STATUSES,
    Code,
    ObservationMapping,
)

logger = logging.getLogger(__name__)

Resource = Mapping[str, Any]

#: FHIR id rule; the pseudonym also prefixes the other resource ids, so it is kept shorter than 64.
PSEUDONYM_PATTERN = re.compile(r"^[A-Za-z0-9\-.]{1,40}$")
#: Namespace for the deterministic ``urn:uuid`` fullUrls of generated Bundles.
FULL_URL_NAMESPACE = uuid.UUID("6f1d1c8e-3b7a-4e0c-9a52-0c1c3f0e2b11")
#: Generated diagnosis dates fall in 2019, a year without 29 February.
ONSET_YEAR = 2019

BUNDLE_TYPES = frozenset(
    {
        "document",
        "message",
        "transaction",
        "transaction-response",
        "batch",
        "batch-response",
        "history",
        "searchset",
        "collection",
    }
)
OBSERVATION_STATUSES = frozenset(
    {"registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error", "unknown"}
)
MEDICATION_STATEMENT_STATUSES = frozenset(
    {"active", "completed", "entered-in-error", "intended", "stopped", "on-hold", "unknown", "not-taken"}
)
T_CATEGORY_PATTERN = re.compile(r"^[cpyra]*T([1-4])[a-d]?$")
N_CATEGORY_PATTERN = re.compile(r"^[cpyra]*N(?P<number>[0-3])(?P<letter>[a-c])?(?:\(.*\))?$")
#: AJCC stage group as written in codes: 2, 2A, II, IIA, "Stage IIIB".
STAGE_GROUP_PATTERN = re.compile(r"^(?:stage\s*)?(?P<group>IV|I{1,3}|0|[1-4])(?P<letter>[A-C])?$", re.IGNORECASE)
ROMAN_STAGE = {"0": 0, "I": 1, "II": 2, "III": 3, "IV": 4}


@dataclass(frozen=True)
class MappedRecord:
    """Model features read from one patient's Bundle.

    ``features`` has every model feature, None where absent. ``missing`` maps
    each absent feature to the reason, for example
    ``"no Observation with code LOINC 21893-3"``.
    """

    patient_id: str
    features: dict[str, FeatureValue]
    missing: dict[str, str]


# Reading a Bundle


def features_from_bundle(bundle: Mapping[str, Any]) -> MappedRecord:
    """Validate a FHIR R4 Bundle for one patient and read the model features from it.

    Resources are matched by code, see FHIR_MAPPING.md. Absent values are
    reported in ``missing`` and never filled in. When there is no Observation
    for ``node4`` but the number of positive nodes is known, ``node4`` is
    derived as ``nodes > 4``.

    Raises:
        InvalidBundleError: the Bundle is not valid FHIR R4, has no or several
            Patients, refers to another patient, or contains a value the model
            cannot use. ``element_path`` locates the element.
    """
    validate_bundle(bundle)
    resources = list(_resources(bundle))

    patient_index, patient = _single_patient(resources)
    patient_id = patient["id"]
    _check_subjects(bundle, resources, patient_index, patient_id)

    features: dict[str, FeatureValue] = {name: None for name in FEATURE_NAMES}
    missing: dict[str, str] = {}
    _read_sex(patient, features, missing)
    _read_age(patient, resources, features, missing)
    for mapping in OBSERVATION_MAPPINGS:
        _read_observation(mapping, resources, features, missing)
    _read_staging(resources, features, missing)
    _derive_node4(features, missing)
    _read_treatment_arm(resources, features, missing)

    logger.debug("bundle mapped patient=%s missing=%s", patient_id, sorted(missing))
    return MappedRecord(patient_id=patient_id, features=features, missing=missing)


def validate_bundle(bundle: object) -> None:
    """Validate a Bundle against the FHIR R4B models and the required code bindings used here.

    Raises:
        InvalidBundleError: names the first element that failed.
    """
    if not isinstance(bundle, Mapping):
        raise InvalidBundleError("Bundle", f"expected a JSON object, got {type(bundle).__name__}")
    if bundle.get("resourceType") != "Bundle":
        raise InvalidBundleError(
            "Bundle.resourceType",
            f"is {bundle.get('resourceType')!r}; expected 'Bundle' holding one patient's resources",
        )

    _check_resource_types(bundle)
    try:
        Bundle.model_validate(bundle)
    except pydantic.ValidationError as error:
        raise _schema_error(error.errors()[0]) from error

    # fhir.resources does not check required value set bindings, so check the ones that steer the mapping.
    _require_code(bundle["type"], BUNDLE_TYPES, "Bundle.type")
    for index, resource in _resources(bundle):
        kind = resource["resourceType"]
        if kind == "Patient" and "gender" in resource:
            _require_code(resource["gender"], GENDER_SEX, f"Bundle.entry[{index}].resource.gender")
        elif kind == "Observation":
            _require_code(resource["status"], OBSERVATION_STATUSES, f"Bundle.entry[{index}].resource.status")
        elif kind == "MedicationStatement":
            _require_code(resource["status"], MEDICATION_STATEMENT_STATUSES, f"Bundle.entry[{index}].resource.status")


def element_path(location: Iterable[str | int]) -> str:
    """Turn a pydantic error location into a FHIRPath-like path such as ``Bundle.entry[1].resource.gender``."""
    path = "Bundle"
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _check_resource_types(bundle: Mapping[str, Any]) -> None:
    """Reject entries whose resourceType R4B does not define.

    fhir.resources raises a KeyError for them instead of a validation error.
    """
    entries = bundle.get("entry")
    if not isinstance(entries, list):
        return
    for index, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, Mapping) else None
        if not isinstance(resource, Mapping):
            continue
        resource_type = resource.get("resourceType")
        path = f"Bundle.entry[{index}].resource.resourceType"
        if not isinstance(resource_type, str):
            raise InvalidBundleError(path, "the resource has no resourceType; every entry.resource needs one")
        try:
            get_fhir_model_class(resource_type)
        except ValueError as error:
            raise InvalidBundleError(
                path,
                f"{resource_type!r} is not a FHIR R4 resource type; "
                "check the spelling, or convert STU3 and R5 resources to R4",
            ) from error


def _schema_error(error: Mapping[str, Any]) -> InvalidBundleError:
    path = element_path(error["loc"])
    message = error["msg"]
    if error["type"] != "missing":
        message += f" (value {_shorten(repr(error.get('input')))})"
    if path.endswith(("date", "Date", "DateTime", "issued", "start", "end")):
        message += (
            "; FHIR dates are YYYY, YYYY-MM or YYYY-MM-DD, and a dateTime with a time needs a timezone, "
            "for example 2019-03-01T10:00:00+01:00"
        )
    return InvalidBundleError(path, f"{message}; the Bundle must be valid FHIR R4")


def _resources(bundle: Mapping[str, Any]) -> Iterable[tuple[int, Resource]]:
    for index, entry in enumerate(bundle.get("entry") or []):
        if "resource" in entry:
            yield index, entry["resource"]


def _single_patient(resources: list[tuple[int, Resource]]) -> tuple[int, Resource]:
    patients = [(index, resource) for index, resource in resources if resource["resourceType"] == "Patient"]
    if len(patients) != 1:
        raise InvalidBundleError(
            "Bundle.entry",
            f"expected exactly one Patient, found {len(patients)}; send one Bundle per patient",
        )
    index, patient = patients[0]
    if not patient.get("id"):
        raise InvalidBundleError(
            f"Bundle.entry[{index}].resource.id",
            "the Patient has no id; the id is the patient pseudonym that keys the record",
        )
    return index, patient


def _check_subjects(
    bundle: Mapping[str, Any], resources: list[tuple[int, Resource]], patient_index: int, patient_id: str
) -> None:
    """Reject resources whose subject is another patient; a resource without subject is taken as this patient's."""
    patient_full_url = (bundle["entry"][patient_index].get("fullUrl") or "").strip()
    own = {f"Patient/{patient_id}", patient_full_url} - {""}
    for index, resource in resources:
        reference = (resource.get("subject") or {}).get("reference")
        if reference is None or reference in own or reference.endswith(f"/Patient/{patient_id}"):
            continue
        raise InvalidBundleError(
            f"Bundle.entry[{index}].resource.subject.reference",
            f"refers to {reference!r}, but the Bundle's Patient is {patient_id!r}; send one Bundle per patient",
        )


def _read_sex(patient: Resource, features: dict[str, FeatureValue], missing: dict[str, str]) -> None:
    gender = patient.get("gender")
    if gender is None:
        missing["sex"] = "Patient.gender is absent" + _absent_reason(patient.get("_gender"))
        return
    sex = GENDER_SEX[gender]
    if sex is None:
        missing["sex"] = f"Patient.gender is {gender!r}; the trial recorded sex only as male or female"
        return
    features["sex"] = sex


def _read_age(
    patient: Resource, resources: list[tuple[int, Resource]], features: dict[str, FeatureValue], missing: dict[str, str]
) -> None:
    """Set age as full years from Patient.birthDate to the colon cancer Condition's onset."""
    conditions = [
        resource for _, resource in resources if resource["resourceType"] == "Condition" and _is_colon_cancer(resource)
    ]
    onset_ages = [condition["onsetAge"] for condition in conditions if "onsetAge" in condition]
    for onset_age in onset_ages:
        if onset_age.get("code") == "a" and onset_age.get("value") is not None:
            features["age"] = float(onset_age["value"])
            return

    onsets = [_full_date(condition["onsetDateTime"]) for condition in conditions if "onsetDateTime" in condition]
    onsets = [onset for onset in onsets if onset is not None]
    if not onsets:
        missing["age"] = (
            f"no Condition with code SNOMED CT {COLON_CANCER.code} ({COLON_CANCER.display}) "
            "and a full onsetDateTime or an onsetAge in years"
        )
        return

    if patient.get("birthDate") is None:
        missing["age"] = "Patient.birthDate is absent" + _absent_reason(patient.get("_birthDate"))
        return
    birth_date = _full_date(patient.get("birthDate"))
    if birth_date is None:
        missing["age"] = f"Patient.birthDate is {patient.get('birthDate')!r}; a full date (YYYY-MM-DD) is needed"
        return
    features["age"] = float(_full_years(birth_date, min(onsets)))


def _is_colon_cancer(condition: Resource) -> bool:
    verification = (condition.get("verificationStatus") or {}).get("coding") or []
    if any(coding.get("code") in {"refuted", "entered-in-error"} for coding in verification):
        return False
    for coding in (condition.get("code") or {}).get("coding") or []:
        if coding.get("system") == COLON_CANCER.system and coding.get("code") == COLON_CANCER.code:
            return True
        if coding.get("system") in {ICD10_SYSTEM, ICD10_CM_SYSTEM} and str(coding.get("code", "")).startswith("C18"):
            return True
    return False


def _read_observation(
    mapping: ObservationMapping,
    resources: list[tuple[int, Resource]],
    features: dict[str, FeatureValue],
    missing: dict[str, str],
) -> None:
    matching = [
        (index, resource)
        for index, resource in resources
        if resource["resourceType"] == "Observation" and _has_code(resource.get("code"), mapping.codes())
    ]
    usable = [(index, resource) for index, resource in matching if resource["status"] in USABLE_OBSERVATION_STATUSES]
    if not usable:
        codes = " or ".join(_code_text(code) for code in mapping.codes())
        reason = f"no Observation with code {codes}"
        if matching:
            reason += f" and status {', '.join(sorted(USABLE_OBSERVATION_STATUSES))}"
        missing[mapping.feature] = reason
        return

    # The most recent Observation wins; on equal times the later Bundle entry wins.
    index, observation = max(usable, key=lambda item: (_effective_instant(*item), item[0]))
    absent = _observation_absent_reason(observation)
    if absent is not None:
        missing[mapping.feature] = f"the Observation {_code_text(mapping.code)} carries no value: {absent}"
        return
    features[mapping.feature] = _observation_value(mapping, observation, f"Bundle.entry[{index}].resource")


def _observation_absent_reason(observation: Resource) -> str | None:
    """Return why an Observation has no value (dataAbsentReason, or the extension on value[x]), or None."""
    if any(key.startswith("value") for key in observation):
        return None
    concept = observation.get("dataAbsentReason")
    if concept is not None:
        codes = [str(coding.get("code")) for coding in concept.get("coding") or []]
        return f"dataAbsentReason {', '.join(codes) or concept.get('text')!r}"
    for key, element in observation.items():
        if key.startswith("_value"):
            reason = _absent_reason(element)
            if reason:
                return f"{key[1:]} is absent{reason}"
    return None


def _absent_reason(element: object) -> str:
    """Return `` (data-absent-reason 'code')`` for a primitive's extension element, else an empty string."""
    if not isinstance(element, Mapping):
        return ""
    for extension in element.get("extension") or []:
        if extension.get("url") == DATA_ABSENT_REASON_URL:
            return f" (data-absent-reason {extension.get('valueCode')!r})"
    return ""


def _observation_value(mapping: ObservationMapping, observation: Resource, path: str) -> float:
    value_type = mapping.value_type
    if value_type == "integer":
        return _count_value(mapping, observation, path)
    if value_type == "boolean":
        if not isinstance(observation.get("valueBoolean"), bool):
            raise InvalidBundleError(
                f"{path}.value[x]", f"valueBoolean is missing; send {_code_text(mapping.code)} as true or false"
            )
        return float(observation["valueBoolean"])

    concept = observation.get("valueCodeableConcept")
    if concept is None:
        raise InvalidBundleError(
            f"{path}.value[x]", f"valueCodeableConcept is missing; send {_code_text(mapping.code)} as a coded value"
        )
    if value_type == "grade":
        return _coded_value(concept, GRADE_CODES, mapping, path)
    if value_type == "surgery_interval":
        return _coded_value(concept, SURGERY_INTERVAL_CODES, mapping, path)
    return _t_category_value(concept, mapping, path)


def _count_value(mapping: ObservationMapping, observation: Resource, path: str) -> float:
    if "valueInteger" in observation:
        value = observation["valueInteger"]
        if isinstance(value, bool):
            raise InvalidBundleError(f"{path}.valueInteger", f"{value!r} is a boolean; expected a whole number")
        return float(value)
    value = (observation.get("valueQuantity") or {}).get("value")
    if value is None or not float(value).is_integer():
        raise InvalidBundleError(
            f"{path}.value[x]",
            f"valueInteger is missing; send {_code_text(mapping.code)} as valueInteger or a whole-number valueQuantity",
        )
    return float(value)


def _coded_value(concept: Resource, table: Mapping[float, Code], mapping: ObservationMapping, path: str) -> float:
    for value, code in table.items():
        if _has_code(concept, (code,)):
            return value
    allowed = ", ".join(_code_text(code) for code in table.values())
    raise InvalidBundleError(
        f"{path}.valueCodeableConcept",
        f"{_shorten(json.dumps(concept, default=str))} is not a value the model knows for {_code_text(mapping.code)}; "
        f"expected {allowed}",
    )


def _t_category_value(concept: Resource, mapping: ObservationMapping, path: str) -> float:
    for value, (_, trial_code) in T_CATEGORY_CODES.items():
        if _has_code(concept, (trial_code,)):
            return value
    for coding in concept.get("coding") or []:
        match = T_CATEGORY_PATTERN.match(str(coding.get("code", "")))
        if match:
            return float(match.group(1))
    raise InvalidBundleError(
        f"{path}.valueCodeableConcept",
        f"{_shorten(json.dumps(concept, default=str))} is not a T category T1 to T4 for {_code_text(mapping.code)}; "
        "Tis, T0 and TX have no equivalent in the trial's extent codes",
    )


def _read_staging(
    resources: list[tuple[int, Resource]], features: dict[str, FeatureValue], missing: dict[str, str]
) -> None:
    """Fill ``nodes`` and ``node4`` from the N category or the stage group when no count was sent.

    AJCC (7th and 8th editions) colon cancer: stage I and II mean N0, stage
    III means positive regional nodes; N1 is 1 to 3 positive nodes, N2a 4 to 6
    and N2b 7 or more. Where the stage shows only that nodes are positive, the
    reason in ``missing`` states that instead of guessing a count.
    """
    if features["nodes"] is not None:
        return
    n_category, n_source = _n_category(resources)
    stage, stage_source = _stage_group(resources)

    if n_category == "0" or (n_category is None and stage in {1, 2}):
        source = n_source or stage_source
        features["nodes"] = 0.0
        missing.pop("nodes", None)
        logger.debug("nodes derived as 0 from %s", source)
        return

    # N1 (1 to 3 nodes) rules out more than 4 and N2b (7 or more) implies it; N2 and N2a (4 to 6) leave it open.
    if features["node4"] is None and n_category is not None and (n_category.startswith("1") or n_category == "2b"):
        features["node4"] = float(n_category == "2b")
        missing.pop("node4", None)

    positive_from = None
    if n_category is not None:
        positive_from = n_source
    elif stage == 3:
        positive_from = stage_source
    if positive_from is None and _has_condition_code(resources, REGIONAL_NODE_METASTASIS_ICD10):
        positive_from = f"the Condition coded ICD-10 {REGIONAL_NODE_METASTASIS_ICD10.code}"
    if positive_from is not None:
        missing["nodes"] += f"; {positive_from} says regional nodes are positive but not how many"


def _n_category(resources: list[tuple[int, Resource]]) -> tuple[str | None, str | None]:
    """Return the N category as ``0``, ``1``, ``1a``, ``2``, ``2b``... and where it was read, or (None, None)."""
    for code in N_CATEGORY_CODES:
        for _, observation in _usable_observations(resources, code):
            for coding in (observation.get("valueCodeableConcept") or {}).get("coding") or []:
                match = N_CATEGORY_PATTERN.match(str(coding.get("code", "")))
                if match:
                    category = match.group("number") + (match.group("letter") or "")
                    return category, f"the N category {coding.get('code')} ({_code_text(code)})"
    return None, None


def _stage_group(resources: list[tuple[int, Resource]]) -> tuple[int | None, str | None]:
    """Return the AJCC stage group 0 to 4 from a stage group Observation or Condition.stage.summary."""
    for code in STAGE_GROUP_CODES:
        for _, observation in _usable_observations(resources, code):
            group = _stage_number(observation.get("valueCodeableConcept"))
            if group is not None:
                return group, f"the stage group Observation {_code_text(code)}"
    for _, condition in resources:
        if condition["resourceType"] != "Condition" or not _is_colon_cancer(condition):
            continue
        for stage in condition.get("stage") or []:
            group = _stage_number(stage.get("summary"))
            if group is not None:
                return group, "Condition.stage.summary"
    return None, None


def _stage_number(concept: Resource | None) -> int | None:
    for coding in (concept or {}).get("coding") or []:
        match = STAGE_GROUP_PATTERN.match(str(coding.get("code", "")).strip())
        if match:
            group = match.group("group").upper()
            return ROMAN_STAGE[group] if group in ROMAN_STAGE else int(group)
    return None


def _usable_observations(resources: list[tuple[int, Resource]], code: Code) -> list[tuple[int, Resource]]:
    """Return the Observations with ``code`` and a usable status, the most recent first."""
    matching = [
        (index, resource)
        for index, resource in resources
        if resource["resourceType"] == "Observation"
        and resource["status"] in USABLE_OBSERVATION_STATUSES
        and _has_code(resource.get("code"), (code,))
    ]
    return sorted(matching, key=lambda item: (_effective_instant(*item), item[0]), reverse=True)


def _has_condition_code(resources: list[tuple[int, Resource]], code: Code) -> bool:
    return any(
        resource["resourceType"] == "Condition" and _has_code(resource.get("code"), (code,))
        for _, resource in resources
    )


def _derive_node4(features: dict[str, FeatureValue], missing: dict[str, str]) -> None:
    if features["node4"] is None and features["nodes"] is not None:
        features["node4"] = float(features["nodes"] > 4)
        missing.pop("node4", None)
    elif features["node4"] is None:
        missing["node4"] = f"{missing['node4']}, and the number of positive nodes is missing too"


def _read_treatment_arm(
    resources: list[tuple[int, Resource]], features: dict[str, FeatureValue], missing: dict[str, str]
) -> None:
    """Set ``rx`` from the levamisole and fluorouracil given; no such drug means observation only.

    A drug counts when a MedicationStatement or a MedicationAdministration
    names it, by code or by a reference to a Medication in the Bundle or
    among its own contained resources (``#id``).
    """
    medications = {
        _local_reference(index, resource): resource
        for index, resource in resources
        if resource["resourceType"] == "Medication"
    }
    drugs: set[Code] = set()
    for _, use in resources:
        if not _is_medication_given(use):
            continue
        concept = use.get("medicationCodeableConcept")
        if concept is None:
            reference = (use.get("medicationReference") or {}).get("reference", "")
            contained = {f"#{item.get('id')}": item for item in use.get("contained") or []}
            medication = contained.get(reference) or medications.get(reference) or {}
            concept = medication.get("code")
        drugs.update(drug for drug in (LEVAMISOLE, FLUOROURACIL) if _has_code(concept, (drug,)))

    for arm, arm_drugs in ARM_DRUGS.items():
        if drugs == set(arm_drugs):
            features["rx"] = arm
            return
    missing["rx"] = "fluorouracil without levamisole matches no trial arm (Obs, Lev, Lev+5FU)"


def _is_medication_given(resource: Resource) -> bool:
    if resource["resourceType"] == "MedicationStatement":
        return resource["status"] not in IGNORED_MEDICATION_STATUSES
    if resource["resourceType"] == "MedicationAdministration":
        return resource["status"] not in IGNORED_ADMINISTRATION_STATUSES
    return False


def _local_reference(index: int, resource: Resource) -> str:
    return f"{resource['resourceType']}/{resource.get('id', index)}"


def _has_code(concept: Resource | None, codes: Iterable[Code]) -> bool:
    if not concept:
        return False
    wanted = {(code.system, code.code) for code in codes}
    return any((coding.get("system"), coding.get("code")) in wanted for coding in concept.get("coding") or [])


def _code_text(code: Code) -> str:
    system = {"http://loinc.org": "LOINC", "http://snomed.info/sct": "SNOMED CT"}.get(code.system, code.system)
    return f"{system} {code.code} ({code.display})"


def _require_code(value: str, allowed: Iterable[str], path: str) -> None:
    if value not in allowed:
        raise InvalidBundleError(path, f"{value!r} is not a valid code; expected one of {sorted(allowed)}")


def _full_date(text: str | None) -> date | None:
    """Return the date of a FHIR date or dateTime, or None when it lacks month or day."""
    if text is None or len(text) < 10:
        return None
    return date.fromisoformat(text[:10])


def _full_years(birth: date, on: date) -> int:
    return on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))


def _effective_instant(index: int, observation: Resource) -> datetime:
    text = (
        observation.get("effectiveDateTime")
        or (observation.get("effectivePeriod") or {}).get("start")
        or observation.get("issued")
    )
    if not text:
        return datetime.min.replace(tzinfo=UTC)
    if len(text) == 4:
        text += "-01-01"
    elif len(text) == 7:
        text += "-01"
    try:
        instant = datetime.fromisoformat(text)
    except ValueError as error:
        raise InvalidBundleError(
            f"Bundle.entry[{index}].resource.effective[x]", f"{text!r} cannot be read as a date or dateTime"
        ) from error
    # A date without time is read as midnight UTC so that it compares with zoned dateTimes.
    return instant if instant.tzinfo else instant.replace(tzinfo=UTC)


def _shorten(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Writing a Bundle


def bundle_from_trial_row(row: Mapping[str, Any], pseudonym: str) -> dict[str, Any]:
    """Build a FHIR R4 collection Bundle for one trial patient.

    The Bundle contains a Patient (id = ``pseudonym``, gender, birthDate; no name
    or identifier), the colon cancer Condition with its onset date, one
    Observation per known feature and one MedicationStatement per drug of the
    treatment arm. A missing value in the row leaves its Observation out. The
    dates are synthetic: the onset date is derived from the pseudonym, and the
    birth date is chosen so that the age in full years at onset equals the
    trial's age.

    Raises:
        ValueError: ``pseudonym`` is not a valid FHIR id of at most 40 characters.
    """
    if not PSEUDONYM_PATTERN.match(pseudonym):
        raise ValueError(f"pseudonym {pseudonym!r} is invalid; use 1 to 40 letters, digits, '-' or '.'")
    features = row_features(row)
    onset = _onset_date(pseudonym)
    patient_url = _full_url(pseudonym, "Patient")
    subject = {"reference": patient_url}

    entries = [
        _entry(patient_url, _patient(pseudonym, features, onset)),
        _entry(_full_url(pseudonym, "Condition"), _condition(pseudonym, subject, onset)),
    ]
    for mapping in OBSERVATION_MAPPINGS:
        value = features[mapping.feature]
        if value is not None:
            resource = _observation(pseudonym, mapping, value, subject, onset)
            entries.append(_entry(_full_url(pseudonym, resource["id"]), resource))
    for drug in ARM_DRUGS[str(features["rx"])]:
        resource = _medication_statement(pseudonym, drug, subject, onset)
        entries.append(_entry(_full_url(pseudonym, resource["id"]), resource))

    return {"resourceType": "Bundle", "id": f"{pseudonym}-record", "type": "collection", "entry": entries}


def _onset_date(pseudonym: str) -> date:
    return date(ONSET_YEAR, 1, 1) + timedelta(days=zlib.crc32(pseudonym.encode()) % 365)


def _birth_date(age: float, onset: date, pseudonym: str) -> date:
    # Between 1 and 300 days before the birthday in the onset year, so the full years at onset equal the age.
    days_after_birthday = 1 + zlib.crc32(pseudonym.encode()[::-1]) % 300
    return date(onset.year - int(age), onset.month, onset.day) - timedelta(days=days_after_birthday)


def _full_url(pseudonym: str, name: str) -> str:
    return f"urn:uuid:{uuid.uuid5(FULL_URL_NAMESPACE, f'{pseudonym}/{name}')}"


def _entry(full_url: str, resource: dict[str, Any]) -> dict[str, Any]:
    return {"fullUrl": full_url, "resource": resource}


def _patient(pseudonym: str, features: Mapping[str, FeatureValue], onset: date) -> dict[str, Any]:
    patient: dict[str, Any] = {"resourceType": "Patient", "id": pseudonym}
    if features["sex"] is not None:
        patient["gender"] = "male" if features["sex"] == 1.0 else "female"
    if features["age"] is not None:
        patient["birthDate"] = _birth_date(float(features["age"]), onset, pseudonym).isoformat()
    return patient


def _condition(pseudonym: str, subject: dict[str, str], onset: date) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": f"{pseudonym}-colon-cancer",
        "clinicalStatus": {"coding": [{"system": CONDITION_CLINICAL_SYSTEM, "code": "active"}]},
        "verificationStatus": {"coding": [{"system": CONDITION_VERIFICATION_SYSTEM, "code": "confirmed"}]},
        "code": {"coding": [COLON_CANCER.coding(), COLON_CANCER_ICD10.coding()], "text": "Colon carcinoma, resected"},
        "subject": subject,
        "onsetDateTime": onset.isoformat(),
    }


def _observation(
    pseudonym: str, mapping: ObservationMapping, value: FeatureValue, subject: dict[str, str], onset: date
) -> dict[str, Any]:
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "id": f"{pseudonym}-{mapping.feature}",
        "status": "final",
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY_SYSTEM, "code": mapping.category}]}],
        "code": {"coding": [mapping.code.coding()], "text": mapping.code.display},
        "subject": subject,
        "effectiveDateTime": onset.isoformat(),
    }
    number = float(value)
    if mapping.value_type == "integer":
        observation["valueInteger"] = int(number)
    elif mapping.value_type == "boolean":
        observation["valueBoolean"] = number == 1.0
    elif mapping.value_type == "grade":
        observation["valueCodeableConcept"] = {"coding": [GRADE_CODES[number].coding()]}
    elif mapping.value_type == "surgery_interval":
        observation["valueCodeableConcept"] = {"coding": [SURGERY_INTERVAL_CODES[number].coding()]}
    else:
        observation["valueCodeableConcept"] = {"coding": [code.coding() for code in T_CATEGORY_CODES[number]]}
    return observation


def _medication_statement(pseudonym: str, drug: Code, subject: dict[str, str], onset: date) -> dict[str, Any]:
    return {
        "resourceType": "MedicationStatement",
        "id": f"{pseudonym}-{drug.display}",
        "status": "completed",
        "medicationCodeableConcept": {"coding": [drug.coding()], "text": drug.display},
        "subject": subject,
        "effectivePeriod": {"start": onset.isoformat()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write sample FHIR R4 Bundles built from real trial rows.")
    parser.add_argument("--out", type=Path, default=Path("samples/records"), help="folder for the JSON Bundles")
    parser.add_argument("--count", type=int, default=6, help="number of valid patient Bundles")
    parser.add_argument(
        "--model",
        type=Path,
        default=Path(__file__).resolve().parent / "weights" / "recurrence_catboost.cbm",
        help="model weights used to pick rows across the risk range",
    )
    args = parser.parse_args(argv)

    # Imported here because the sample writer loads the model and the trial table.
    from processors.prognosis.samples import write_samples

    for path in write_samples(args.out, args.count, args.model):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
