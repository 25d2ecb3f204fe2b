"""Record ingestion without services: parsing FHIR JSON, validating inputs, grouping and mapping them."""

from __future__ import annotations

import copy
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from processors.prognosis.fhir_mapping import features_from_bundle
from producers.fhir_input import (
    RecordRejected,
    dump_fhir_json,
    group_by_patient,
    incoming_resources,
    read_fhir_json,
    read_ndjson,
)
from producers.intake import check_input, encode_record
from schemas.messages import PatientRecord

INPUTS = Path(__file__).resolve().parent / "data" / "fhir-inputs"


def load(name: str) -> Any:
    return read_fhir_json((INPUTS / name).read_bytes())


# JSON text


def test_json_byte_order_mark_skipped() -> None:
    data = read_fhir_json(b'\xef\xbb\xbf{"resourceType": "Patient", "id": "p"}')

    assert data == {"resourceType": "Patient", "id": "p"}


def test_json_decimal_precision_kept() -> None:
    data = read_fhir_json(b'{"value": 5.000, "other": 0.10, "exponent": 1.5e3}')

    assert data["value"] == Decimal("5.000")
    assert dump_fhir_json(data) == '{"value":5.000,"other":0.10,"exponent":1.5E+3}'


def test_json_leading_point_rejected() -> None:
    with pytest.raises(RecordRejected) as caught:
        read_fhir_json(b'{"value": .15}')

    assert "line 1 column 11" in str(caught.value)
    assert "'.15' needs a digit before the point" in str(caught.value)
    assert caught.value.element is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b'{"value": NaN}', "the number NaN is not valid JSON"),
        (b'{"id": "a", "id": "b"}', "property 'id' appears twice"),
        (b"\xff\xfe{}", "not UTF-8 text"),
        (b"", "invalid JSON at line 1 column 1"),
    ],
    ids=["nan", "duplicate-property", "utf-16", "empty"],
)
def test_json_invalid_text_rejected(text: bytes, expected: str) -> None:
    with pytest.raises(RecordRejected, match=expected):
        read_fhir_json(text)


def test_ndjson_lines_numbered() -> None:
    lines = list(read_ndjson(b'{"resourceType": "Patient", "id": "a"}\n\nnot json\r\n{"resourceType": "Patient"}\n'))

    assert [number for number, _ in lines] == [1, 3, 4]
    assert isinstance(lines[1][1], RecordRejected)
    assert lines[1][1].element == "line 3"


# Inputs: the table of edge cases. Columns: file, accepted, then the element of the rejection or the missing features.

ACCEPTED = [
    ("collection-bundle.json", "pt-in-01", set()),
    ("transaction-bundle.json", "pt-in-02", set()),
    ("batch-bundle.json", "pt-in-03", set()),
    ("byte-order-mark.json", "pt-in-01", set()),
    ("primitive-extension.json", "pt-in-01", set()),
    ("data-absent-reason.json", "pt-in-01", {"age", "nodes", "node4"}),
    ("decimal-precision.json", "pt-in-01", set()),
    ("contained-medication.json", "pt-in-01", set()),
    ("stage-by-condition-code.json", "pt-in-01", {"nodes", "node4"}),
    ("stage-group-observation.json", "pt-in-01", set()),
]

REJECTED = [
    ("datetime-without-timezone.json", "Bundle.entry[3].resource.effectiveDateTime", "needs a timezone"),
    ("unknown-element.json", "Bundle.entry[0].resource.favouriteColour", "not an element of this resource in FHIR R4"),
    ("stu3-resource.json", "Bundle.entry[9].resource.taken", "convert STU3 and R5 resources to R4"),
    ("r5-resource.json", "Bundle.entry[9].resource.medication", "convert STU3 and R5 resources to R4"),
    ("contained-dangling-reference.json", "Bundle.entry[10].resource.contained", "'#missing' names no contained"),
    ("entry-without-fullurl.json", "Bundle.entry[3].fullUrl", "requires a fullUrl"),
    ("single-observation.json", "Observation.subject", "Patient/pt-in-04 has not been received"),
]


@pytest.mark.parametrize(("name", "patient_id", "missing"), ACCEPTED, ids=[row[0] for row in ACCEPTED])
def test_input_accepted(name: str, patient_id: str, missing: set[str]) -> None:
    mapped = check_input(load(name))

    assert list(mapped) == [patient_id]
    assert set(mapped[patient_id].missing) == missing


