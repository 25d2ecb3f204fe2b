"""What-if simulator: the recurrence risk of a patient if some feature values were different.

``simulate`` predicts the patient as recorded and with the changed values,
and returns both risks, the change at each horizon, and how each SHAP
contribution moved. Changed values are checked against the same clinical
ranges and code sets as any input. When ``nodes`` changes and ``node4`` is
not given, ``node4`` follows as ``nodes > 4`` and the result lists it as a
derived change.

Command line, with a Bundle file or the id of a record in ``samples/records``::

    python -m processors.prognosis.whatif --patient samples/records/pt-0001.json --set nodes=6 --set rx=Obs
    python -m processors.prognosis.whatif --patient pt-0004 --set rx=Lev+5FU --json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from processors.prognosis.data import FEATURE_NAMES, FEATURES, FeatureValue, validate_value
from processors.prognosis.errors import (
    FeatureValueError,
    InvalidPatientIdError,
    PrognosisError,
    RecordNotFoundError,
)
from processors.prognosis.fhir_mapping import PSEUDONYM_PATTERN, MappedRecord, features_from_bundle
from processors.prognosis.model import RiskGroup
from processors.prognosis.surrogate import DecisionPath
from processors.prognosis.survival_model import (
    DEFAULT_WEIGHTS,
    HorizonProbability,
    RecurrenceSurvivalModel,
    SurvivalPrediction,
)
from schemas.messages import FeatureContribution, ModelRef

logger = logging.getLogger(__name__)

DEFAULT_RECORDS_DIR = Path(__file__).resolve().parents[2] / "samples" / "records"
#: Contribution changes below this (log hazard, a hazard factor within 0.05 %) count as unchanged.
CONTRIBUTION_CHANGE_FLOOR = 5e-4
MISSING_WORDS = frozenset({"missing", "none", "null", ""})


class AppliedChange(BaseModel):
    """One feature value as recorded and as simulated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    feature: str
    label: str
    before: FeatureValue
    after: FeatureValue
    display_before: str
    display_after: str
    derived: bool = Field(description="True when the value follows from another change (node4 from nodes).")


class RiskSnapshot(BaseModel):
    """The predicted risk for one set of feature values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    probabilities: list[HorizonProbability]
    risk_group: RiskGroup
    log_hazard: float = Field(description="Log relative hazard against the average training patient.")
    missing_features: list[str]


class ProbabilityChange(BaseModel):
    """The change of the recurrence probability within one horizon."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    horizon_years: float
    before: float
    after: float
    change: float = Field(description="after - before, as a probability (0.05 is 5 percentage points).")


class ContributionChange(BaseModel):
    """The SHAP contribution of one feature before and after the changes, on the log hazard scale."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    feature: str
    label: str
    display_before: str
    display_after: str
    before: float
    after: float
    change: float


class WhatIfResult(BaseModel):
    """The patient's risk as recorded and with the changed values, and what moved."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    patient_id: str | None
    model: ModelRef
    changes: list[AppliedChange]
    before: RiskSnapshot
    after: RiskSnapshot
    probability_changes: list[ProbabilityChange]
    risk_group_changed: bool
    contribution_changes: list[ContributionChange] = Field(
        description="Features whose contribution changed, largest change first."
    )
    base_value: float = Field(description="SHAP base value (log hazard); the same before and after.")
    contributions_after: list[FeatureContribution]
    decision_path_before: DecisionPath
    decision_path_after: DecisionPath
    summary: list[str] = Field(description="The result in a few plain sentences.")


def changed_values(
    values: Mapping[str, FeatureValue], changes: Mapping[str, object]
) -> tuple[dict[str, FeatureValue], set[str]]:
    """Apply validated ``changes`` to ``values``; return the new values and the names derived from them.

    Raises:
        FeatureValueError: a change names an unknown feature, has an invalid
            value, or sets ``node4`` against the ``nodes`` it also sets.
    """
    validated = {name: validate_value(name, value) for name, value in changes.items()}
    new_values = {**values, **validated}
    derived: set[str] = set()

    nodes = validated.get("nodes")
    if "nodes" in validated and nodes is not None:
        implied = float(nodes > 4)
        if "node4" not in validated:
            new_values["node4"] = implied
            derived.add("node4")
        elif validated["node4"] is not None and validated["node4"] != implied:
            raise FeatureValueError(
                "node4",
                f"node4={validated['node4']:g} contradicts nodes={nodes:g}; node4 is 1 exactly when more than "
                "4 nodes are positive, so leave node4 out to derive it from nodes",
            )
    return new_values, derived


