"""FHIR R4 conformance of what the system emits and accepts, checked by the HAPI FHIR instance validator.

One validator process serves the whole module, because loading the R4
definitions and the HL7 Terminology package takes 11 to 29 s on 2 cores. The
severity policy is the harness's: an issue about a code whose code system is
not available offline is information, and every other error is a failure
(docs/fhir-conformance.md).

To cover a new kind of emitted resource, add one row to ``EMITTED_RESOURCES``.
"""

from __future__ import annotations

import copy
import io
import json
import re
import shutil
import subprocess
import tarfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from consumers.devices import model_device
from consumers.reports import ReportedFinding, diagnostic_report
from consumers.resources import finding_observation, heatmap_media, risk_assessment, risk_observation
from consumers.transaction import DEFAULT_BASE_URL, latest_versions, transaction_bundle
from consumers.validation import (
    Issue,
    TerminologyFetchError,
    TerminologyPackage,
    ValidationReport,
    ValidatorProcess,
    ValidatorToolMissingError,
    ensure_validator_jar,
    fetch_terminology_package,
    hapi_version,
    java_executable,
    run_validate_command,
    terminology_package,
)
from crc_medai.settings import Settings
from processors.detection.tracking import FindingTracker
from processors.prognosis.agent import RecordScorer
from processors.prognosis.data import load_recurrence_table
from processors.prognosis.errors import InvalidBundleError
from processors.prognosis.fhir_mapping import bundle_from_trial_row, features_from_bundle
from producers.records import RecordFileError, load_bundle
from schemas.messages import DetectionResult, ModelRef, PatientRecord, PolypFinding, PrognosisResult, Region

REPO_ROOT = Path(__file__).resolve().parent.parent
RECORDS = REPO_ROOT / "samples" / "records"
SAMPLE_PATHS = sorted(RECORDS.glob("pt-*.json"))
CAPTURED_AT = datetime(2026, 3, 2, 9, 41, 7, 250000, tzinfo=UTC)

Resource = dict[str, Any]
Mutation = Callable[[Resource], None]


@pytest.fixture(scope="module")
def validator() -> Iterator[ValidatorProcess]:
    with ValidatorProcess() as process:
        yield process


# Known deviations: errors in today's emitted resources, each with its reason and proposed fix.


@dataclass(frozen=True)
class KnownDeviation:
    """A validator error in emitted resources that is tolerated until its fix lands.

    ``location`` is a regular expression that must match the end of the issue's location.
    """

    location: str
    diagnostics: str
    reason: str

    def matches(self, issue: Issue) -> bool:
        return re.search(self.location + "$", issue.location) is not None and issue.diagnostics == self.diagnostics


KNOWN_DEVIATIONS: tuple[KnownDeviation, ...] = ()


def unexpected_errors(report: ValidationReport) -> list[str]:
    return [str(issue) for issue in report.errors if not any(known.matches(issue) for known in KNOWN_DEVIATIONS)]


# Emitted resources, built by the real code paths from realistic inputs.


def detection_results(procedure_id: str, regions: list[Region | None]) -> list[DetectionResult]:
    """Detections of one polyp passing through the view at 30 fps, as the detection processor publishes them.

    Five clear frames come first and ten after, so the tracker opens the
    finding on the first flagged frame and closes it once the polyp has left.
    """
    threshold = Settings().detection_threshold
    probabilities = [0.04, 0.06, 0.05, 0.12, 0.31] + [0.7 + 0.02 * index for index in range(len(regions))] + [0.08] * 10
    padded = [None] * 5 + regions + [None] * 10
    results = []
    for sequence, (probability, region) in enumerate(zip(probabilities, padded, strict=True)):
        frame_event_id = uuid.uuid4()
        captured_at = CAPTURED_AT + timedelta(milliseconds=round(sequence * 1000 / 30))
        flagged = probability >= threshold
        results.append(
            DetectionResult(
                frame_event_id=frame_event_id,
                procedure_id=procedure_id,
                patient_id="pt-0001",
                sequence=sequence,
                captured_at=captured_at,
                source_ts=captured_at + timedelta(milliseconds=41),
                polyp_probability=probability,
                flagged=flagged,
                region=region if flagged else None,
                heatmap_key=f"heatmaps/{procedure_id}/{sequence:06d}-{frame_event_id}.png" if flagged else None,
                heatmap_bucket="crc-heatmaps" if flagged else None,
                explanation_method="Grad-CAM on encoder stage 4, presence logit" if flagged else None,
                model=ModelRef(name="polyp-unet-resnet18", version="1.0.0"),
                inference_ms=21.4,
            )
        )
    return results


