"""Write the FHIR R4 input files of the record ingestion tests (hand-built, synthetic patients).

Run from the repository root: ``python tests/data/fhir-inputs/make_inputs.py``.
The files are committed; the raw-text cases (byte-order mark, ``.15``,
``5.000``) are written byte by byte so that the tests read exactly those bytes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
ATC = "http://www.whocc.no/atc"
LOCAL = "http://crc-medai.example/fhir/CodeSystem/crc-features"
DAR = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"


def coded(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return {"coding": [coding]}


def observation(patient: str, name: str, code: dict[str, Any], **value: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": f"{patient}-{name}",
        "meta": {"lastUpdated": "2024-05-02T09:30:00+02:00"},
        "status": "final",
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}
        ],
        "code": code,
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": "2024-04-29",
        **value,
    }


def patient_resources(patient: str) -> list[dict[str, Any]]:
    """One patient with every model feature, in the shape of the mCODE examples."""
    return [
        {
            "resourceType": "Patient",
            "id": patient,
            "meta": {"lastUpdated": "2024-05-02T09:30:00+02:00"},
            "gender": "female",
            "birthDate": "1957-06-14",
        },
        {
            "resourceType": "Condition",
            "id": f"{patient}-primary",
            "meta": {"lastUpdated": "2024-05-02T09:30:00+02:00"},
            "clinicalStatus": coded("http://terminology.hl7.org/CodeSystem/condition-clinical", "active"),
            "verificationStatus": coded("http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed"),
            "code": {
                "coding": [
                    {"system": SNOMED, "code": "363406005", "display": "Malignant neoplasm of colon"},
                    {"system": ICD10, "code": "C18.7"},
                ]
            },
            "subject": {"reference": f"Patient/{patient}"},
            "onsetDateTime": "2024-04-29",
        },
        observation(patient, "nodes", coded(LOINC, "21893-3"), valueInteger=2),
        observation(patient, "grade", coded(LOINC, "21858-6"), valueCodeableConcept=coded(SNOMED, "1663004")),
        observation(
            patient, "t", coded(LOINC, "21899-0"), valueCodeableConcept=coded("http://cancerstaging.org", "pT3")
        ),
        observation(patient, "obstruct", coded(LOCAL, "bowel-obstruction"), valueBoolean=False),
        observation(patient, "perfor", coded(LOCAL, "colon-perforation"), valueBoolean=False),
        observation(patient, "adhere", coded(LOCAL, "adherence-to-nearby-organs"), valueBoolean=False),
        observation(
            patient,
            "surg",
            coded(LOCAL, "surgery-to-registration-interval"),
            valueCodeableConcept=coded(LOCAL, "surgery-to-registration-short"),
        ),
        {
            "resourceType": "MedicationStatement",
            "id": f"{patient}-levamisole",
            "status": "completed",
            "medicationCodeableConcept": coded(ATC, "P02CE01", "levamisole"),
            "subject": {"reference": f"Patient/{patient}"},
            "effectivePeriod": {"start": "2024-05-20"},
        },
    ]


def collection(resources: list[dict[str, Any]], bundle_id: str) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "id": bundle_id,
        "type": "collection",
        "entry": [
            {"fullUrl": f"http://hospital.example/fhir/{item['resourceType']}/{item['id']}", "resource": item}
            for item in resources
        ],
    }


def transaction(resources: list[dict[str, Any]], bundle_type: str) -> dict[str, Any]:
    """A transaction as integration engines send them: urn:uuid fullUrls, POSTs, references to fullUrls."""
    entries = []
    patient_url = "urn:uuid:7a3c4d2e-1b0f-4e5a-9c8d-6f2e1a0b3c4d"
    for number, item in enumerate(resources):
        item = copy.deepcopy(item)
        full_url = (
            patient_url if item["resourceType"] == "Patient" else f"urn:uuid:00000000-0000-4000-8000-{number:012d}"
        )
        if item["resourceType"] != "Patient":
            item.pop("id")
            item["subject"] = {"reference": patient_url}
            request = {"method": "POST", "url": item["resourceType"]}
        else:
            request = {"method": "PUT", "url": f"Patient/{item['id']}"}
        entry: dict[str, Any] = {"fullUrl": full_url, "resource": item, "request": request}
        if bundle_type == "batch":
            # Batch entries are independent, so they cannot refer to each other's urn:uuid; they use ids.
            original = resources[number]
            url = f"{original['resourceType']}/{original['id']}"
            entry = {
                "fullUrl": f"http://hospital.example/fhir/{url}",
                "resource": original,
                "request": {"method": "PUT", "url": url},
            }
        entries.append(entry)
    return {"resourceType": "Bundle", "type": bundle_type, "entry": entries}


def resource_by_id(bundle: dict[str, Any], resource_id: str) -> dict[str, Any]:
    return next(entry["resource"] for entry in bundle["entry"] if entry["resource"]["id"] == resource_id)


def write(name: str, data: Any) -> None:
    (OUT / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    base = collection(patient_resources("pt-in-01"), "pt-in-01-collection")
    write("collection-bundle.json", base)
    write("transaction-bundle.json", transaction(patient_resources("pt-in-02"), "transaction"))
    batch = transaction(patient_resources("pt-in-03"), "batch")
    write("batch-bundle.json", batch)
    for entry in batch["entry"]:
        del entry["fullUrl"]
    write("batch-without-fullurl.json", batch)
    write("single-patient.json", patient_resources("pt-in-04")[0])
    write("single-observation.json", patient_resources("pt-in-04")[2])

    lines = [*patient_resources("pt-in-05"), *patient_resources("pt-in-06")]
    lines.sort(key=lambda item: item["resourceType"])  # bulk export writes one file per type, concatenated here
    (OUT / "bulk-export.ndjson").write_text("".join(json.dumps(item) + "\n" for item in lines), encoding="utf-8")

    case = copy.deepcopy(base)
    resource_by_id(case, "pt-in-01")["_birthDate"] = {
        "extension": [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                "valueDateTime": "1957-06-14T07:40:00+01:00",
            }
        ]
    }
    write("primitive-extension.json", case)

    case = copy.deepcopy(base)
    patient = resource_by_id(case, "pt-in-01")
    del patient["birthDate"]
    patient["_birthDate"] = {"extension": [{"url": DAR, "valueCode": "asked-declined"}]}
    nodes = resource_by_id(case, "pt-in-01-nodes")
    del nodes["valueInteger"]
    nodes["dataAbsentReason"] = coded("http://terminology.hl7.org/CodeSystem/data-absent-reason", "not-performed")
    write("data-absent-reason.json", case)

    case = copy.deepcopy(base)
    resource_by_id(case, "pt-in-01-grade")["effectiveDateTime"] = "2024-04-29T10:15:00"
    write("datetime-without-timezone.json", case)

    weight = observation(
        "pt-in-01",
        "weight",
        coded(LOINC, "29463-7"),
        valueQuantity={"value": "@WEIGHT@", "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"},
    )
    case = copy.deepcopy(base)
    case["entry"].append({"fullUrl": "http://hospital.example/fhir/Observation/pt-in-01-weight", "resource": weight})
    text = json.dumps(case, indent=2) + "\n"
    (OUT / "decimal-precision.json").write_text(text.replace('"@WEIGHT@"', "72.500"), encoding="utf-8")
    (OUT / "decimal-leading-point.json").write_text(text.replace('"@WEIGHT@"', ".15"), encoding="utf-8")

    (OUT / "byte-order-mark.json").write_bytes(b"\xef\xbb\xbf" + (json.dumps(base, indent=2) + "\n").encode("utf-8"))

    case = copy.deepcopy(base)
    resource_by_id(case, "pt-in-01")["favouriteColour"] = "green"
    write("unknown-element.json", case)

    case = copy.deepcopy(base)
    statement = resource_by_id(case, "pt-in-01-levamisole")
    statement["taken"] = "y"  # STU3 MedicationStatement.taken, removed in R4
    write("stu3-resource.json", case)

    case = copy.deepcopy(base)
    statement = resource_by_id(case, "pt-in-01-levamisole")
    statement["medication"] = {"concept": statement.pop("medicationCodeableConcept")}  # R5 CodeableReference
    write("r5-resource.json", case)

    case = copy.deepcopy(base)
    statement = resource_by_id(case, "pt-in-01-levamisole")
    statement["contained"] = [{"resourceType": "Medication", "id": "fu", "code": coded(ATC, "L01BC02", "fluorouracil")}]
    case["entry"].append(
        {
            "fullUrl": "http://hospital.example/fhir/MedicationStatement/pt-in-01-fluorouracil",
            "resource": {
                "resourceType": "MedicationStatement",
                "id": "pt-in-01-fluorouracil",
                "contained": [
                    {"resourceType": "Medication", "id": "fu", "code": coded(ATC, "L01BC02", "fluorouracil")}
                ],
                "status": "completed",
                "medicationReference": {"reference": "#fu"},
                "subject": {"reference": "Patient/pt-in-01"},
            },
        }
    )
    del statement["contained"]
    write("contained-medication.json", case)

    dangling = copy.deepcopy(case)
    resource_by_id(dangling, "pt-in-01-fluorouracil")["medicationReference"] = {"reference": "#missing"}
    write("contained-dangling-reference.json", dangling)

    case = copy.deepcopy(base)
    case["entry"] = [entry for entry in case["entry"] if entry["resource"]["id"] != "pt-in-01-nodes"]
    resource_by_id(case, "pt-in-01-primary")["code"]["coding"] = [{"system": ICD10, "code": "C18.7"}]
    condition = copy.deepcopy(resource_by_id(case, "pt-in-01-primary"))
    condition.update(id="pt-in-01-node-metastasis", code=coded(ICD10, "C77.2"))
    case["entry"].append(
        {"fullUrl": "http://hospital.example/fhir/Condition/pt-in-01-node-metastasis", "resource": condition}
    )
    write("stage-by-condition-code.json", case)

    case = copy.deepcopy(base)
    case["entry"] = [entry for entry in case["entry"] if entry["resource"]["id"] != "pt-in-01-nodes"]
    stage = observation(
        "pt-in-01", "stage", coded(LOINC, "21902-2"), valueCodeableConcept=coded("http://cancerstaging.org", "2A")
    )
    case["entry"].append({"fullUrl": "http://hospital.example/fhir/Observation/pt-in-01-stage", "resource": stage})
    write("stage-group-observation.json", case)

    case = copy.deepcopy(base)
    del case["entry"][3]["fullUrl"]
    write("entry-without-fullurl.json", case)

    case = copy.deepcopy(base)
    case["entry"] += collection(patient_resources("pt-in-07"), "x")["entry"]
    write("two-patients.json", case)

    later = copy.deepcopy(base)
    nodes = resource_by_id(later, "pt-in-01-nodes")
    nodes["valueInteger"] = 7
    nodes["meta"]["lastUpdated"] = "2024-06-10T14:00:00+02:00"
    write("later-nodes.json", {"resourceType": "Bundle", "type": "collection", "entry": [later["entry"][2]]})
    older = copy.deepcopy(later)
    resource_by_id(older, "pt-in-01-nodes").update(valueInteger=1, meta={"lastUpdated": "2024-03-01T08:00:00+01:00"})
    write("older-nodes.json", {"resourceType": "Bundle", "type": "collection", "entry": [older["entry"][2]]})


if __name__ == "__main__":
    main()
