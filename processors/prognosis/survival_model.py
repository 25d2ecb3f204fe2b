"""Recurrence risk within 3 and 5 years from the CatBoost Cox model, with SHAP and a decision path.

The model (fitted by ``survival_fit``) gives each patient a log relative
hazard, and the Breslow baseline stored in the sidecar turns it into the
probability of recurrence by each horizon.

The explanation is CatBoost's own TreeSHAP,
``get_feature_importance(type="ShapValues")`` (Lundberg et al., "From local
explanations to global understanding with explainable AI for trees", Nature
Machine Intelligence 2020). It works on the log relative hazard scale: the
base value plus the contributions equals the patient's log hazard, and
``exp(contribution)`` is the factor by which that feature multiplies the
hazard against the average training patient. ``predict`` checks this sum on
every call.

Weights live in ``recurrence_survival_catboost.cbm`` with the JSON sidecar
``recurrence_survival_catboost.json``: centring, Breslow baseline, risk
cut-offs, surrogate tree and training record.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from catboost import CatBoost, Pool
from pydantic import BaseModel, ConfigDict, Field

from processors.prognosis.data import CATEGORICAL_FEATURES, FEATURE_NAMES, FEATURES, FeatureValue
from processors.prognosis.errors import ExplanationError, ModelArtifactError
from processors.prognosis.model import (
    RiskGroup,
    RiskThresholds,
    file_sha256,
    load_artifact,
    model_row,
    prepare_features,
    sidecar_path,
    table_pool,
)
from processors.prognosis.surrogate import DecisionPath, SurrogateTree, decision_path
from processors.prognosis.survival import StepFunction, survival_probability
from schemas.messages import FeatureContribution, ModelRef

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "recurrence_survival_catboost.cbm"
TRAIN_MODULE = "processors.prognosis.train_survival"

#: Largest accepted gap between base value + contributions and the model's log hazard.
ADDITIVITY_TOLERANCE = 1e-6


class Horizon(BaseModel):
    """A prediction horizon in years and in days since trial registration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    years: float = Field(gt=0)
    days: int = Field(gt=0)


class CumulativeHazardTable(BaseModel):
    """The Breslow baseline cumulative hazard H0(t) at each event time (days)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    times: list[float]
    values: list[float]

    def step_function(self) -> StepFunction:
        """Return H0 as a step function, 0 before the first event."""
        return StepFunction(times=np.asarray(self.times), values=np.asarray(self.values), initial=0.0)


class SurvivalTrainingData(BaseModel):
    """Source of the training data and how censoring was handled."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str
    package: str
    package_version: str
    patients: int
    events: int
    endpoint: str
    censoring: str
    missing_values: dict[str, int]


class SurvivalModelMetadata(BaseModel):
    """Contents of the JSON sidecar next to the CatBoost Cox weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str
    kind: Literal["catboost-cox-breslow"]
    horizons: list[Horizon]
    primary_horizon_years: float = Field(description="Horizon of ``probability`` and of the risk groups.")
    feature_names: list[str]
    categorical_features: list[str]
    features_missing_in_training: list[str] = Field(
        description="Features with missing values in the training data; only these may be missing at prediction.",
    )
    monotone_constraints: dict[str, int]
    center: float = Field(description="Mean raw score on the training patients, subtracted from every score.")
    baseline_cumulative_hazard: CumulativeHazardTable
    risk_thresholds: RiskThresholds
    surrogate: SurrogateTree
    training_data: SurvivalTrainingData
    metrics: dict[str, float | int | str]
    catboost_params: dict[str, float | int | str | bool]
    seed: int
    trained_at: datetime
    command: str
    weights_sha256: str


class HorizonProbability(BaseModel):
    """Probability of recurrence within one horizon."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    horizon_years: float
    probability: float = Field(ge=0.0, le=1.0)