def tracked_findings(results: list[DetectionResult]) -> dict[str, PolypFinding]:
    """Run detections through the detection processor's FindingTracker; return its findings by status."""
    tracker = FindingTracker()
    findings = [finding for result in results for finding in tracker.update(result)]
    # The end of the stream: the idle timeout closes what the capture-time gap has not closed yet.
    findings += tracker.close_idle(now=float("inf"))
    return {finding.status: finding for finding in findings}


@dataclass(frozen=True)
class EmittedInputs:
    """Messages the FHIR consumer turns into resources, produced by the real upstream code."""

    findings: dict[str, PolypFinding]
    prognoses: dict[str, PrognosisResult]


@pytest.fixture(scope="module")
def emitted_inputs() -> EmittedInputs:
    moving_box = [Region(x=212 + 3 * index, y=148 + 2 * index, width=61, height=47) for index in range(12)]
    with_region = tracked_findings(detection_results("proc-2026-0302-07", moving_box))
    # The presence head can flag frames whose mask is empty, so a finding may have no region.
    without_region = tracked_findings(detection_results("proc-2026-0302-08", [None] * 4))

    # The prognosis processor's RecordScorer scores the sample records.
    scorer = RecordScorer(Settings())
    prognoses = {}
    for path in SAMPLE_PATHS:
        record = PatientRecord(patient_id=path.stem, source_name=path.name, bundle=json.loads(path.read_text()))
        prognoses[path.stem] = scorer.process(record)

    findings = {
        "open": with_region["open"],
        "closed": with_region["closed"],
        "closed-no-region": without_region["closed"],
    }
    return EmittedInputs(findings=findings, prognoses=prognoses)


@dataclass(frozen=True)
class EmittedCase:
    """One kind of resource the system emits, and how to build it from realistic inputs."""

    name: str
    resource_type: str
    build: Callable[[EmittedInputs], Resource]


def heatmap(inputs: EmittedInputs, key: str) -> Resource:
    media = heatmap_media(inputs.findings[key])
    assert media is not None, f"the {key} finding has no heatmap"
    return media


def report(inputs: EmittedInputs, *keys: str) -> Resource:
    """The DiagnosticReport the consumer emits after the given finding events, as ProcedureFindings stores them."""
    findings = [ReportedFinding.from_finding(inputs.findings[key]) for key in keys]
    return diagnostic_report(inputs.findings[keys[0]].procedure_id, findings)


def devices(inputs: EmittedInputs) -> list[Resource]:
    models = {finding.model for finding in inputs.findings.values()} | {
        result.model for result in inputs.prognoses.values()
    }
    return [model_device(model, Settings().model_card_base_url) for model in sorted(models, key=str)]


def device_named(inputs: EmittedInputs, prefix: str) -> Resource:
    return next(device for device in devices(inputs) if device["deviceName"][0]["name"].startswith(prefix))


def consumer_output(inputs: EmittedInputs) -> list[Resource]:
    """Every resource the consumer emits for the inputs, in its sending order."""
    resources = devices(inputs)
    for key in ("open", "closed"):
        resources += [heatmap(inputs, key), finding_observation(inputs.findings[key]), report(inputs, key)]
    for result in inputs.prognoses.values():
        resources += [risk_assessment(result), risk_observation(result)]
    return resources


def delivered_bundle(inputs: EmittedInputs) -> Resource:
    """The transaction Bundle that delivers the consumer's output to a FHIR server."""
    return transaction_bundle(latest_versions(consumer_output(inputs)))


