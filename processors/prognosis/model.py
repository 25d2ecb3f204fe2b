"""CatBoost model of colon cancer recurrence within 5 years, explained with SHAP.

CatBoost (Prokhorenkova et al., "CatBoost: unbiased boosting with categorical
features", arXiv:1706.09516) predicts the log-odds of recurrence within the
horizon. The explanation is CatBoost's own TreeSHAP,
``get_feature_importance(type="ShapValues")``, the method of Lundberg et al.,
"Explainable AI for Trees: From Local Explanations to Global Understanding".
It gives one contribution per feature on the log-odds scale, and these add up
with the base value to the model's raw output.

Weights live in a CatBoost ``.cbm`` file with a JSON metadata sidecar of the
same stem (``recurrence_catboost.cbm`` and ``recurrence_catboost.json``).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import pandas as pd
from catboost import CatBoost, CatBoostClassifier, Pool
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from processors.prognosis.data import (
    CATEGORICAL_FEATURES,
    FEATURE_NAMES,
    FEATURES,
    FeatureValue,
    validate_features,
)
from processors.prognosis.errors import FeatureValueError, ModelArtifactError
from schemas.messages import FeatureContribution, ModelRef

logger = logging.getLogger(__name__)

RiskGroup = Literal["low", "intermediate", "high"]
MetadataT = TypeVar("MetadataT", bound=BaseModel)

#: 5 years in days, the horizon of the binary target.
HORIZON_DAYS = 1826


class RiskThresholds(BaseModel):
    """Cut-offs on the predicted probability that define the risk groups."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    low_below: float = Field(ge=0.0, le=1.0, description="Probabilities below this are 'low'.")
    high_from: float = Field(ge=0.0, le=1.0, description="Probabilities from this up are 'high'.")
    method: str = Field(description="How the cut-offs were chosen.")

    def group(self, probability: float) -> RiskGroup:
        """Return the risk group of a predicted probability."""
        if probability < self.low_below:
            return "low"
        if probability >= self.high_from:
            return "high"
        return "intermediate"


class TrainingData(BaseModel):
    """Source of the training data and construction of the binary target."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str
    package: str
    package_version: str
    patients: int
    recurrences: int
    endpoint: str
    censoring: str
    known_status_patients: int
    unknown_status_patients: int


class ModelMetadata(BaseModel):
    """Contents of the JSON sidecar next to the CatBoost weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str
    horizon_days: int
    horizon_years: float
    feature_names: list[str]
    categorical_features: list[str]
    features_missing_in_training: list[str] = Field(
        description="Features with missing values in the training data; only these may be missing at prediction.",
    )
    risk_thresholds: RiskThresholds
    training_data: TrainingData
    metrics: dict[str, float | int | str]
    catboost_params: dict[str, float | int | str | bool]
    seed: int
    trained_at: datetime
    command: str
    weights_sha256: str


@dataclass(frozen=True)
class RiskPrediction:
    """Predicted recurrence risk for one patient with its SHAP explanation.

    ``base_value + sum(c.contribution for c in contributions)`` equals
    ``log_odds`` up to float rounding, and ``probability`` is its sigmoid.
    """

    probability: float
    log_odds: float
    risk_group: RiskGroup
    base_value: float
    contributions: list[FeatureContribution]
    missing_features: list[str]


def sidecar_path(weights_path: Path) -> Path:
    """Return the metadata sidecar path for a weights file."""
    return weights_path.with_suffix(".json")