@dataclass(frozen=True)
class SurvivalPrediction:
    """Recurrence risk for one patient with its SHAP explanation and decision path.

    ``probability`` is the probability within the primary horizon (5 years),
    the one the risk group is based on. ``base_value + sum(contributions)``
    equals ``log_hazard``. ``values`` are the validated features the model
    used, ``node4`` derived from ``nodes`` where it was absent.
    """

    probability: float
    probabilities: list[HorizonProbability]
    log_hazard: float
    risk_group: RiskGroup
    base_value: float
    contributions: list[FeatureContribution]
    missing_features: list[str]
    decision_path: DecisionPath
    values: dict[str, FeatureValue]

    def probability_within(self, horizon_years: float) -> float:
        """Return the probability of recurrence within ``horizon_years``."""
        for item in self.probabilities:
            if item.horizon_years == horizon_years:
                return item.probability
        known = [item.horizon_years for item in self.probabilities]
        raise KeyError(f"horizon {horizon_years:g} years is not predicted; the horizons are {known}")

    def top_contributions(self, count: int = 3) -> list[str]:
        """Describe the ``count`` largest contributions in clinical words."""
        return [describe_contribution(item) for item in self.contributions[:count]]


def describe_contribution(item: FeatureContribution) -> str:
    """Word one SHAP contribution, for example 'Positive lymph nodes = 6 nodes raises the hazard x1.52'."""
    factor = math.exp(item.contribution)
    if abs(item.contribution) < 0.005:
        return f"{item.label} = {item.display_value} barely changes the hazard (x{factor:.2f})"
    verb = "raises" if item.contribution > 0 else "lowers"
    return f"{item.label} = {item.display_value} {verb} the hazard x{factor:.2f}"