EMITTED_RESOURCES: list[EmittedCase] = [
    *(
        EmittedCase(f"finding-{key}", "Observation", lambda inputs, key=key: finding_observation(inputs.findings[key]))
        for key in ("open", "closed", "closed-no-region")
    ),
    *(
        EmittedCase(f"heatmap-{key}", "Media", lambda inputs, key=key: heatmap(inputs, key))
        for key in ("open", "closed")
    ),
    EmittedCase("report-open", "DiagnosticReport", lambda inputs: report(inputs, "open")),
    EmittedCase("report-closed", "DiagnosticReport", lambda inputs: report(inputs, "closed")),
    EmittedCase("report-no-region", "DiagnosticReport", lambda inputs: report(inputs, "closed-no-region")),
    *(
        EmittedCase(
            f"risk-{path.stem}", "Observation", lambda inputs, key=path.stem: risk_observation(inputs.prognoses[key])
        )
        for path in SAMPLE_PATHS
    ),
    *(
        EmittedCase(
            f"assessment-{path.stem}",
            "RiskAssessment",
            lambda inputs, key=path.stem: risk_assessment(inputs.prognoses[key]),
        )
        for path in SAMPLE_PATHS
    ),
    EmittedCase("device-detector", "Device", lambda inputs: device_named(inputs, "polyp-")),
    EmittedCase("device-recurrence", "Device", lambda inputs: device_named(inputs, "crc-recurrence-")),
    EmittedCase("transaction-bundle", "Bundle", delivered_bundle),
]


@pytest.mark.parametrize("case", EMITTED_RESOURCES, ids=lambda case: case.name)
def test_emitted_resource_conforms(
    validator: ValidatorProcess, emitted_inputs: EmittedInputs, case: EmittedCase
) -> None:
    resource = case.build(emitted_inputs)

    report = validator.validate(resource)

    assert resource["resourceType"] == case.resource_type
    assert unexpected_errors(report) == [], report.describe()


def test_known_deviations_still_occur(validator: ValidatorProcess, emitted_inputs: EmittedInputs) -> None:
    issues = [issue for case in EMITTED_RESOURCES for issue in validator.validate(case.build(emitted_inputs)).errors]

    for known in KNOWN_DEVIATIONS:
        assert any(known.matches(issue) for issue in issues), f"fixed, remove it from KNOWN_DEVIATIONS: {known}"


def test_emitted_inputs_cover_variants(emitted_inputs: EmittedInputs) -> None:
    # The table is meant to cover these variants of each resource; check the inputs still produce them.
    findings = emitted_inputs.findings

    assert findings["closed"].frames_flagged == 12
    assert findings["closed"].region is not None
    assert findings["closed-no-region"].region is None
    assert "note" in risk_observation(emitted_inputs.prognoses["pt-0006"])
    assert {result.risk_group for result in emitted_inputs.prognoses.values()} == {"low", "intermediate", "high"}


def test_transaction_bundle_covers_every_kind(emitted_inputs: EmittedInputs) -> None:
    bundle = delivered_bundle(emitted_inputs)
    full_urls = {entry["fullUrl"] for entry in bundle["entry"]}

    kinds = {entry["resource"]["resourceType"] for entry in bundle["entry"]}
    assert kinds == {"Device", "Media", "Observation", "DiagnosticReport", "RiskAssessment"}
    for entry in bundle["entry"]:
        for reference in re.findall(r'"reference": "((?!Patient/)[A-Za-z]+/[^"]+)"', json.dumps(entry["resource"])):
            assert f"{DEFAULT_BASE_URL}/{reference}" in full_urls, f"{reference} does not resolve inside the Bundle"


# Severity policy


def observation(**elements: Any) -> Resource:
    resource: Resource = {"resourceType": "Observation", "status": "final", "code": {"text": "test"}}
    resource.update(elements)
    return resource


def coded(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


def test_policy_unknown_code_system_is_information(validator: ValidatorProcess) -> None:
    report = validator.validate(observation(code=coded("https://crc-medai.example/fhir/CodeSystem/results", "x")))

    issues = [issue for issue in report.issues if issue.location == "Observation.code"]
    assert report.is_valid
    assert [issue.severity for issue in issues] == ["information"]
    assert issues[0].diagnostics.startswith("[downgraded from warning: the code system is not available offline]")


def test_policy_snomed_and_loinc_unchecked(validator: ValidatorProcess) -> None:
    resource = observation(
        code=coded("http://loinc.org", "00000-0"),
        bodySite=coded("http://snomed.info/sct", "999999999999"),
    )

    report = validator.validate(resource)

    assert report.is_valid, report.describe()


def test_policy_unknown_code_in_core_system_fails(validator: ValidatorProcess) -> None:
    resource = observation(category=[coded("http://terminology.hl7.org/CodeSystem/observation-category", "bogus")])

    report = validator.validate(resource)

    assert [issue.location for issue in report.errors] == ["Observation.category[0]"]
    assert "Unknown code" in report.errors[0].diagnostics


AI_ASSERTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "AIAST"}


