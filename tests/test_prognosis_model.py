"""Tests of the recurrence model: SHAP additivity, input validation, censoring weights, discrimination."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lifelines.utils import concordance_index

from processors.prognosis.data import FEATURE_NAMES, FEATURES, load_recurrence_table, row_features
from processors.prognosis.errors import FeatureValueError, ModelArtifactError
from processors.prognosis.model import RecurrenceModel, RiskThresholds, sidecar_path, sigmoid
from processors.prognosis.train import UNKNOWN, censoring_survival, horizon_target

WEIGHTS = Path(__file__).resolve().parent.parent / "processors" / "prognosis" / "weights" / "recurrence_catboost.cbm"

# Measured with the shipped weights (seed 0): in-sample C-index 0.703, 5-fold CV C-index 0.656.
IN_SAMPLE_C_INDEX_FLOOR = 0.67
CV_C_INDEX_FLOOR = 0.63


@pytest.fixture(scope="module")
def model() -> RecurrenceModel:
    return RecurrenceModel.load(WEIGHTS)


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return load_recurrence_table()


@pytest.fixture()
def patient() -> dict[str, float | str | None]:
    return {
        "rx": "Lev",
        "sex": 1.0,
        "age": 62.0,
        "obstruct": 0.0,
        "perfor": 0.0,
        "adhere": 1.0,
        "nodes": 6.0,
        "differ": 3.0,
        "extent": 3.0,
        "surg": 0.0,
        "node4": 1.0,
    }


def test_recurrence_table_shape(table: pd.DataFrame) -> None:
    assert len(table) == 929
    assert table["status"].sum() == 468
    assert table["nodes"].isna().sum() == 18
    assert table["differ"].isna().sum() == 23
    assert set(table["rx"]) == {"Obs", "Lev", "Lev+5FU"}


@pytest.mark.parametrize("row_index", [0, 1, 17, 100, 500, 928])
def test_shap_adds_up_to_log_odds(model: RecurrenceModel, table: pd.DataFrame, row_index: int) -> None:
    row = table.iloc[row_index]
    prediction = model.predict(row_features(row))

    total = prediction.base_value + sum(item.contribution for item in prediction.contributions)
    assert abs(total - prediction.log_odds) < 1e-6
    assert prediction.probability == pytest.approx(sigmoid(prediction.log_odds), abs=1e-12)
    assert prediction.probability == pytest.approx(model.predict_table(table.iloc[[row_index]])[0], abs=1e-9)


def test_shap_additivity_with_missing_nodes(model: RecurrenceModel, table: pd.DataFrame) -> None:
    row = table[table["nodes"].isna()].iloc[0]
    prediction = model.predict(row_features(row))

    total = prediction.base_value + sum(item.contribution for item in prediction.contributions)
    assert abs(total - prediction.log_odds) < 1e-6
    assert "nodes" in prediction.missing_features
    nodes = next(item for item in prediction.contributions if item.feature == "nodes")
    assert nodes.value is None
    assert nodes.display_value == "missing"


def test_contributions_sorted_and_labelled(model: RecurrenceModel, patient: dict) -> None:
    prediction = model.predict(patient)
    magnitudes = [abs(item.contribution) for item in prediction.contributions]

    assert magnitudes == sorted(magnitudes, reverse=True)
    assert {item.feature for item in prediction.contributions} == set(FEATURE_NAMES)
    by_feature = {item.feature: item for item in prediction.contributions}
    assert by_feature["age"].display_value == "62 years"
    assert by_feature["nodes"].display_value == "6 nodes"
    assert by_feature["differ"].display_value == "poorly differentiated"
    assert by_feature["rx"].label == FEATURES["rx"].label
    assert prediction.missing_features == []


def test_risk_group_matches_thresholds(model: RecurrenceModel, patient: dict) -> None:
    prediction = model.predict(patient)
    thresholds = model.metadata.risk_thresholds

    assert prediction.risk_group == thresholds.group(prediction.probability)
    assert 0.0 < thresholds.low_below < thresholds.high_from < 1.0


def test_risk_thresholds_boundaries() -> None:
    thresholds = RiskThresholds(low_below=0.3, high_from=0.6, method="test")

    assert thresholds.group(0.29) == "low"
    assert thresholds.group(0.3) == "intermediate"
    assert thresholds.group(0.59) == "intermediate"
    assert thresholds.group(0.6) == "high"


def test_node4_derived_from_nodes(model: RecurrenceModel, patient: dict) -> None:
    without_node4 = {**patient, "node4": None}
    prediction = model.predict(without_node4)

    assert prediction.missing_features == []
    assert prediction.probability == pytest.approx(model.predict(patient).probability)


def test_nan_counts_as_missing(model: RecurrenceModel, patient: dict) -> None:
    prediction = model.predict({**patient, "differ": math.nan})

    assert prediction.missing_features == ["differ"]


@pytest.mark.parametrize(
    ("feature", "value", "expected"),
    [
        ("age", 130, "from 0 to 120 years"),
        ("age", -1, "from 0 to 120 years"),
        ("age", "62", "expected a number from 0 to 120 years"),
        ("nodes", 101, "from 0 to 100 nodes"),
        ("nodes", 2.5, "whole number"),
        ("differ", 4, "3 (poorly differentiated)"),
        ("extent", 0, "contiguous structures"),
        ("sex", 2, "1 (male)"),
        ("rx", "5FU", "'Lev+5FU'"),
        ("rx", 1, "'Obs'"),
    ],
)
def test_out_of_range_value_rejected(
    model: RecurrenceModel, patient: dict, feature: str, value: object, expected: str
) -> None:
    with pytest.raises(FeatureValueError) as raised:
        model.predict({**patient, feature: value})

    assert raised.value.feature == feature
    assert f"{feature}={value!r}" in str(raised.value)
    assert expected in str(raised.value)


def test_unknown_feature_rejected(model: RecurrenceModel, patient: dict) -> None:
    with pytest.raises(FeatureValueError, match="unknown features \\['tumour_size'\\]"):
        model.predict({**patient, "tumour_size": 3.0})


def test_required_feature_missing_rejected(model: RecurrenceModel, patient: dict) -> None:
    with pytest.raises(FeatureValueError) as raised:
        model.predict({**patient, "age": None}, missing_reasons={"age": "Patient.birthDate is absent"})

    assert raised.value.feature == "age"
    assert "Patient.birthDate is absent" in str(raised.value)
    assert "['nodes', 'differ'] may be missing" in str(raised.value)


def test_load_rejects_mismatched_sidecar(tmp_path: Path) -> None:
    weights = tmp_path / "recurrence_catboost.cbm"
    shutil.copy(WEIGHTS, weights)
    metadata = json.loads(sidecar_path(WEIGHTS).read_text())
    metadata["weights_sha256"] = "0" * 64
    sidecar_path(weights).write_text(json.dumps(metadata))

    with pytest.raises(ModelArtifactError, match="different training runs"):
        RecurrenceModel.load(weights)


def test_load_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelArtifactError, match="not found"):
        RecurrenceModel.load(tmp_path / "absent.cbm")


def test_metadata_describes_training(model: RecurrenceModel) -> None:
    metadata = model.metadata

    assert model.horizon_years == 5.0
    assert metadata.horizon_days == 1826
    assert metadata.features_missing_in_training == ["nodes", "differ"]
    assert metadata.training_data.patients == 929
    assert metadata.training_data.known_status_patients + metadata.training_data.unknown_status_patients == 929
    assert metadata.metrics["cv_c_index_mean"] >= CV_C_INDEX_FLOOR


def test_c_index_above_floor(model: RecurrenceModel, table: pd.DataFrame) -> None:
    probability = model.predict_table(table)
    c_index = concordance_index(table["time"], -probability, table["status"])

    assert c_index >= IN_SAMPLE_C_INDEX_FLOOR


def test_ipcw_weights_by_hand() -> None:
    # Censoring at day 200 leaves 3 of 4 patients at risk uncensored: G = 0.75 from day 200 on.
    time = np.array([100, 200, 300, 2000, 2500])
    status = np.array([1, 0, 1, 0, 1])
    target = horizon_target(time, status, censoring_survival(time, status), horizon_days=1826)

    assert target.label.tolist() == [1, UNKNOWN, 1, 0, 0]
    assert target.weight == pytest.approx([1.0, 0.0, 1 / 0.75, 1 / 0.75, 1 / 0.75])