@pytest.mark.parametrize(("name", "element", "reason"), REJECTED, ids=[row[0] for row in REJECTED])
def test_input_rejected(name: str, element: str, reason: str) -> None:
    with pytest.raises(RecordRejected) as caught:
        check_input(load(name))

    assert caught.value.element == element
    assert reason in caught.value.reason
    assert str(caught.value).startswith(element)


def test_leading_point_file_rejected() -> None:
    with pytest.raises(RecordRejected, match=r"line \d+ column \d+.*'\.15'"):
        load("decimal-leading-point.json")


def test_features_of_collection() -> None:
    features = check_input(load("collection-bundle.json"))["pt-in-01"].features

    assert features == {
        "rx": "Lev",
        "sex": 0.0,
        "age": 66.0,
        "obstruct": 0.0,
        "perfor": 0.0,
        "adhere": 0.0,
        "nodes": 2.0,
        "node4": 0.0,
        "differ": 2.0,
        "extent": 3.0,
        "surg": 0.0,
    }


def test_transaction_same_features_as_collection() -> None:
    collection = check_input(load("collection-bundle.json"))["pt-in-01"].features
    transaction = check_input(load("transaction-bundle.json"))["pt-in-02"].features

    assert transaction == collection


def test_transaction_urn_references_rewritten() -> None:
    incoming = incoming_resources(load("transaction-bundle.json"))
    subjects = {item.resource["subject"]["reference"] for item in incoming if "subject" in item.resource}

    assert subjects == {"Patient/pt-in-02"}
    assert incoming[2].key == "Observation/00000000-0000-4000-8000-000000000002"


def test_data_absent_reasons_reported() -> None:
    missing = check_input(load("data-absent-reason.json"))["pt-in-01"].missing

    assert missing["age"] == "Patient.birthDate is absent (data-absent-reason 'asked-declined')"
    assert "dataAbsentReason 'not-performed'" in missing["nodes"]


def test_primitive_extension_keeps_value() -> None:
    mapped = check_input(load("primitive-extension.json"))["pt-in-01"]

    assert mapped.features["age"] == 66.0


def test_contained_medication_counts() -> None:
    features = check_input(load("contained-medication.json"))["pt-in-01"].features

    assert features["rx"] == "Lev+5FU"


def test_stage_by_condition_code_explained() -> None:
    mapped = check_input(load("stage-by-condition-code.json"))["pt-in-01"]

    assert mapped.features["nodes"] is None
    assert "ICD-10 C77.2 says regional nodes are positive but not how many" in mapped.missing["nodes"]


def test_stage_group_ii_means_no_positive_nodes() -> None:
    features = check_input(load("stage-group-observation.json"))["pt-in-01"].features

    assert features["nodes"] == 0.0
    assert features["node4"] == 0.0


@pytest.mark.parametrize(
    ("code", "nodes", "node4"),
    [("pN0", 0.0, 0.0), ("pN1a", None, 0.0), ("N2b", None, 1.0), ("pN2a", None, None), ("cN2", None, None)],
)
def test_n_category_fills_node_features(code: str, nodes: float | None, node4: float | None) -> None:
    bundle = load("stage-group-observation.json")
    stage = next(entry["resource"] for entry in bundle["entry"] if entry["resource"]["id"] == "pt-in-01-stage")
    stage["code"] = {"coding": [{"system": "http://loinc.org", "code": "21900-6"}]}
    stage["valueCodeableConcept"] = {"coding": [{"system": "http://cancerstaging.org", "code": code}]}

    features = check_input(bundle)["pt-in-01"].features

    assert features["nodes"] == nodes
    assert features["node4"] == node4


def test_medication_administration_counts() -> None:
    bundle = load("collection-bundle.json")
    administration = {
        "resourceType": "MedicationAdministration",
        "id": "pt-in-01-fu-1",
        "status": "completed",
        "medicationCodeableConcept": {"coding": [{"system": "http://www.whocc.no/atc", "code": "L01BC02"}]},
        "subject": {"reference": "Patient/pt-in-01"},
        "effectiveDateTime": "2024-05-21T09:00:00+02:00",
    }
    bundle["entry"].append({"fullUrl": "urn:uuid:1f0c2a4e-5b6d-4e7f-8a9b-0c1d2e3f4a5b", "resource": administration})

    assert check_input(bundle)["pt-in-01"].features["rx"] == "Lev+5FU"
    administration["status"] = "not-done"
    assert check_input(bundle)["pt-in-01"].features["rx"] == "Lev"