def test_terminology_accepts_aiast_label(validator: ValidatorProcess) -> None:
    # AIAST exists only in the HL7 Terminology editions of v3-ObservationValue, not in the R4 core one.
    report = validator.validate(observation(meta={"security": [AI_ASSERTED]}))

    assert report.is_valid, report.describe()
    assert [issue for issue in report.issues if "meta.security" in issue.location] == []


def test_terminology_unknown_code_fails(validator: ValidatorProcess) -> None:
    label = {**AI_ASSERTED, "code": "NOT-A-LABEL"}

    report = validator.validate(observation(meta={"security": [label]}))

    assert [issue.location for issue in report.errors] == ["Observation.meta.security[0]"]
    assert "Unknown code" in report.errors[0].diagnostics


def test_policy_required_binding_fails(validator: ValidatorProcess) -> None:
    report = validator.validate(observation(status="done"))

    assert "Observation.status" in [issue.location for issue in report.errors]


def test_policy_datetime_without_timezone_fails(validator: ValidatorProcess) -> None:
    report = validator.validate(observation(effectiveDateTime="2019-03-01T10:00:00"))

    assert [issue.location for issue in report.errors] == ["Observation.effective.ofType(dateTime)"]
    assert "timezone" in report.errors[0].diagnostics


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not a FHIR resource"),
        (b'{"resourceType":"Observation",', "not a FHIR resource"),
        (b'{"status":"final"}', "resourceType"),
        (b'{"resourceType":"Transport","status":"completed","intent":"order"}', "Transport"),
    ],
    ids=["text", "truncated-json", "no-resource-type", "r5-resource"],
)
def test_unreadable_input_is_fatal(validator: ValidatorProcess, body: bytes, message: str) -> None:
    report = validator.validate(body)

    assert [issue.severity for issue in report.errors] == ["fatal"]
    assert message in report.errors[0].diagnostics


def test_xml_resource_validated(validator: ValidatorProcess) -> None:
    body = (
        b'<Observation xmlns="http://hl7.org/fhir"><status value="done"/><code><text value="x"/></code></Observation>'
    )

    report = validator.validate(body)

    assert "Observation.status" in [issue.location for issue in report.errors]


# The validator server's HTTP behaviour


def test_server_rejects_get(validator: ValidatorProcess) -> None:
    response = validator.request("GET", "/validate")

    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"
    assert response.json()["resourceType"] == "OperationOutcome"


def test_server_rejects_empty_body(validator: ValidatorProcess) -> None:
    response = validator.request("POST", "/validate")

    assert response.status_code == 400
    assert "body is empty" in response.json()["issue"][0]["diagnostics"]


def test_server_reports_pinned_version(validator: ValidatorProcess) -> None:
    response = validator.request("GET", "/health")

    package = terminology_package()
    assert response.json() == {
        "status": "ok",
        "hapiVersion": hapi_version(),
        "terminology": f"{package.name}#{package.version}",
    }


# Sample records and the record producer's edge cases


@pytest.mark.parametrize("path", SAMPLE_PATHS, ids=lambda path: path.stem)
def test_sample_record_conforms(validator: ValidatorProcess, path: Path) -> None:
    report = validator.validate(path.read_bytes())

    assert report.is_valid, report.describe()


def test_invalid_sample_record_rejected(validator: ValidatorProcess) -> None:
    report = validator.validate((RECORDS / "invalid-bundle.json").read_bytes())

    assert [issue.location for issue in report.errors] == ["Bundle.entry[0].resource/*Patient/pt-invalid*/.birthDate"]
    assert "Not a valid date format: '07.09.1939'" in report.errors[0].diagnostics


@pytest.fixture(scope="module")
def trial_table() -> pd.DataFrame:
    return load_recurrence_table()


