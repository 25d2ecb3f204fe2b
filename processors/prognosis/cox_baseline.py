"""Cox proportional-hazards baseline (lifelines ``CoxPHFitter``) for the evaluation.

Cox, "Regression models and life-tables" (J R Stat Soc B, 1972), fitted by
lifelines with Efron ties and the Breslow baseline hazard. ``rx`` enters as two
indicators against observation only, and the other features enter linearly
as coded in the trial table.

NOTE: A Cox model cannot take missing values, so this baseline fills a missing
``nodes`` or ``differ`` with the median of the training fold. This is for the
comparison only. The product model never fills in a value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter

from processors.prognosis.data import CATEGORICAL_FEATURES, FEATURE_NAMES, FEATURES

REFERENCE_ARM = "Obs"


def cox_design(table: pd.DataFrame, medians: pd.Series) -> pd.DataFrame:
    """Return the Cox design matrix: numeric features with NaN set to ``medians``, and arm indicators."""
    numeric = [name for name in FEATURE_NAMES if name not in CATEGORICAL_FEATURES]
    design = table.loc[:, numeric].astype(float).fillna(medians)
    for arm in FEATURES["rx"].codes:
        if arm != REFERENCE_ARM:
            design[f"rx_{arm}"] = (table["rx"] == arm).astype(float)
    return design


@dataclass(frozen=True)
class CoxBaseline:
    """A fitted Cox PH model with the medians that fill its missing inputs."""

    fitter: CoxPHFitter
    medians: pd.Series

    def log_hazard(self, table: pd.DataFrame) -> np.ndarray:
        """Return the linear predictor of each row, centred on the training means as lifelines does."""
        return np.log(self.fitter.predict_partial_hazard(cox_design(table, self.medians)).to_numpy())

    def event_probability(self, table: pd.DataFrame, days: np.ndarray) -> np.ndarray:
        """Return P(event by each day) for each row (rows) and day (columns)."""
        survival = self.fitter.predict_survival_function(cox_design(table, self.medians), times=np.asarray(days))
        return 1.0 - survival.to_numpy().T


def fit_cox_baseline(table: pd.DataFrame) -> CoxBaseline:
    """Fit the Cox PH baseline on a table with the feature columns, ``time`` and ``status``."""
    numeric = [name for name in FEATURE_NAMES if name not in CATEGORICAL_FEATURES]
    medians = table.loc[:, numeric].median()
    frame = cox_design(table, medians).assign(time=table["time"].to_numpy(), status=table["status"].to_numpy())
    fitter = CoxPHFitter().fit(frame, duration_col="time", event_col="status")
    return CoxBaseline(fitter=fitter, medians=medians)
