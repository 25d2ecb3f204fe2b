"""Tests of the what-if simulator: the pure function and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from processors.prognosis.errors import FeatureValueError, InvalidPatientIdError, RecordNotFoundError
from processors.prognosis.survival_model import RecurrenceSurvivalModel
from processors.prognosis.whatif import main, parse_assignment, record_path, simulate

RECORDS = Path(__file__).resolve().parent.parent / "samples" / "records"


@pytest.fixture(scope="module")
def model() -> RecurrenceSurvivalModel:
    return RecurrenceSurvivalModel.load()


@pytest.fixture()
def patient() -> dict[str, float | str | None]:
    return {
        "rx": "Lev+5FU",
        "sex": 0.0,
        "age": 55.0,
        "obstruct": 0.0,
        "perfor": 0.0,
        "adhere": 0.0,
        "nodes": 1.0,
        "differ": 2.0,
        "extent": 3.0,
        "surg": 0.0,
        "node4": 0.0,
    }


def test_simulate_reports_before_and_after(model: RecurrenceSurvivalModel, patient: dict) -> None:
    result = simulate(model, patient, {"rx": "Obs"}, patient_id="pt-test")

    before = model.predict(patient)
    after = model.predict({**patient, "rx": "Obs"})
    assert result.patient_id == "pt-test"
    assert [item.probability for item in result.before.probabilities] == [
        item.probability for item in before.probabilities
    ]
    assert [item.probability for item in result.after.probabilities] == [
        item.probability for item in after.probabilities
    ]
    for change in result.probability_changes:
        assert change.change == pytest.approx(change.after - change.before)
    assert result.after.risk_group == after.risk_group
    assert result.risk_group_changed == (before.risk_group != after.risk_group)


def test_simulate_changed_contributions(model: RecurrenceSurvivalModel, patient: dict) -> None:
    result = simulate(model, patient, {"rx": "Obs"})

    assert result.contribution_changes[0].feature == "rx"
    assert result.contribution_changes[0].display_before == "levamisole + fluorouracil"
    assert result.contribution_changes[0].display_after == "observation only"
    assert result.contribution_changes[0].change > 0
    changes = [abs(item.change) for item in result.contribution_changes]
    assert changes == sorted(changes, reverse=True)
    total = result.base_value + sum(item.contribution for item in result.contributions_after)
    assert total == pytest.approx(result.after.log_hazard, abs=1e-6)


def test_simulate_derives_node4_from_nodes(model: RecurrenceSurvivalModel, patient: dict) -> None:
    result = simulate(model, patient, {"nodes": 6})

    by_feature = {item.feature: item for item in result.changes}
    assert set(by_feature) == {"nodes", "node4"}
    assert by_feature["node4"].derived
    assert by_feature["node4"].after == 1.0
    assert not by_feature["nodes"].derived
    assert by_feature["nodes"].display_after == "6 nodes"
    assert result.probability_changes[1].change > 0
    assert "follows from the node count" in result.summary[0]


def test_simulate_rejects_contradicting_node4(model: RecurrenceSurvivalModel, patient: dict) -> None:
    with pytest.raises(FeatureValueError, match="node4=0 contradicts nodes=6"):
        simulate(model, patient, {"nodes": 6, "node4": 0})


def test_simulate_makes_feature_missing(model: RecurrenceSurvivalModel, patient: dict) -> None:
    result = simulate(model, patient, {"differ": None})

    assert result.after.missing_features == ["differ"]
    assert result.before.missing_features == []
    assert result.changes[0].display_after == "missing"


@pytest.mark.parametrize(
    ("changes", "feature", "message"),
    [
        ({"nodes": 150}, "nodes", "nodes=150 is outside the clinical range; expected a number from 0 to 100 nodes"),
        ({"age": -3}, "age", "expected a number from 0 to 120 years"),
        ({"differ": 5}, "differ", "3 (poorly differentiated)"),
        ({"rx": "FOLFOX"}, "rx", "'Lev+5FU' (levamisole + fluorouracil)"),
        ({"tumour_size": 3}, "tumour_size", "unknown feature 'tumour_size'"),
        ({"age": None}, "age", "required features ['age'] are missing"),
    ],
)
def test_simulate_rejects_invalid_change(
    model: RecurrenceSurvivalModel, patient: dict, changes: dict, feature: str, message: str
) -> None:
    with pytest.raises(FeatureValueError) as raised:
        simulate(model, patient, changes)

    assert raised.value.feature == feature
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nodes=6", ("nodes", 6)),
        ("age=61.5", ("age", 61.5)),
        ("rx=Obs", ("rx", "Obs")),
        ("adhere=yes", ("adhere", 1.0)),
        ("differ=Poorly differentiated", ("differ", 3.0)),
        ("differ=missing", ("differ", None)),
        (" extent = 4 ", ("extent", 4)),
    ],
)
def test_parse_assignment(text: str, expected: tuple) -> None:
    assert parse_assignment(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nodes", "write NAME=VALUE"),
        ("size=3", "unknown feature 'size'"),
        ("nodes=six", "nodes='six' is invalid; expected a number from 0 to 100 nodes"),
    ],
)
def test_parse_assignment_rejects(text: str, message: str) -> None:
    with pytest.raises(FeatureValueError, match=message):
        parse_assignment(text)


def test_record_path_rejects_bad_ids(tmp_path: Path) -> None:
    with pytest.raises(InvalidPatientIdError, match="is invalid"):
        record_path("../etc/passwd", tmp_path)
    with pytest.raises(RecordNotFoundError, match="no record for patient_id 'pt-9999'"):
        record_path("pt-9999", tmp_path)


def test_cli_with_bundle_file(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--patient", str(RECORDS / "pt-0001.json"), "--set", "nodes=6", "--set", "rx=Obs"])
    output = capsys.readouterr().out

    assert code == 0
    assert output.startswith("Patient pt-0001, model crc-recurrence-survival-catboost")
    assert "Positive lymph nodes 1 node -> 6 nodes" in output
    assert "Recurrence within 3 years:" in output
    assert "Recurrence within 5 years:" in output
    assert "Decision path after the change:" in output


def test_cli_by_id_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--patient", "pt-0006", "--records-dir", str(RECORDS), "--set", "differ=3", "--json"])
    result = json.loads(capsys.readouterr().out)

    assert code == 0
    assert result["patient_id"] == "pt-0006"
    assert result["before"]["missing_features"] == ["nodes"]
    assert result["changes"][0]["feature"] == "differ"


def test_cli_with_features_file(tmp_path: Path, patient: dict, capsys: pytest.CaptureFixture[str]) -> None:
    features = tmp_path / "patient.json"
    features.write_text(json.dumps(patient))

    assert main(["--features", str(features), "--set", "adhere=yes"]) == 0
    assert "Adherence to nearby organs no -> yes" in capsys.readouterr().out


def test_cli_invalid_value_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--patient", str(RECORDS / "pt-0001.json"), "--set", "nodes=130"])

    assert code == 2
    assert "nodes=130 is outside the clinical range" in capsys.readouterr().err