@pytest.fixture()
def bundle(trial_table: pd.DataFrame) -> Resource:
    # Row 0: Lev+5FU, 5 positive nodes, every value present; the edge-case tests of the mapping start from it.
    return bundle_from_trial_row(trial_table.iloc[0], "pt-test")


def resource_of(bundle: Resource, resource_id: str) -> Resource:
    return next(entry["resource"] for entry in bundle["entry"] if entry["resource"].get("id") == resource_id)


def remove_resource(bundle: Resource, resource_id: str) -> None:
    bundle["entry"] = [entry for entry in bundle["entry"] if entry["resource"].get("id") != resource_id]


def set_patient(field: str, value: object) -> Mutation:
    return lambda bundle: bundle["entry"][0]["resource"].__setitem__(field, value)


def set_nodes(field: str, value: object) -> Mutation:
    return lambda bundle: resource_of(bundle, "pt-test-nodes").__setitem__(field, value)


def set_value_concept(resource_id: str, system: str, code: str) -> Mutation:
    return lambda bundle: resource_of(bundle, resource_id).__setitem__("valueCodeableConcept", coded(system, code))


def entry(resource: Resource) -> Resource:
    """Wrap a resource in a Bundle entry with a ``urn:uuid`` fullUrl, which R4 requires outside transactions."""
    full_url = f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, resource['resourceType'] + '/' + resource.get('id', ''))}"
    return {"fullUrl": full_url, "resource": resource}


def add_resource(resource: Resource) -> Mutation:
    return lambda bundle: bundle["entry"].append(entry(copy.deepcopy(resource)))


def add_later_nodes(bundle: Resource) -> None:
    later = copy.deepcopy(resource_of(bundle, "pt-test-nodes"))
    later.update(id="pt-test-nodes-2", valueInteger=9, effectiveDateTime="2020-01-01T08:00:00+01:00")
    bundle["entry"].insert(2, entry(later))


def add_entry_without_full_url(bundle: Resource) -> None:
    # The mapping tests add entries this way; R4 requires a fullUrl on every entry of a collection Bundle.
    later = copy.deepcopy(resource_of(bundle, "pt-test-nodes"))
    later.update(id="pt-test-nodes-2", valueInteger=9, effectiveDateTime="2020-01-01T08:00:00+01:00")
    bundle["entry"].insert(2, {"resource": later})


def refer_to_medication(bundle: Resource) -> None:
    statement = resource_of(bundle, "pt-test-fluorouracil")
    medication = {"resourceType": "Medication", "id": "med-5fu", "code": statement.pop("medicationCodeableConcept")}
    statement["medicationReference"] = {"reference": "Medication/med-5fu"}
    bundle["entry"].append(entry(medication))


def set_subjects(reference: str) -> Mutation:
    def mutate(bundle: Resource) -> None:
        for entry in bundle["entry"][1:]:
            entry["resource"]["subject"] = {"reference": reference}

    return mutate


def use_onset_age(bundle: Resource) -> None:
    condition = resource_of(bundle, "pt-test-colon-cancer")
    del condition["onsetDateTime"]
    condition["onsetAge"] = {"value": 71, "unit": "years", "system": "http://unitsofmeasure.org", "code": "a"}


def grow_to_1000_entries(bundle: Resource) -> None:
    template = resource_of(bundle, "pt-test-obstruct")
    for number in range(1000 - len(bundle["entry"])):
        unrelated = copy.deepcopy(template)
        unrelated["id"] = f"pt-test-other-{number}"
        unrelated["code"] = coded("http://loinc.org", "8302-2")
        bundle["entry"].append(entry(unrelated))


CANCER_STAGING = "http://cancerstaging.org"


@dataclass(frozen=True)
class EdgeCase:
    """A Bundle edge case from the mapping tests and the verdict of each checker on it.

    ``producer`` is ``producers.records.load_bundle`` (the record producer's
    file check), ``mapping`` is ``features_from_bundle`` (what the prognosis
    processor accepts). ``difference`` gives the reason the mapping's verdict differs
    from the validator's, and is None when they agree. ``producer_bug`` names
    an exception the producer raises today instead of rejecting the file.
    """

    name: str
    mutate: Mutation
    validator: bool
    producer: bool
    mapping: bool
    difference: str | None = None
    producer_bug: type[Exception] | None = None

    def param(self) -> Any:
        marks = []
        if self.producer_bug is not None:
            reason = f"load_bundle raises {self.producer_bug.__name__} instead of RecordFileError"
            marks.append(pytest.mark.xfail(raises=self.producer_bug, strict=True, reason=reason))
        return pytest.param(self, id=self.name, marks=marks)