def write_survival_model(
    booster: CatBoost, path: Path, metadata_fields: Mapping[str, object]
) -> RecurrenceSurvivalModel:
    """Save the weights and their sidecar, whose digest binds the two files, and return the model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(path), format="cbm")
    metadata = SurvivalModelMetadata.model_validate({**metadata_fields, "weights_sha256": file_sha256(path)})
    sidecar_path(path).write_text(metadata.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return RecurrenceSurvivalModel(booster, metadata)


class RecurrenceSurvivalModel:
    """CatBoost Cox model of recurrence: horizon probabilities from a Breslow baseline, per-record explanations."""

    def __init__(self, booster: CatBoost, metadata: SurvivalModelMetadata) -> None:
        if list(booster.feature_names_) != metadata.feature_names:
            raise ModelArtifactError(
                f"the weights have features {booster.feature_names_} but the metadata lists "
                f"{metadata.feature_names}; retrain or restore the matching sidecar"
            )
        self._booster = booster
        self.metadata = metadata
        self.name = metadata.name
        self.version = metadata.version
        self.horizon_years = metadata.primary_horizon_years
        self._cumulative_hazard = metadata.baseline_cumulative_hazard.step_function()
        self._horizon_days = np.array([horizon.days for horizon in metadata.horizons], dtype=float)
        self._cat_indices = [FEATURE_NAMES.index(name) for name in CATEGORICAL_FEATURES]

    @property
    def model_ref(self) -> ModelRef:
        """Name and version for result messages."""
        return ModelRef(name=self.name, version=self.version)

    @classmethod
    def load(cls, path: Path = DEFAULT_WEIGHTS) -> RecurrenceSurvivalModel:
        """Load the weights and check them against the sidecar's SHA-256 digest.

        Raises:
            ModelArtifactError: a file is missing, unreadable or does not match the other.
        """
        path = Path(path)
        booster = CatBoost()
        metadata = load_artifact(path, SurvivalModelMetadata, booster, TRAIN_MODULE)
        logger.info("model loaded name=%s version=%s path=%s", metadata.name, metadata.version, path)
        return cls(booster, metadata)

    def predict(
        self, features: Mapping[str, FeatureValue], missing_reasons: Mapping[str, str] | None = None
    ) -> SurvivalPrediction:
        """Predict recurrence within each horizon for one patient and explain it.

        ``node4`` may be omitted when ``nodes`` is known; it is then derived as
        ``nodes > 4``. Missing ``nodes`` or ``differ`` go down the branch
        CatBoost learned for missing values and are listed in
        ``missing_features``; nothing is imputed.

        Args:
            features: Values by feature name; an absent key, None or NaN is missing.
            missing_reasons: Why features are missing, for example
                ``MappedRecord.missing``; quoted in the error for a missing required feature.

        Raises:
            FeatureValueError: a value is invalid, or a feature the model never
                saw missing in training is missing.
            ExplanationError: the SHAP contributions do not add up to the log hazard.
        """
        values, missing = prepare_features(features, self.metadata.features_missing_in_training, missing_reasons or {})

        pool = Pool(data=[model_row(values)], cat_features=self._cat_indices, feature_names=list(FEATURE_NAMES))
        shap_row = self._booster.get_feature_importance(data=pool, type="ShapValues", thread_count=1)[0]
        raw = float(self._booster.predict(pool, prediction_type="RawFormulaVal", thread_count=1)[0])
        log_hazard = raw - self.metadata.center
        base_value = float(shap_row[-1]) - self.metadata.center
        self._check_additivity(base_value, shap_row[:-1], log_hazard)

        contributions = self._contributions(values, shap_row)
        event_probability = 1.0 - survival_probability(self._cumulative_hazard, [log_hazard], self._horizon_days)[0]
        probabilities = [
            HorizonProbability(horizon_years=horizon.years, probability=float(probability))
            for horizon, probability in zip(self.metadata.horizons, event_probability, strict=True)
        ]
        primary = next(item.probability for item in probabilities if item.horizon_years == self.horizon_years)
        return SurvivalPrediction(
            probability=primary,
            probabilities=probabilities,
            log_hazard=log_hazard,
            risk_group=self.metadata.risk_thresholds.group(primary),
            base_value=base_value,
            contributions=contributions,
            missing_features=missing,
            decision_path=decision_path(self.metadata.surrogate, values),
            values=values,
        )

    def decision_path(self, features: Mapping[str, FeatureValue]) -> DecisionPath:
        """Return the patient's path through the surrogate tree, without predicting.

        Raises:
            FeatureValueError: a value is invalid, or a required feature is missing.
        """
        values, _ = prepare_features(features, self.metadata.features_missing_in_training, {})
        return decision_path(self.metadata.surrogate, values)

    def log_hazard_table(self, table: pd.DataFrame) -> np.ndarray:
        """Return the log relative hazard of each row of a table with the feature columns."""
        raw = self._booster.predict(table_pool(table), prediction_type="RawFormulaVal")
        return np.asarray(raw, dtype=float) - self.metadata.center

    def event_probability_table(self, table: pd.DataFrame, days: np.ndarray | float) -> np.ndarray:
        """Return P(recurrence by each day) for each row (rows) and day (columns)."""
        return 1.0 - survival_probability(self._cumulative_hazard, self.log_hazard_table(table), days)

    def predict_table(self, table: pd.DataFrame) -> np.ndarray:
        """Return the probability of recurrence within the primary horizon for each row."""
        days = next(horizon.days for horizon in self.metadata.horizons if horizon.years == self.horizon_years)
        return self.event_probability_table(table, days)[:, 0]

    def _contributions(self, values: Mapping[str, FeatureValue], shap_row: np.ndarray) -> list[FeatureContribution]:
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
        return contributions

    @staticmethod
    def _check_additivity(base_value: float, shap_values: np.ndarray, log_hazard: float) -> None:
        gap = abs(base_value + float(np.sum(shap_values)) - log_hazard)
        if gap > ADDITIVITY_TOLERANCE:
            raise ExplanationError(
                f"SHAP contributions add up to {base_value + float(np.sum(shap_values)):.9f} but the model's "
                f"log hazard is {log_hazard:.9f} (gap {gap:.2e} > {ADDITIVITY_TOLERANCE:g}); "
                f"the weights may be corrupted, retrain with 'python -m {TRAIN_MODULE}'"
            )
