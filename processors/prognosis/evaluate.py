"""Evaluate the CatBoost survival model against a Cox PH baseline by repeated stratified k-fold.

Usage::

    python -m processors.prognosis.evaluate --out docs/prognosis --repeats 10 --folds 5 --seed 0

Both models are fitted on the same training folds and scored on the same test
folds, for the recurrence endpoint (``etype`` 1) and the death endpoint
(``etype`` 2). Folds are stratified on the 5-year status: event by 5 years,
event-free after 5 years, censored earlier. Metrics per test fold: Harrell's
C-index of the log hazard, the IPCW cumulative/dynamic AUC at 3 and 5 years,
the IPCW Brier score at 3 and 5 years, and the Brier score integrated from 3
months to 5 years. The censoring distribution comes from the training fold.
Calibration at 3 and 5 years compares out-of-fold predictions with
Kaplan-Meier estimates in deciles of predicted risk.

The command writes ``EVALUATION.md``, ``evaluation.json`` and PNG plots to ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.model_selection import StratifiedKFold

from processors.prognosis.cox_baseline import fit_cox_baseline
from processors.prognosis.data import Endpoint, load_endpoint_table
from processors.prognosis.machine import machine_description
from processors.prognosis.metrics import (
    brier_score,
    calibration_error,
    calibration_groups,
    cumulative_dynamic_auc,
    harrell_c_index,
    integrated_brier_score,
)
from processors.prognosis.survival import StepFunction, censoring_distribution, kaplan_meier
from processors.prognosis.survival_fit import HORIZON_DAYS, PRIMARY_HORIZON_YEARS, fit_survival_model, horizon_strata

logger = logging.getLogger(__name__)

CATBOOST = "CatBoost Cox"
COX = "Cox PH"
MODELS = (CATBOOST, COX)
ENDPOINTS: tuple[Endpoint, ...] = ("recurrence", "death")

#: Integrated Brier score window: 3 months to 5 years, in days.
IBS_GRID = np.linspace(91, HORIZON_DAYS[5.0], 40)
CALIBRATION_GROUPS = 10
METRICS = ("c_index", "auc_3y", "auc_5y", "brier_3y", "brier_5y", "ibs")
#: Metrics where a lower value is better.
LOWER_IS_BETTER = frozenset({"brier_3y", "brier_5y", "ibs"})


@dataclass
class FoldScore:
    """The metrics of one model on one test fold."""

    endpoint: str
    model: str
    repeat: int
    fold: int
    c_index: float
    auc_3y: float
    auc_5y: float
    brier_3y: float
    brier_5y: float
    ibs: float


@dataclass
class Comparison:
    """CatBoost minus Cox for one metric over all folds, with the corrected resampled t interval."""

    metric: str
    catboost_mean: float
    catboost_sd: float
    cox_mean: float
    cox_sd: float
    difference: float
    low: float
    high: float
    catboost_wins: int
    folds: int
    verdict: str


@dataclass
class CalibrationCurve:
    """Decile means of predicted and observed event probability, averaged over repeats."""

    endpoint: str
    model: str
    horizon_years: float
    predicted: list[float]
    observed: list[float]
    error: float


@dataclass
class EndpointResult:
    """Everything measured for one endpoint."""

    endpoint: str
    patients: int
    events: int
    events_by_horizon: dict[str, int]
    censored_before_horizon: dict[str, int]
    scores: list[FoldScore] = field(default_factory=list)
    kaplan_meier_ibs: list[float] = field(default_factory=list)
    brier_curves: dict[str, list[list[float]]] = field(default_factory=dict)
    calibration: list[CalibrationCurve] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)


def corrected_interval(differences: np.ndarray, test_share: float) -> tuple[float, float]:
    """Return the 95 % interval of the mean fold difference by the corrected resampled t-test.

    Folds of repeated cross-validation share training patients, so the plain
    t interval is too narrow. Nadeau and Bengio ("Inference for the
    generalization error", Machine Learning 2003) scale the variance by
    ``1/J + n_test/n_train`` instead of ``1/J`` for J folds.
    """
    count = len(differences)
    variance = np.var(differences, ddof=1) * (1.0 / count + test_share / (1.0 - test_share))
    half_width = stats.t.ppf(0.975, count - 1) * np.sqrt(variance)
    mean = float(np.mean(differences))
    return mean - half_width, mean + half_width


def compare(scores: list[FoldScore], metric: str, folds: int) -> Comparison:
    """Compare CatBoost with Cox on one metric, fold by fold."""
    frame = pd.DataFrame([asdict(score) for score in scores])
    wide = frame.pivot_table(index=["repeat", "fold"], columns="model", values=metric)
    differences = (wide[CATBOOST] - wide[COX]).to_numpy()
    low, high = corrected_interval(differences, 1.0 / folds)

    better_sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    wins = int(np.sum(better_sign * differences > 0))
    verdict = _verdict_lower_better(low, high) if better_sign < 0 else _verdict_higher_better(low, high)
    return Comparison(
        metric=metric,
        catboost_mean=float(wide[CATBOOST].mean()),
        catboost_sd=float(wide[CATBOOST].std(ddof=1)),
        cox_mean=float(wide[COX].mean()),
        cox_sd=float(wide[COX].std(ddof=1)),
        difference=float(np.mean(differences)),
        low=low,
        high=high,
        catboost_wins=wins,
        folds=len(differences),
        verdict=verdict,
    )


def _verdict_higher_better(low: float, high: float) -> str:
    if low > 0:
        return "CatBoost better"
    if high < 0:
        return "Cox PH better"
    return "no clear difference"


def _verdict_lower_better(low: float, high: float) -> str:
    if high < 0:
        return "CatBoost better"
    if low > 0:
        return "Cox PH better"
    return "no clear difference"


def evaluate_endpoint(endpoint: Endpoint, repeats: int, folds: int, seed: int) -> EndpointResult:
    """Run the repeated cross-validation of both models on one endpoint."""
    table = load_endpoint_table(endpoint)
    event_time = table["time"].to_numpy()
    event = table["status"].to_numpy()
    horizons = {f"{years:g}y": days for years, days in HORIZON_DAYS.items()}
    result = EndpointResult(
        endpoint=endpoint,
        patients=len(table),
        events=int(event.sum()),
        events_by_horizon={name: int(np.sum((event == 1) & (event_time <= days))) for name, days in horizons.items()},
        censored_before_horizon={
            name: int(np.sum((event == 0) & (event_time <= days))) for name, days in horizons.items()
        },
        brier_curves={model: [] for model in MODELS},
    )
    strata = horizon_strata(event_time, event, HORIZON_DAYS[PRIMARY_HORIZON_YEARS])
    days = np.concatenate([list(HORIZON_DAYS.values()), IBS_GRID])
    out_of_fold = {model: np.zeros((repeats, len(table), len(HORIZON_DAYS))) for model in MODELS}

    for repeat in range(repeats):
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed + repeat)
        for fold, (train_index, test_index) in enumerate(splitter.split(table, strata)):
            train, test = table.iloc[train_index], table.iloc[test_index]
            censoring = censoring_distribution(event_time[train_index], event[train_index])
            catboost = fit_survival_model(train, seed)
            cox = fit_cox_baseline(train)

            for model, fitted in ((CATBOOST, catboost), (COX, cox)):
                probability = fitted.event_probability(test, days)
                out_of_fold[model][repeat, test_index] = probability[:, : len(HORIZON_DAYS)]
                score, curve = _score_fold(
                    censoring, test, fitted.log_hazard(test), probability, (endpoint, model, repeat, fold)
                )
                result.scores.append(score)
                result.brier_curves[model].append(curve)

            baseline_survival = kaplan_meier(event_time[train_index], event[train_index]).at(IBS_GRID)
            result.kaplan_meier_ibs.append(
                integrated_brier_score(
                    censoring,
                    test["time"].to_numpy(),
                    test["status"].to_numpy(),
                    np.tile(baseline_survival, (len(test), 1)),
                    IBS_GRID,
                )
            )
        logger.info("repeat done endpoint=%s repeat=%d", endpoint, repeat)

    result.calibration = _calibration_curves(endpoint, event_time, event, out_of_fold)
    result.comparisons = [compare(result.scores, metric, folds) for metric in METRICS]
    return result


def _score_fold(
    censoring: StepFunction,
    test: pd.DataFrame,
    log_hazard: np.ndarray,
    probability: np.ndarray,
    where: tuple[str, str, int, int],
) -> tuple[FoldScore, list[float]]:
    """Score one model on one test fold; ``probability`` has the horizons first, then ``IBS_GRID``."""
    test_time = test["time"].to_numpy()
    test_event = test["status"].to_numpy()
    at_3y, at_5y = probability[:, 0], probability[:, 1]
    grid_survival = 1.0 - probability[:, len(HORIZON_DAYS) :]
    curve = [
        brier_score(censoring, test_time, test_event, grid_survival[:, column], day)
        for column, day in enumerate(IBS_GRID)
    ]
    endpoint, model, repeat, fold = where
    score = FoldScore(
        endpoint=endpoint,
        model=model,
        repeat=repeat,
        fold=fold,
        c_index=harrell_c_index(test_time, test_event, log_hazard),
        auc_3y=cumulative_dynamic_auc(censoring, test_time, test_event, at_3y, HORIZON_DAYS[3.0]),
        auc_5y=cumulative_dynamic_auc(censoring, test_time, test_event, at_5y, HORIZON_DAYS[5.0]),
        brier_3y=brier_score(censoring, test_time, test_event, 1.0 - at_3y, HORIZON_DAYS[3.0]),
        brier_5y=brier_score(censoring, test_time, test_event, 1.0 - at_5y, HORIZON_DAYS[5.0]),
        ibs=integrated_brier_score(censoring, test_time, test_event, grid_survival, IBS_GRID),
    )
    return score, curve


def _calibration_curves(
    endpoint: str, event_time: np.ndarray, event: np.ndarray, out_of_fold: dict[str, np.ndarray]
) -> list[CalibrationCurve]:
    curves: list[CalibrationCurve] = []
    for model, predictions in out_of_fold.items():
        for column, (years, days) in enumerate(HORIZON_DAYS.items()):
            per_repeat = [
                calibration_groups(event_time, event, predictions[repeat, :, column], days, CALIBRATION_GROUPS)
                for repeat in range(predictions.shape[0])
            ]
            curves.append(
                CalibrationCurve(
                    endpoint=endpoint,
                    model=model,
                    horizon_years=years,
                    predicted=np.mean([[g.predicted for g in groups] for groups in per_repeat], axis=0).tolist(),
                    observed=np.mean([[g.observed for g in groups] for groups in per_repeat], axis=0).tolist(),
                    error=float(np.mean([calibration_error(groups) for groups in per_repeat])),
                )
            )
    return curves


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/prognosis"), help="folder for the report and plots")
    parser.add_argument("--repeats", type=int, default=10, help="number of repetitions of the k-fold split")
    parser.add_argument("--folds", type=int, default=5, help="number of folds (k)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first split (repeat r uses seed + r)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    command = "python -m processors.prognosis.evaluate " + shlex.join(
        ["--out", str(args.out), "--repeats", str(args.repeats), "--folds", str(args.folds), "--seed", str(args.seed)]
    )

    started = time.perf_counter()
    results = [evaluate_endpoint(endpoint, args.repeats, args.folds, args.seed) for endpoint in ENDPOINTS]
    elapsed = time.perf_counter() - started

    # Imported here so that the evaluation itself does not need matplotlib.
    from processors.prognosis.evaluation_report import write_report

    run = {
        "command": command,
        "repeats": args.repeats,
        "folds": args.folds,
        "seed": args.seed,
        "elapsed_s": elapsed,
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": machine_description(),
    }
    report = write_report(results, run, args.out)
    for result in results:
        for comparison in result.comparisons:
            print(
                f"{result.endpoint:10s} {comparison.metric:9s} CatBoost {comparison.catboost_mean:.3f}  "
                f"Cox {comparison.cox_mean:.3f}  difference {comparison.difference:+.3f} "
                f"[{comparison.low:+.3f}, {comparison.high:+.3f}]  {comparison.verdict}"
            )
    print(f"wrote {report} in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