STRICTER = "stricter by design: "
LOOSER = "looser than FHIR: "

# Verdicts: True accepts, False rejects. Columns: validator, producer (load_bundle), mapping (features_from_bundle).
EDGE_CASES: list[EdgeCase] = [
    EdgeCase("unchanged", lambda bundle: None, validator=True, producer=True, mapping=True),
    EdgeCase(
        "gender-not-a-code", set_patient("gender", "unknown-value"), validator=False, producer=True, mapping=False
    ),
    EdgeCase(
        "birth-date-month-13", set_patient("birthDate", "1950-13-01"), validator=False, producer=False, mapping=False
    ),
    EdgeCase("birth-date-number", set_patient("birthDate", 1950), validator=False, producer=False, mapping=False),
    EdgeCase("count-as-text", set_nodes("valueInteger", "three"), validator=False, producer=False, mapping=False),
    EdgeCase("count-as-boolean", set_nodes("valueInteger", True), validator=False, producer=True, mapping=False),
    EdgeCase(
        "datetime-without-timezone",
        set_nodes("effectiveDateTime", "2019-03-01T10:00:00"),
        validator=False,
        producer=False,
        mapping=False,
    ),
    EdgeCase(
        "r5-element-triggered-by",
        set_nodes("triggeredBy", [{"type": "reflex"}]),
        validator=False,
        producer=False,
        mapping=False,
    ),
    EdgeCase(
        "observation-status-not-a-code", set_nodes("status", "done"), validator=False, producer=True, mapping=False
    ),
    EdgeCase(
        "observation-without-code",
        lambda bundle: resource_of(bundle, "pt-test-nodes").pop("code"),
        validator=False,
        producer=False,
        mapping=False,
    ),
    EdgeCase(
        "bundle-is-patient",
        lambda bundle: bundle.__setitem__("resourceType", "Patient"),
        validator=False,
        producer=False,
        mapping=False,
    ),
    EdgeCase(
        "bundle-type-not-a-code",
        lambda bundle: bundle.__setitem__("type", "bogus"),
        validator=False,
        producer=True,
        mapping=False,
    ),
    EdgeCase(
        "r5-resource-transport",
        add_resource({"resourceType": "Transport", "status": "completed", "intent": "order"}),
        validator=False,
        producer=False,
        mapping=False,
    ),
    EdgeCase(
        "entry-without-full-url",
        add_entry_without_full_url,
        validator=False,
        producer=True,
        mapping=True,
        difference=LOOSER + "neither the producer nor the mapping requires Bundle.entry.fullUrl",
    ),
    EdgeCase(
        "second-patient",
        add_resource({"resourceType": "Patient", "id": "pt-other"}),
        validator=True,
        producer=False,
        mapping=False,
        difference=STRICTER + "a record is keyed by its one Patient, so a Bundle must contain exactly one",
    ),
    EdgeCase(
        "no-patient",
        lambda bundle: bundle["entry"].pop(0),
        validator=True,
        producer=False,
        mapping=False,
        difference=STRICTER + "without a Patient there is no pseudonym to key the record by",
    ),
    EdgeCase(
        "patient-without-id",
        lambda bundle: bundle["entry"][0]["resource"].pop("id"),
        validator=True,
        producer=False,
        mapping=False,
        difference=STRICTER + "Patient.id is the pseudonym that keys the record",
    ),
    EdgeCase(
        "subject-other-patient",
        set_nodes("subject", {"reference": "Patient/pt-other"}),
        validator=True,
        producer=True,
        mapping=False,
        difference=STRICTER + "a value about another patient must not feed this patient's risk",
    ),
    EdgeCase(
        "grade-4",
        set_value_concept("pt-test-differ", "http://snomed.info/sct", "258245003"),
        validator=True,
        producer=True,
        mapping=False,
        difference=STRICTER + "the trial and the model know differentiation grades 1 to 3 only",
    ),
    EdgeCase(
        "t-category-tx",
        set_value_concept("pt-test-extent", CANCER_STAGING, "pTX"),
        validator=True,
        producer=True,
        mapping=False,
        difference=STRICTER + "TX (tumour cannot be assessed) gives no extent value for the model",
    ),
    EdgeCase(
        "observation-without-value",
        lambda bundle: resource_of(bundle, "pt-test-nodes").pop("valueInteger"),
        validator=True,
        producer=True,
        mapping=False,
        difference=STRICTER + "a mapped Observation without a value is ambiguous; dataAbsentReason is not read",
    ),
    EdgeCase(
        "status-entered-in-error", set_nodes("status", "entered-in-error"), validator=True, producer=True, mapping=True
    ),
    EdgeCase("later-observation", add_later_nodes, validator=True, producer=True, mapping=True),
    EdgeCase(
        "node4-absent",
        lambda bundle: remove_resource(bundle, "pt-test-node4"),
        validator=True,
        producer=True,
        mapping=True,
    ),
    EdgeCase(
        "levamisole-absent",
        lambda bundle: remove_resource(bundle, "pt-test-levamisole"),
        validator=True,
        producer=True,
        mapping=True,
    ),
    EdgeCase(
        "medication-not-taken",
        lambda bundle: resource_of(bundle, "pt-test-fluorouracil").__setitem__("status", "not-taken"),
        validator=True,
        producer=True,
        mapping=True,
    ),
    EdgeCase("medication-reference", refer_to_medication, validator=True, producer=True, mapping=True),
    EdgeCase(
        "subject-relative-reference",
        set_subjects("Patient/pt-test"),
        validator=True,
        producer=True,
        mapping=True,
    ),
    EdgeCase(
        "subject-absolute-reference",
        set_subjects("https://fhir.example.org/fhir/Patient/pt-test"),
        validator=True,
        producer=True,
        mapping=True,
    ),
    EdgeCase("gender-other", set_patient("gender", "other"), validator=True, producer=True, mapping=True),
    EdgeCase("birth-date-year-only", set_patient("birthDate", "1950"), validator=True, producer=True, mapping=True),
    EdgeCase("onset-age", use_onset_age, validator=True, producer=True, mapping=True),
    *(
        EdgeCase(
            f"t-category-{code}",
            set_value_concept("pt-test-extent", CANCER_STAGING, code),
            validator=True,
            producer=True,
            mapping=True,
        )
        for code in ("pT1", "cT2", "T3", "pT4b")
    ),
    EdgeCase("bundle-of-1000-entries", grow_to_1000_entries, validator=True, producer=True, mapping=True),
]