def simulate(
    model: RecurrenceSurvivalModel,
    features: Mapping[str, FeatureValue],
    changes: Mapping[str, object],
    missing_reasons: Mapping[str, str] | None = None,
    patient_id: str | None = None,
) -> WhatIfResult:
    """Predict the patient as recorded and with ``changes``, and describe the difference.

    Args:
        model: The recurrence survival model.
        features: The patient's recorded values by feature name; None is missing.
        changes: New values by feature name; None makes a feature missing.
        missing_reasons: Why recorded features are missing, for example ``MappedRecord.missing``.
        patient_id: Pseudonym echoed in the result.

    Raises:
        FeatureValueError: a recorded or changed value is invalid, or a
            feature that must be known is missing after the changes.
    """
    reasons = dict(missing_reasons or {})
    before = model.predict(features, reasons)
    new_values, derived = changed_values(before.values, changes)
    after_reasons = {name: reason for name, reason in reasons.items() if name not in changes}
    after = model.predict(new_values, after_reasons)

    applied = _applied_changes(before.values, after.values, changes, derived)
    probability_changes = [
        ProbabilityChange(
            horizon_years=old.horizon_years,
            before=old.probability,
            after=new.probability,
            change=new.probability - old.probability,
        )
        for old, new in zip(before.probabilities, after.probabilities, strict=True)
    ]
    result = WhatIfResult(
        patient_id=patient_id,
        model=model.model_ref,
        changes=applied,
        before=_snapshot(before),
        after=_snapshot(after),
        probability_changes=probability_changes,
        risk_group_changed=before.risk_group != after.risk_group,
        contribution_changes=_contribution_changes(before, after),
        base_value=after.base_value,
        contributions_after=after.contributions,
        decision_path_before=before.decision_path,
        decision_path_after=after.decision_path,
        summary=_summary(applied, probability_changes, before.risk_group, after.risk_group),
    )
    logger.debug("what-if simulated changes=%s", sorted(changes))
    return result


def _snapshot(prediction: SurvivalPrediction) -> RiskSnapshot:
    return RiskSnapshot(
        probabilities=prediction.probabilities,
        risk_group=prediction.risk_group,
        log_hazard=prediction.log_hazard,
        missing_features=prediction.missing_features,
    )


def _applied_changes(
    before: Mapping[str, FeatureValue],
    after: Mapping[str, FeatureValue],
    changes: Mapping[str, object],
    derived: set[str],
) -> list[AppliedChange]:
    applied: list[AppliedChange] = []
    for name in FEATURE_NAMES:
        if name not in changes and name not in derived:
            continue
        feature = FEATURES[name]
        applied.append(
            AppliedChange(
                feature=name,
                label=feature.label,
                before=before[name],
                after=after[name],
                display_before=feature.display(before[name]),
                display_after=feature.display(after[name]),
                derived=name in derived,
            )
        )
    return applied


def _contribution_changes(before: SurvivalPrediction, after: SurvivalPrediction) -> list[ContributionChange]:
    old = {item.feature: item for item in before.contributions}
    moved: list[ContributionChange] = []
    for new in after.contributions:
        previous = old[new.feature]
        change = new.contribution - previous.contribution
        if abs(change) <= CONTRIBUTION_CHANGE_FLOOR:
            continue
        moved.append(
            ContributionChange(
                feature=new.feature,
                label=new.label,
                display_before=previous.display_value,
                display_after=new.display_value,
                before=previous.contribution,
                after=new.contribution,
                change=change,
            )
        )
    moved.sort(key=lambda item: abs(item.change), reverse=True)
    return moved


def _summary(
    applied: Sequence[AppliedChange],
    probability_changes: Sequence[ProbabilityChange],
    group_before: str,
    group_after: str,
) -> list[str]:
    lines = [
        "Changed: "
        + "; ".join(
            f"{item.label} {item.display_before} -> {item.display_after}"
            + (" (follows from the node count)" if item.derived else "")
            for item in applied
        )
    ]
    for item in probability_changes:
        lines.append(
            f"Recurrence within {item.horizon_years:g} years: {item.before:.0%} -> {item.after:.0%} "
            f"({100 * item.change:+.1f} percentage points)"
        )
    if group_before == group_after:
        lines.append(f"Risk group unchanged: {group_after}")
    else:
        lines.append(f"Risk group: {group_before} -> {group_after}")
    return lines


# Reading a patient