def file_sha256(path: Path) -> str:
    """Return the hex SHA-256 digest of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sigmoid(log_odds: float) -> float:
    """Convert log-odds to a probability."""
    return 1.0 / (1.0 + math.exp(-log_odds))


def write_model(booster: CatBoostClassifier, path: Path, metadata_fields: Mapping[str, object]) -> RecurrenceModel:
    """Save trained weights and their sidecar, whose digest binds the two files, and return the model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(path), format="cbm")
    metadata = ModelMetadata.model_validate({**metadata_fields, "weights_sha256": file_sha256(path)})
    sidecar_path(path).write_text(metadata.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return RecurrenceModel(booster, metadata)


def load_artifact(path: Path, metadata_type: type[MetadataT], booster: CatBoost, train_module: str) -> MetadataT:
    """Read a sidecar and the weights into ``booster``, checking the weights against the sidecar's SHA-256.

    Args:
        path: The ``.cbm`` weights; the sidecar is the ``.json`` next to them.
        metadata_type: The pydantic model of the sidecar; it must have ``weights_sha256``.
        booster: An empty CatBoost model that receives the weights.
        train_module: The module that rebuilds the files, named in the error for a missing file.

    Raises:
        ModelArtifactError: a file is missing, unreadable or does not match the other.
    """
    metadata_path = sidecar_path(path)
    for required in (path, metadata_path):
        if not required.is_file():
            raise ModelArtifactError(
                f"model file {required} not found; train it with 'python -m {train_module} --out {path}'"
            )

    try:
        metadata = metadata_type.model_validate_json(metadata_path.read_bytes())
    except ValidationError as error:
        raise ModelArtifactError(f"model metadata {metadata_path} is invalid: {error}") from error

    digest = file_sha256(path)
    if digest != metadata.weights_sha256:
        raise ModelArtifactError(
            f"weights {path} have SHA-256 {digest} but {metadata_path} expects "
            f"{metadata.weights_sha256}; the two files come from different training runs"
        )

    try:
        booster.load_model(str(path), format="cbm")
    except Exception as error:  # CatBoostError has no stable import path across versions
        raise ModelArtifactError(f"cannot read CatBoost weights {path}: {error}") from error
    return metadata


def table_pool(table: pd.DataFrame, label: Sequence[int] | None = None, weight: Sequence[float] | None = None) -> Pool:
    """Build a CatBoost pool from a table with the model feature columns; NaN stays missing."""
    return Pool(
        data=table.loc[:, list(FEATURE_NAMES)],
        label=label,
        weight=weight,
        cat_features=list(CATEGORICAL_FEATURES),
    )


class RecurrenceModel:
    """Recurrence-within-5-years classifier with per-record SHAP explanations."""

    def __init__(self, booster: CatBoostClassifier, metadata: ModelMetadata) -> None:
        if list(booster.feature_names_) != metadata.feature_names:
            raise ModelArtifactError(
                f"the weights have features {booster.feature_names_} but the metadata lists "
                f"{metadata.feature_names}; retrain or restore the matching sidecar"
            )
        self._booster = booster
        self.metadata = metadata
        self.name = metadata.name
        self.version = metadata.version
        self.horizon_years = metadata.horizon_years
        self._cat_indices = [FEATURE_NAMES.index(name) for name in CATEGORICAL_FEATURES]

    @property
    def model_ref(self) -> ModelRef:
        """Name and version for result messages."""
        return ModelRef(name=self.name, version=self.version)

    @classmethod
    def load(cls, path: Path) -> RecurrenceModel:
        """Load the weights and check them against the sidecar's SHA-256 digest.

        Raises:
            ModelArtifactError: a file is missing, unreadable or does not match the other.
        """
        path = Path(path)
        booster = CatBoostClassifier()
        metadata = load_artifact(path, ModelMetadata, booster, "processors.prognosis.train")
        logger.info("model loaded name=%s version=%s path=%s", metadata.name, metadata.version, path)
        return cls(booster, metadata)

    def predict(
        self, features: Mapping[str, FeatureValue], missing_reasons: Mapping[str, str] | None = None
    ) -> RiskPrediction:
        """Predict recurrence within the horizon for one patient and explain it.

        ``node4`` may be omitted when ``nodes`` is known. It is then derived as
        ``nodes > 4``, its definition, although the trial's own ``node4``
        disagrees with that for 12 of 929 patients.

        Args:
            features: Values by feature name; an absent key, None or NaN is missing.
            missing_reasons: Why features are missing, for example
                ``MappedRecord.missing``; quoted in the error for a missing required feature.

        Raises:
            FeatureValueError: a value is invalid, or a feature the model never
                saw missing in training is missing.
        """
        values, missing = prepare_features(features, self.metadata.features_missing_in_training, missing_reasons or {})

        pool = Pool(data=[self._row(values)], cat_features=self._cat_indices, feature_names=list(FEATURE_NAMES))
        shap_row = self._booster.get_feature_importance(data=pool, type="ShapValues", thread_count=1)[0]
        log_odds = float(self._booster.predict(pool, prediction_type="RawFormulaVal")[0])

        probability = sigmoid(log_odds)
        contributions = [
            FeatureContribution(
                feature=name,
                label=FEATURES[name].label,
                value=values[name],
                display_value=FEATURES[name].display(values[name]),
                contribution=float(shap_row[index]),
            )
            for index, name in enumerate(FEATURE_NAMES)
        ]
        contributions.sort(key=lambda item: abs(item.contribution), reverse=True)
        return RiskPrediction(
            probability=probability,
            log_odds=log_odds,
            risk_group=self.metadata.risk_thresholds.group(probability),
            base_value=float(shap_row[-1]),
            contributions=contributions,
            missing_features=missing,
        )

    def predict_table(self, table: pd.DataFrame) -> np.ndarray:
        """Return the recurrence probability for each row of a table with the feature columns."""
        return self._booster.predict_proba(table_pool(table))[:, 1]

    @staticmethod
    def _row(values: Mapping[str, FeatureValue]) -> list[float | str]:
        return model_row(values)


def model_row(values: Mapping[str, FeatureValue]) -> list[float | str]:
    """Return one row in the model's column order, None as NaN."""
    return [math.nan if values[name] is None else values[name] for name in FEATURE_NAMES]


def prepare_features(
    features: Mapping[str, FeatureValue],
    allowed_missing: Sequence[str],
    missing_reasons: Mapping[str, str],
) -> tuple[dict[str, FeatureValue], list[str]]:
    """Validate one patient's features, derive ``node4`` from ``nodes`` when absent, and list the missing ones.

    Args:
        features: Values by feature name; an absent key, None or NaN is missing.
        allowed_missing: Features the model saw missing in training; only these may be missing.
        missing_reasons: Why features are missing, quoted in the error for a required one.

    Raises:
        FeatureValueError: a value is invalid, or a feature outside ``allowed_missing`` is missing.
    """
    values = validate_features(features)
    if values["node4"] is None and values["nodes"] is not None:
        values["node4"] = float(values["nodes"] > 4)

    missing = [name for name in FEATURE_NAMES if values[name] is None]
    required_absent = [name for name in missing if name not in allowed_missing]
    if required_absent:
        details = "; ".join(f"{name}: {missing_reasons[name]}" for name in required_absent if name in missing_reasons)
        raise FeatureValueError(
            required_absent[0],
            f"required features {required_absent} are missing{f' ({details})' if details else ''}; the model was "
            f"trained without missing values for them, and only {list(allowed_missing)} may be missing",
        )
    return values, missing