def producer_accepts(bundle: Resource, tmp_path: Path) -> bool:
    path = tmp_path / "record.json"
    path.write_text(json.dumps(bundle))
    try:
        load_bundle(path)
    except RecordFileError:
        return False
    return True


def mapping_accepts(bundle: Resource) -> bool:
    try:
        features_from_bundle(bundle)
    except InvalidBundleError:
        return False
    return True


@pytest.mark.parametrize("case", [case.param() for case in EDGE_CASES])
def test_edge_case_verdicts(validator: ValidatorProcess, bundle: Resource, tmp_path: Path, case: EdgeCase) -> None:
    case.mutate(bundle)

    report = validator.validate(bundle)

    assert report.is_valid == case.validator, report.describe()
    assert mapping_accepts(bundle) == case.mapping
    assert (case.mapping != case.validator) == (case.difference is not None)
    assert producer_accepts(bundle, tmp_path) == case.producer


def test_edge_case_differences_classified() -> None:
    # A difference is "stricter" when the mapping rejects valid FHIR and "looser" when it accepts what the
    # validator rejects. A looser difference is a gap to close in the producer or the mapping.
    for case in EDGE_CASES:
        if case.difference is None:
            continue
        expected = LOOSER if case.mapping else STRICTER
        assert case.difference.startswith(expected), case.name


# Command line