def record_path(patient_id: str, records_dir: Path) -> Path:
    """Return the Bundle file of a patient in ``records_dir``.

    Raises:
        InvalidPatientIdError: the id is not a valid pseudonym.
        RecordNotFoundError: there is no such file.
    """
    if not PSEUDONYM_PATTERN.match(patient_id):
        raise InvalidPatientIdError(
            f"patient_id={patient_id!r} is invalid; use 1 to 40 letters, digits, '-' or '.', for example 'pt-0001'",
        )
    path = records_dir / f"{patient_id}.json"
    if not path.is_file():
        raise RecordNotFoundError(f"no record for patient_id {patient_id!r} in {records_dir.name}/")
    return path


def read_bundle_record(path: Path) -> MappedRecord:
    """Read a FHIR Bundle file and map it to model features.

    Raises:
        InvalidBundleError: the file is not a valid Bundle for one patient.
    """
    bundle = json.loads(path.read_text(encoding="utf-8"))
    return features_from_bundle(bundle)


def parse_assignment(text: str) -> tuple[str, FeatureValue]:
    """Parse ``NAME=VALUE`` from the command line.

    A value may be a number, a code (``rx=Obs``), the meaning of a code
    (``adhere=yes``, ``differ="poorly differentiated"``), or ``missing``.

    Raises:
        FeatureValueError: the '=' is missing, the feature is unknown, or the value is not one of these forms.
    """
    name, separator, raw = text.partition("=")
    name, raw = name.strip(), raw.strip()
    if not separator:
        raise FeatureValueError(name, f"--set {text!r} is invalid; write NAME=VALUE, for example nodes=6")
    if name not in FEATURES:
        raise FeatureValueError(name, f"unknown feature {name!r}; the model features are {list(FEATURE_NAMES)}")

    feature = FEATURES[name]
    if raw.lower() in MISSING_WORDS:
        return name, None
    if feature.kind == "categorical":
        return name, raw
    meanings = {meaning.lower(): code for code, meaning in feature.codes.items()}
    if raw.lower() in meanings:
        return name, meanings[raw.lower()]
    try:
        number = float(raw)
    except ValueError:
        raise FeatureValueError(name, f"{name}={raw!r} is invalid; expected {feature.allowed_text()}") from None
    return name, int(number) if number.is_integer() else number


def _load_patient(args: argparse.Namespace) -> MappedRecord:
    if args.features is not None:
        features = json.loads(args.features.read_text(encoding="utf-8"))
        return MappedRecord(patient_id=args.features.stem, features=features, missing={})
    patient = Path(args.patient)
    path = patient if patient.suffix == ".json" else record_path(args.patient, args.records_dir)
    return read_bundle_record(path)


def format_result(result: WhatIfResult) -> str:
    """Render a what-if result as text for a terminal."""
    lines = [f"Patient {result.patient_id or '(features)'}, model {result.model.name} {result.model.version}"]
    lines += result.summary
    if result.contribution_changes:
        lines.append("Contributions that moved (log hazard; positive raises the risk):")
        for item in result.contribution_changes:
            lines.append(
                f"  {item.label}: {item.display_before} {item.before:+.3f} -> "
                f"{item.display_after} {item.after:+.3f} ({item.change:+.3f})"
            )
    lines.append("Decision path after the change:")
    for number, step in enumerate(result.decision_path_after.steps, start=1):
        lines.append(f"  {number}. {step.text}")
    lines.append(f"  -> {result.decision_path_after.conclusion}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="crc-medai what-if", description="Simulate the recurrence risk of a patient with changed values."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--patient", help="a FHIR Bundle .json file, or the id of a record in --records-dir")
    source.add_argument("--features", type=Path, help="a JSON file of feature values by name")
    parser.add_argument(
        "--set",
        dest="changes",
        action="append",
        required=True,
        metavar="NAME=VALUE",
        help="a changed value, for example nodes=6, rx=Obs, adhere=yes or differ=missing; repeatable",
    )
    parser.add_argument("--records-dir", type=Path, default=DEFAULT_RECORDS_DIR, help="folder of <id>.json Bundles")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="the survival model's .cbm weights")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    try:
        changes = dict(parse_assignment(text) for text in args.changes)
        record = _load_patient(args)
        model = RecurrenceSurvivalModel.load(args.weights)
        result = simulate(model, record.features, changes, record.missing, patient_id=record.patient_id)
    except (PrognosisError, OSError, json.JSONDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    print(result.model_dump_json(indent=2) if args.json else format_result(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
