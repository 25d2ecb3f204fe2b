"""Code systems and codes that tie FHIR R4 resources to the model features.

Standard codes are used where one exists: LOINC for the Observation codes of
positive lymph nodes, grade and pathological T category, SNOMED CT for the
diagnosis and the grade values, WHO ATC for the two drugs. Findings without a
standard code (obstruction, perforation, adherence, surgery-to-registration
interval, more than 4 positive nodes, the trial's extent code) use the local
CodeSystem ``LOCAL_SYSTEM``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

LOINC_SYSTEM = "http://loinc.org"
SNOMED_SYSTEM = "http://snomed.info/sct"
ATC_SYSTEM = "http://www.whocc.no/atc"
ICD10_SYSTEM = "http://hl7.org/fhir/sid/icd-10"
AJCC_SYSTEM = "http://cancerstaging.org"
OBSERVATION_CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/observation-category"
CONDITION_CLINICAL_SYSTEM = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VERIFICATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
LOCAL_SYSTEM = "http://crc-medai.example/fhir/CodeSystem/crc-features"


@dataclass(frozen=True)
class Code:
    """A coding: system, code and display text."""

    system: str
    code: str
    display: str

    def coding(self) -> dict[str, str]:
        """Return the FHIR Coding JSON."""
        return {"system": self.system, "code": self.code, "display": self.display}


COLON_CANCER = Code(SNOMED_SYSTEM, "363406005", "Malignant neoplasm of colon")
COLON_CANCER_ICD10 = Code(ICD10_SYSTEM, "C18.9", "Malignant neoplasm of colon, unspecified")

ValueType = Literal["integer", "boolean", "grade", "t_category", "surgery_interval"]


@dataclass(frozen=True)
class ObservationMapping:
    """Observation code, value type and category that carry one model feature."""

    feature: str
    code: Code
    value_type: ValueType
    category: Literal["laboratory", "exam"]
    #: Other Observation codes read as the same feature.
    alternative_codes: tuple[Code, ...] = ()

    def codes(self) -> tuple[Code, ...]:
        return (self.code, *self.alternative_codes)


OBSERVATION_MAPPINGS: tuple[ObservationMapping, ...] = (
    ObservationMapping(
        "nodes", Code(LOINC_SYSTEM, "21893-3", "Regional lymph nodes positive [#] Specimen"), "integer", "laboratory"
    ),
    ObservationMapping(
        "node4",
        Code(LOCAL_SYSTEM, "positive-nodes-more-than-4", "More than 4 regional lymph nodes positive"),
        "boolean",
        "laboratory",
    ),
    ObservationMapping("differ", Code(LOINC_SYSTEM, "21858-6", "Grade Cancer"), "grade", "laboratory"),
    ObservationMapping(
        "extent",
        Code(LOINC_SYSTEM, "21899-0", "Primary tumor.pathology Cancer"),
        "t_category",
        "laboratory",
        alternative_codes=(Code(LOINC_SYSTEM, "21905-5", "Primary tumor.clinical [Class] Cancer"),),
    ),
    ObservationMapping(
        "obstruct", Code(LOCAL_SYSTEM, "bowel-obstruction", "Obstruction of the colon by the tumour"), "boolean", "exam"
    ),
    ObservationMapping(
        "perfor", Code(LOCAL_SYSTEM, "colon-perforation", "Perforation of the colon"), "boolean", "exam"
    ),
    ObservationMapping(
        "adhere",
        Code(LOCAL_SYSTEM, "adherence-to-nearby-organs", "Tumour adherent to nearby organs"),
        "boolean",
        "exam",
    ),
    ObservationMapping(
        "surg",
        Code(LOCAL_SYSTEM, "surgery-to-registration-interval", "Time from surgery to registration"),
        "surgery_interval",
        "exam",
    ),
)

#: Histologic grade values (SNOMED CT) by the trial's ``differ`` code.
GRADE_CODES: dict[float, Code] = {
    1.0: Code(SNOMED_SYSTEM, "54102005", "Grade 1: well differentiated"),
    2.0: Code(SNOMED_SYSTEM, "1663004", "Grade 2: moderately differentiated"),
    3.0: Code(SNOMED_SYSTEM, "61026006", "Grade 3: poorly differentiated"),
}

#: Pathological T category (AJCC) and the trial's own extent code, by ``extent``.
T_CATEGORY_CODES: dict[float, tuple[Code, Code]] = {
    1.0: (Code(AJCC_SYSTEM, "pT1", "pT1"), Code(LOCAL_SYSTEM, "extent-submucosa", "Tumour reaches the submucosa")),
    2.0: (Code(AJCC_SYSTEM, "pT2", "pT2"), Code(LOCAL_SYSTEM, "extent-muscle", "Tumour reaches the muscle layer")),
    3.0: (Code(AJCC_SYSTEM, "pT3", "pT3"), Code(LOCAL_SYSTEM, "extent-serosa", "Tumour reaches the serosa")),
    4.0: (
        Code(AJCC_SYSTEM, "pT4", "pT4"),
        Code(LOCAL_SYSTEM, "extent-contiguous-structures", "Tumour reaches contiguous structures"),
    ),
}

SURGERY_INTERVAL_CODES: dict[float, Code] = {
    0.0: Code(LOCAL_SYSTEM, "surgery-to-registration-short", "Short time from surgery to registration"),
    1.0: Code(LOCAL_SYSTEM, "surgery-to-registration-long", "Long time from surgery to registration"),
}

LEVAMISOLE = Code(ATC_SYSTEM, "P02CE01", "levamisole")
FLUOROURACIL = Code(ATC_SYSTEM, "L01BC02", "fluorouracil")

#: Drugs given in each trial arm; "Obs" has no MedicationStatement.
ARM_DRUGS: dict[str, tuple[Code, ...]] = {
    "Obs": (),
    "Lev": (LEVAMISOLE,),
    "Lev+5FU": (LEVAMISOLE, FLUOROURACIL),
}

#: Patient.gender (required binding, administrative-gender) to the trial's ``sex``.
GENDER_SEX: dict[str, float | None] = {"male": 1.0, "female": 0.0, "other": None, "unknown": None}

#: Observation.status values whose value is used.
USABLE_OBSERVATION_STATUSES = frozenset({"final", "amended", "corrected", "preliminary"})
#: MedicationStatement.status values that mean the drug was not given.
IGNORED_MEDICATION_STATUSES = frozenset({"entered-in-error", "not-taken"})

#: ICD-10-CM, which US hospitals and mCODE use for the primary cancer condition; ``C18.*`` is read as in ICD-10.
ICD10_CM_SYSTEM = "http://hl7.org/fhir/sid/icd-10-cm"
#: Extension that gives the reason a primitive value is absent (FHIR R4 core).
DATA_ABSENT_REASON_URL = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"

#: Regional lymph node category (mCODE TNM N category profiles): pathological first, then clinical.
N_CATEGORY_CODES: tuple[Code, ...] = (
    Code(LOINC_SYSTEM, "21900-6", "Regional lymph nodes.pathology [Class] Cancer"),
    Code(LOINC_SYSTEM, "21906-3", "Regional lymph nodes.clinical [Class] Cancer"),
)
#: Stage group (mCODE TNM stage group profiles): pathological first, then clinical.
STAGE_GROUP_CODES: tuple[Code, ...] = (
    Code(LOINC_SYSTEM, "21902-2", "Stage group.pathology Cancer"),
    Code(LOINC_SYSTEM, "21908-9", "Stage group.clinical Cancer"),
)
#: A Condition with this code states that regional nodes contain metastases (stage III), but not how many.
REGIONAL_NODE_METASTASIS_ICD10 = Code(
    ICD10_SYSTEM, "C77.2", "Secondary and unspecified malignant neoplasm of intra-abdominal lymph nodes"
)
#: MedicationAdministration.status values that mean the drug was not given.
IGNORED_ADMINISTRATION_STATUSES = frozenset({"entered-in-error", "not-done"})
