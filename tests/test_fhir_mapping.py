"""Tests of the mapping between FHIR R4 Bundles and the recurrence model features."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pydantic
import pytest
from fhir.resources.R4B.bundle import Bundle

from processors.prognosis.data import FEATURE_NAMES, load_recurrence_table, row_features
from processors.prognosis.errors import FeatureValueError, InvalidBundleError
from processors.prognosis.fhir_mapping import bundle_from_trial_row, features_from_bundle
from processors.prognosis.model import RecurrenceModel

REPO_ROOT = Path(__file__).resolve().parent.parent
RECORDS = REPO_ROOT / "samples" / "records"
WEIGHTS = REPO_ROOT / "processors" / "prognosis" / "weights" / "recurrence_catboost.cbm"

Mutation = Callable[[dict[str, Any]], None]


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return load_recurrence_table()


@pytest.fixture()
def bundle(table: pd.DataFrame) -> dict[str, Any]:
    # Row 0: Lev+5FU, 5 positive nodes, every value present.
    return bundle_from_trial_row(table.iloc[0], "pt-test")


def resource_of(bundle: dict[str, Any], resource_id: str) -> dict[str, Any]:
    return next(entry["resource"] for entry in bundle["entry"] if entry["resource"].get("id") == resource_id)


def remove_resource(bundle: dict[str, Any], resource_id: str) -> None:
    bundle["entry"] = [entry for entry in bundle["entry"] if entry["resource"].get("id") != resource_id]


def test_round_trip_many_rows(table: pd.DataFrame) -> None:
    with_missing = table.index[table["nodes"].isna() | table["differ"].isna()]
    rows = sorted(set(with_missing) | set(range(0, len(table), 9)))
    assert len(with_missing) > 30

    for position in rows:
        row = table.iloc[position]
        pseudonym = f"pt-{position:04d}"
        record = features_from_bundle(bundle_from_trial_row(row, pseudonym))

        expected = row_features(row)
        assert record.patient_id == pseudonym
        assert record.features == expected, pseudonym
        assert set(record.missing) == {name for name in FEATURE_NAMES if expected[name] is None}, pseudonym


def test_generated_bundle_is_valid_r4b(bundle: dict[str, Any]) -> None:
    parsed = Bundle.model_validate(bundle)

    assert parsed.type == "collection"
    patient = resource_of(bundle, "pt-test")
    assert set(patient) == {"resourceType", "id", "gender", "birthDate"}


def test_missing_nodes_reason(table: pd.DataFrame) -> None:
    row = table[table["nodes"].isna()].iloc[0]
    record = features_from_bundle(bundle_from_trial_row(row, "pt-missing"))

    assert record.features["nodes"] is None
    assert "LOINC 21893-3" in record.missing["nodes"]
    assert record.features["node4"] == row["node4"]


def test_treatment_arms(table: pd.DataFrame) -> None:
    for arm, statements in (("Obs", 0), ("Lev", 1), ("Lev+5FU", 2)):
        row = table[table["rx"] == arm].iloc[0]
        bundle = bundle_from_trial_row(row, "pt-arm")
        kinds = [entry["resource"]["resourceType"] for entry in bundle["entry"]]

        assert kinds.count("MedicationStatement") == statements
        assert features_from_bundle(bundle).features["rx"] == arm


def test_sample_records_map_and_predict() -> None:
    model = RecurrenceModel.load(WEIGHTS)
    paths = sorted(RECORDS.glob("pt-*.json"))
    assert len(paths) >= 6

    risk_groups = set()
    missing_nodes = 0
    for path in paths:
        record = features_from_bundle(json.loads(path.read_text()))
        prediction = model.predict(record.features, record.missing)

        assert record.patient_id == path.stem
        risk_groups.add(prediction.risk_group)
        missing_nodes += "nodes" in prediction.missing_features
    assert {"low", "high"} <= risk_groups
    assert missing_nodes >= 1


def test_invalid_sample_record_rejected() -> None:
    bundle = json.loads((RECORDS / "invalid-bundle.json").read_text())

    with pytest.raises(InvalidBundleError) as raised:
        features_from_bundle(bundle)

    assert raised.value.element_path == "Bundle.entry[0].resource.birthDate"
    assert "does not match" in str(raised.value)


def test_invalid_sample_record_fails_r4b_schema() -> None:
    bundle = json.loads((RECORDS / "invalid-bundle.json").read_text())

    with pytest.raises(pydantic.ValidationError):
        Bundle.model_validate(bundle)


def _set_patient(field: str, value: object) -> Mutation:
    return lambda bundle: bundle["entry"][0]["resource"].__setitem__(field, value)


def _set_nodes(field: str, value: object) -> Mutation:
    return lambda bundle: resource_of(bundle, "pt-test-nodes").__setitem__(field, value)


def _add_second_patient(bundle: dict[str, Any]) -> None:
    bundle["entry"].append({"resource": {"resourceType": "Patient", "id": "pt-other"}})


def _add_r5_resource(bundle: dict[str, Any]) -> None:
    bundle["entry"].append({"resource": {"resourceType": "Transport", "status": "completed", "intent": "order"}})


def _grade_g4(bundle: dict[str, Any]) -> None:
    concept = {"coding": [{"system": "http://snomed.info/sct", "code": "258245003"}]}
    resource_of(bundle, "pt-test-differ")["valueCodeableConcept"] = concept


def _t_category(code: str) -> Mutation:
    def mutate(bundle: dict[str, Any]) -> None:
        concept = {"coding": [{"system": "http://cancerstaging.org", "code": code}]}
        resource_of(bundle, "pt-test-extent")["valueCodeableConcept"] = concept

    return mutate


@pytest.mark.parametrize(
    ("mutate", "path", "message"),
    [
        (_set_patient("gender", "unknown-value"), "Bundle.entry[0].resource.gender", "not a valid code"),
        (_set_patient("birthDate", "1950-13-01"), "Bundle.entry[0].resource.birthDate", "'1950-13-01'"),
        (_set_patient("birthDate", 1950), "Bundle.entry[0].resource.birthDate", "1950"),
        (_set_nodes("valueInteger", "three"), "Bundle.entry[2].resource.valueInteger", "valid integer"),
        (_set_nodes("effectiveDateTime", "2019-03-01T10:00:00"), "Bundle.entry[2].resource.effectiveDateTime", "2019"),
        (_set_nodes("triggeredBy", [{"type": "reflex"}]), "Bundle.entry[2].resource.triggeredBy", "Extra inputs"),
        (_set_nodes("status", "done"), "Bundle.entry[2].resource.status", "'done'"),
        (lambda bundle: resource_of(bundle, "pt-test-nodes").pop("code"), "Bundle.entry[2].resource.code", "required"),
        (lambda bundle: bundle.__setitem__("resourceType", "Patient"), "Bundle.resourceType", "'Patient'"),
        (lambda bundle: bundle.__setitem__("type", "bogus"), "Bundle.type", "'bogus'"),
        (_add_r5_resource, "Bundle.entry[12].resource.resourceType", "'Transport'"),
        (_set_nodes("valueInteger", True), "Bundle.entry[2].resource.valueInteger", "boolean"),
        (_add_second_patient, "Bundle.entry", "found 2"),
        (lambda bundle: bundle["entry"].pop(0), "Bundle.entry", "found 0"),
        (lambda bundle: bundle["entry"][0]["resource"].pop("id"), "Bundle.entry[0].resource.id", "no id"),
        (
            _set_nodes("subject", {"reference": "Patient/pt-other"}),
            "Bundle.entry[2].resource.subject.reference",
            "'Patient/pt-other'",
        ),
        (_grade_g4, "Bundle.entry[4].resource.valueCodeableConcept", "258245003"),
        (_t_category("pTX"), "Bundle.entry[5].resource.valueCodeableConcept", "T1 to T4"),
        (
            lambda bundle: resource_of(bundle, "pt-test-nodes").pop("valueInteger"),
            "Bundle.entry[2].resource.value[x]",
            "valueInteger",
        ),
    ],
)
def test_invalid_bundle_names_element(bundle: dict[str, Any], mutate: Mutation, path: str, message: str) -> None:
    assert [entry["resource"]["id"] for entry in bundle["entry"][2:6]] == [
        "pt-test-nodes",
        "pt-test-node4",
        "pt-test-differ",
        "pt-test-extent",
    ]
    mutate(bundle)

    with pytest.raises(InvalidBundleError) as raised:
        features_from_bundle(bundle)

    assert raised.value.element_path == path
    assert message in str(raised.value)


def test_not_an_object_rejected() -> None:
    with pytest.raises(InvalidBundleError, match="expected a JSON object, got list"):
        features_from_bundle([])  # type: ignore[arg-type]


def test_unusable_observation_status_is_missing(bundle: dict[str, Any]) -> None:
    resource_of(bundle, "pt-test-nodes")["status"] = "entered-in-error"
    record = features_from_bundle(bundle)

    assert record.features["nodes"] is None
    assert "status amended, corrected, final, preliminary" in record.missing["nodes"]


def test_most_recent_observation_wins(bundle: dict[str, Any]) -> None:
    later = copy.deepcopy(resource_of(bundle, "pt-test-nodes"))
    later.update(id="pt-test-nodes-2", valueInteger=9, effectiveDateTime="2020-01-01T08:00:00+01:00")
    bundle["entry"].insert(2, {"resource": later})

    assert features_from_bundle(bundle).features["nodes"] == 9.0


def test_node4_derived_when_absent(bundle: dict[str, Any]) -> None:
    remove_resource(bundle, "pt-test-node4")
    record = features_from_bundle(bundle)

    assert record.features["nodes"] == 5.0
    assert record.features["node4"] == 1.0
    assert "node4" not in record.missing


def test_node4_missing_without_nodes(bundle: dict[str, Any]) -> None:
    remove_resource(bundle, "pt-test-node4")
    remove_resource(bundle, "pt-test-nodes")
    record = features_from_bundle(bundle)

    assert record.features["node4"] is None
    assert "number of positive nodes is missing too" in record.missing["node4"]


def test_fluorouracil_alone_is_no_trial_arm(bundle: dict[str, Any]) -> None:
    remove_resource(bundle, "pt-test-levamisole")
    record = features_from_bundle(bundle)
    model = RecurrenceModel.load(WEIGHTS)

    assert record.features["rx"] is None
    assert "fluorouracil without levamisole" in record.missing["rx"]
    with pytest.raises(FeatureValueError, match="fluorouracil without levamisole"):
        model.predict(record.features, record.missing)


def test_not_taken_medication_ignored(bundle: dict[str, Any]) -> None:
    resource_of(bundle, "pt-test-fluorouracil")["status"] = "not-taken"

    assert features_from_bundle(bundle).features["rx"] == "Lev"


def test_medication_reference_resolved(bundle: dict[str, Any]) -> None:
    statement = resource_of(bundle, "pt-test-fluorouracil")
    medication = {"resourceType": "Medication", "id": "med-5fu", "code": statement.pop("medicationCodeableConcept")}
    statement["medicationReference"] = {"reference": "Medication/med-5fu"}
    bundle["entry"].append({"resource": medication})

    assert features_from_bundle(bundle).features["rx"] == "Lev+5FU"


@pytest.mark.parametrize("reference", ["Patient/pt-test", "https://fhir.example.org/fhir/Patient/pt-test"])
def test_patient_reference_forms(bundle: dict[str, Any], reference: str) -> None:
    expected = features_from_bundle(bundle).features
    for entry in bundle["entry"][1:]:
        entry["resource"]["subject"] = {"reference": reference}

    assert features_from_bundle(bundle).features == expected


def test_gender_other_is_missing_sex(bundle: dict[str, Any]) -> None:
    bundle["entry"][0]["resource"]["gender"] = "other"
    record = features_from_bundle(bundle)

    assert record.features["sex"] is None
    assert "male or female" in record.missing["sex"]


def test_partial_birth_date_is_missing_age(bundle: dict[str, Any]) -> None:
    bundle["entry"][0]["resource"]["birthDate"] = "1950"
    record = features_from_bundle(bundle)

    assert record.features["age"] is None
    assert "'1950'" in record.missing["age"]


def test_onset_age_in_years(bundle: dict[str, Any]) -> None:
    condition = resource_of(bundle, "pt-test-colon-cancer")
    del condition["onsetDateTime"]
    condition["onsetAge"] = {"value": 71, "unit": "years", "system": "http://unitsofmeasure.org", "code": "a"}

    assert features_from_bundle(bundle).features["age"] == 71.0


@pytest.mark.parametrize(("code", "extent"), [("pT1", 1.0), ("cT2", 2.0), ("T3", 3.0), ("pT4b", 4.0)])
def test_t_category_without_trial_code(bundle: dict[str, Any], code: str, extent: float) -> None:
    _t_category(code)(bundle)

    assert features_from_bundle(bundle).features["extent"] == extent


def test_bundle_of_1000_entries(bundle: dict[str, Any]) -> None:
    template = resource_of(bundle, "pt-test-obstruct")
    for number in range(1000 - len(bundle["entry"])):
        unrelated = copy.deepcopy(template)
        unrelated["id"] = f"pt-test-other-{number}"
        unrelated["code"] = {"coding": [{"system": "http://loinc.org", "code": "8302-2"}]}
        bundle["entry"].append({"resource": unrelated})

    record = features_from_bundle(bundle)

    assert len(bundle["entry"]) == 1000
    assert record.missing == {}


def test_invalid_pseudonym_rejected(table: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="pseudonym 'pt 1' is invalid"):
        bundle_from_trial_row(table.iloc[0], "pt 1")
