"""The record intake's verdict on each edge-case input against the HAPI FHIR validator's.

Every file in tests/data/fhir-inputs/ goes through the validator (base R4
profiles, the severity policy of consumers/validation.py) and through
``producers.intake.check_input``. Both verdicts must match the table, and
where they differ the table gives the reason, which docs/fhir-conformance.md
repeats.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from consumers.validation import ValidatorProcess
from producers.fhir_input import RecordRejected, dump_fhir_json, read_fhir_json, read_ndjson
from producers.intake import check_input

INPUTS = Path(__file__).resolve().parent / "data" / "fhir-inputs"

NEEDS_STORED_PATIENT = "stricter by design: the intake takes it once the Patient has been received, not on its own"


@dataclass(frozen=True)
class Verdicts:
    """Expected verdicts on one input: True accepts. ``difference`` explains a disagreement."""

    validator: bool
    intake: bool
    difference: str | None = None


VERDICTS: dict[str, Verdicts] = {
    "collection-bundle.json": Verdicts(validator=True, intake=True),
    "transaction-bundle.json": Verdicts(validator=True, intake=True),
    "batch-bundle.json": Verdicts(validator=True, intake=True),
    "batch-without-fullurl.json": Verdicts(validator=False, intake=False),
    "byte-order-mark.json": Verdicts(validator=True, intake=True),
    "primitive-extension.json": Verdicts(validator=True, intake=True),
    "data-absent-reason.json": Verdicts(validator=True, intake=True),
    "datetime-without-timezone.json": Verdicts(validator=False, intake=False),
    "decimal-precision.json": Verdicts(validator=True, intake=True),
    "decimal-leading-point.json": Verdicts(validator=False, intake=False),
    "unknown-element.json": Verdicts(validator=False, intake=False),
    "stu3-resource.json": Verdicts(validator=False, intake=False),
    "r5-resource.json": Verdicts(validator=False, intake=False),
    "contained-medication.json": Verdicts(validator=True, intake=True),
    "contained-dangling-reference.json": Verdicts(validator=False, intake=False),
    "stage-by-condition-code.json": Verdicts(validator=True, intake=True),
    "stage-group-observation.json": Verdicts(validator=True, intake=True),
    "entry-without-fullurl.json": Verdicts(validator=False, intake=False),
    "two-patients.json": Verdicts(
        validator=True,
        intake=False,
        difference="stricter by design: a JSON input is one patient's record; several patients come as NDJSON",
    ),
    "single-patient.json": Verdicts(validator=True, intake=True),
    "single-observation.json": Verdicts(validator=True, intake=False, difference=NEEDS_STORED_PATIENT),
    "later-nodes.json": Verdicts(validator=True, intake=False, difference=NEEDS_STORED_PATIENT),
    "older-nodes.json": Verdicts(validator=True, intake=False, difference=NEEDS_STORED_PATIENT),
}


@pytest.fixture(scope="module")
def validator() -> Iterator[ValidatorProcess]:
    with ValidatorProcess() as process:
        yield process


def intake_accepts(raw: bytes) -> bool:
    """Return the verdict of RecordIntake.accept_bytes for an input with no stored resources."""
    try:
        return len(check_input(read_fhir_json(raw))) == 1
    except RecordRejected:
        return False


def test_table_covers_every_input() -> None:
    assert sorted(path.name for path in INPUTS.glob("*.json")) == sorted(VERDICTS)


@pytest.mark.parametrize("name", sorted(VERDICTS))
def test_input_verdicts(validator: ValidatorProcess, name: str) -> None:
    raw = (INPUTS / name).read_bytes()
    expected = VERDICTS[name]

    report = validator.validate(raw)

    assert report.is_valid == expected.validator, report.describe()
    assert intake_accepts(raw) == expected.intake
    assert (expected.validator != expected.intake) == (expected.difference is not None)


def test_ndjson_lines_valid(validator: ValidatorProcess) -> None:
    lines = list(read_ndjson((INPUTS / "bulk-export.ndjson").read_bytes()))

    reports = [validator.validate(dump_fhir_json(resource)) for _, resource in lines]

    assert len(lines) == 20
    assert [report.describe() for report in reports if not report.is_valid] == []


def large_bundle() -> dict[str, Any]:
    bundle = read_fhir_json((INPUTS / "collection-bundle.json").read_bytes())
    template = bundle["entry"][3]["resource"]
    for number in range(1200):
        resource = copy.deepcopy(template)
        resource["id"] = f"pt-in-01-heart-rate-{number}"
        resource["code"] = {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}
        resource.pop("valueCodeableConcept")
        resource["valueQuantity"] = {
            "value": Decimal("72.0"),
            "unit": "beats/minute",
            "system": "http://unitsofmeasure.org",
            "code": "/min",
        }
        bundle["entry"].append({"fullUrl": f"urn:uuid:00000000-0000-4000-9000-{number:012d}", "resource": resource})
    return bundle


def test_bundle_over_1000_entries_both_accept(validator: ValidatorProcess) -> None:
    raw = dump_fhir_json(large_bundle()).encode("utf-8")

    report = validator.validate(raw)

    assert report.is_valid, report.describe()
    assert intake_accepts(raw)