def test_validate_command_reports_each_file(validator: ValidatorProcess, tmp_path: Path) -> None:
    valid = tmp_path / "pt-0001.json"
    valid.write_bytes((RECORDS / "pt-0001.json").read_bytes())
    invalid = tmp_path / "invalid-bundle.json"
    invalid.write_bytes((RECORDS / "invalid-bundle.json").read_bytes())
    out = io.StringIO()

    exit_code = run_validate_command([tmp_path], validator=validator, out=out)

    lines = out.getvalue().splitlines()
    assert exit_code == 1
    assert lines[0].startswith(f"{invalid}: INVALID, 1 error(s)")
    assert "Not a valid date format: '07.09.1939'" in lines[1]
    assert lines[2].startswith(f"{valid}: valid, 0 error(s)")


def test_validate_command_valid_file(validator: ValidatorProcess) -> None:
    out = io.StringIO()

    exit_code = run_validate_command([RECORDS / "pt-0002.json"], validator=validator, out=out)

    assert exit_code == 0
    assert ": valid, 0 error(s)" in out.getvalue()


def test_validate_command_missing_file(validator: ValidatorProcess, tmp_path: Path) -> None:
    out = io.StringIO()

    exit_code = run_validate_command([tmp_path / "absent.json"], validator=validator, out=out)

    assert exit_code == 1
    assert "absent.json: not found" in out.getvalue()


def test_java_one_shot_cli(tmp_path: Path) -> None:
    command = [java_executable(), "-jar", str(ensure_validator_jar()), "validate", str(RECORDS / "invalid-bundle.json")]

    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)

    assert completed.returncode == 1, completed.stderr[-2000:]
    assert "INVALID, 1 error(s)" in completed.stdout
    assert "Not a valid date format: '07.09.1939'" in completed.stdout


def test_java_cli_without_terminology_package(tmp_path: Path) -> None:
    absent = tmp_path / "hl7.terminology.r4-7.0.1.tgz"
    command = [
        java_executable(),
        "-jar",
        str(ensure_validator_jar()),
        "validate",
        "--terminology",
        str(absent),
        str(RECORDS / "pt-0001.json"),
    ]

    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)

    assert completed.returncode == 2
    assert f"{absent} not found" in completed.stderr
    assert f"npm pack {terminology_package().spec}" in completed.stderr


def test_java_cli_rejects_other_package(tmp_path: Path) -> None:
    # A valid npm tarball of another package must not pass for the pinned one.
    other = tmp_path / "other.tgz"
    package_json = json.dumps({"name": "example.other", "version": "1.0.0"}).encode()
    with tarfile.open(other, "w:gz") as archive:
        entry = tarfile.TarInfo("package/package.json")
        entry.size = len(package_json)
        archive.addfile(entry, io.BytesIO(package_json))
    command = [java_executable(), "-jar", str(ensure_validator_jar()), "serve", "--terminology", str(other)]

    # stdin at end of file stops the server at once should it start after all.
    completed = subprocess.run(
        command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, check=False
    )

    assert completed.returncode == 2
    assert "contains example.other#1.0.0 but pom.xml pins" in completed.stderr


# Missing tools


def test_build_without_java_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRC_STACK_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("JAVA_HOME", raising=False)

    with pytest.raises(ValidatorToolMissingError, match="java not found on PATH"):
        ensure_validator_jar()


def test_build_without_maven_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "java").symlink_to(java_executable())
    monkeypatch.setenv("CRC_STACK_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tools))
    monkeypatch.delenv("JAVA_HOME", raising=False)

    with pytest.raises(ValidatorToolMissingError, match="mvn not found on PATH.*apt-get install -y maven"):
        ensure_validator_jar()


def test_build_without_npm_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "java").symlink_to(java_executable())
    (tools / "mvn").symlink_to(shutil.which("mvn") or "/usr/bin/mvn")
    monkeypatch.setenv("CRC_STACK_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tools))
    monkeypatch.delenv("JAVA_HOME", raising=False)

    with pytest.raises(ValidatorToolMissingError, match="npm not found on PATH.*apt-get install -y npm"):
        ensure_validator_jar()


def test_terminology_fetch_failure_names_command(tmp_path: Path) -> None:
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    # No such version is published, so npm pack fails whether or not the registry is reachable.
    missing = TerminologyPackage(name=terminology_package().name, version="0.0.0-not-published")

    with pytest.raises(TerminologyFetchError, match=r"`npm pack hl7\.terminology\.r4@0\.0\.0-not-published"):
        fetch_terminology_package(tmp_path, missing, timeout_s=120)

    assert list(tmp_path.iterdir()) == []