def test_bundle_over_1000_entries_accepted() -> None:
    bundle = load("collection-bundle.json")
    template = bundle["entry"][3]["resource"]
    for number in range(1200):
        resource = copy.deepcopy(template)
        resource["id"] = f"pt-in-01-heart-rate-{number}"
        resource["code"] = {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}
        resource.pop("valueCodeableConcept")
        resource["valueQuantity"] = {"value": Decimal("72.0"), "unit": "/min"}
        bundle["entry"].append({"fullUrl": f"urn:uuid:00000000-0000-4000-9000-{number:012d}", "resource": resource})

    mapped = check_input(bundle)["pt-in-01"]

    assert len(bundle["entry"]) == 1210
    assert mapped.missing == {}


def test_bundle_types_limited() -> None:
    bundle = load("collection-bundle.json")
    bundle["type"] = "searchset"

    with pytest.raises(RecordRejected) as caught:
        check_input(bundle)

    assert caught.value.element == "Bundle.type"
    assert "'searchset' is not accepted" in caught.value.reason


def test_transaction_delete_rejected() -> None:
    bundle = load("transaction-bundle.json")
    bundle["entry"].append({"request": {"method": "DELETE", "url": "Observation/x"}})

    with pytest.raises(RecordRejected) as caught:
        check_input(bundle)

    assert caught.value.element == "Bundle.entry[10].request.method"
    assert "entered-in-error" in caught.value.reason


def test_two_patients_grouped() -> None:
    groups = group_by_patient(incoming_resources(load("two-patients.json")))

    assert sorted(groups) == ["pt-in-01", "pt-in-07"]
    assert len(groups["pt-in-01"].resources) == len(groups["pt-in-07"].resources) == 10


def test_subject_not_a_patient_rejected() -> None:
    bundle = load("collection-bundle.json")
    bundle["entry"][2]["resource"]["subject"] = {"reference": "Group/ward-3"}

    with pytest.raises(RecordRejected) as caught:
        check_input(bundle)

    assert caught.value.element == "Bundle.entry[2].resource.subject.reference"


def test_unplaced_medication_rejected_with_two_patients() -> None:
    bundle = load("two-patients.json")
    medication = {"resourceType": "Medication", "id": "med-lonely", "code": {"text": "levamisole"}}
    bundle["entry"].append({"fullUrl": "urn:uuid:2e1d0c9b-8a7f-4e6d-9c5b-4a3f2e1d0c9b", "resource": medication})

    with pytest.raises(RecordRejected) as caught:
        check_input(bundle)

    assert caught.value.element == "Bundle.entry[20].resource"
    assert "Medication/med-lonely names no patient" in caught.value.reason


def test_encoded_record_keeps_decimal_text() -> None:
    bundle = load("decimal-precision.json")
    record = PatientRecord(patient_id="pt-in-01", source_name="test", bundle=bundle)

    encoded = encode_record(record)

    assert b'"value":72.500' in encoded
    assert PatientRecord.from_bytes(encoded).event_id == record.event_id
    assert features_from_bundle(json.loads(encoded)["bundle"]).patient_id == "pt-in-01"


@pytest.mark.parametrize(
    "resource",
    [
        {"resourceType": "Transport", "id": "t1", "status": "completed", "intent": "order"},
        {"resourceType": "ProcedureRequest", "id": "p1", "status": "active", "intent": "order"},
    ],
    ids=["r5-transport", "stu3-procedure-request"],
)
def test_resource_type_not_r4_rejected(resource: dict[str, Any]) -> None:
    with pytest.raises(RecordRejected) as caught:
        check_input(resource)

    assert caught.value.element == f"{resource['resourceType']}.resourceType"
    assert "not a FHIR R4 resource type" in caught.value.reason
    assert "convert STU3 and R5 resources to R4" in caught.value.reason


def test_single_resource_error_path() -> None:
    patient = load("single-patient.json")
    patient["birthDate"] = "14.06.1957"

    with pytest.raises(RecordRejected) as caught:
        check_input(patient)

    assert caught.value.element == "Patient.birthDate"
    assert "FHIR dates are YYYY" in caught.value.reason
    assert "14.06.1957" not in caught.value.reason
