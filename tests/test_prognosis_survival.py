"""Tests of the survival estimators and the IPCW metrics against hand-computed values and lifelines."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter, KaplanMeierFitter

from processors.prognosis.evaluate import corrected_interval
from processors.prognosis.metrics import (
    brier_score,
    calibration_error,
    calibration_groups,
    cumulative_dynamic_auc,
    harrell_c_index,
    integrated_brier_score,
)
from processors.prognosis.survival import (
    StepFunction,
    breslow_cumulative_hazard,
    censoring_distribution,
    kaplan_meier,
    survival_probability,
)

# Six patients: events at days 2, 4 (two), 8; censored at days 3 and 9.
TIME = np.array([2, 3, 4, 4, 8, 9])
EVENT = np.array([1, 0, 1, 1, 1, 0])


def test_step_function_at_and_before() -> None:
    step = StepFunction(times=np.array([1.0, 3.0]), values=np.array([0.5, 0.2]), initial=1.0)

    assert step.at([0.0, 1.0, 2.0, 3.0, 4.0]).tolist() == [1.0, 0.5, 0.5, 0.2, 0.2]
    assert step.before([0.0, 1.0, 2.0, 3.0, 4.0]).tolist() == [1.0, 1.0, 0.5, 0.5, 0.2]


def test_kaplan_meier_by_hand() -> None:
    survival = kaplan_meier(TIME, EVENT)

    # 6 at risk at day 2 (1 event), 4 at day 4 (2 events), 2 at day 8 (1 event).
    assert survival.at(2) == pytest.approx(5 / 6)
    assert survival.at(4) == pytest.approx(5 / 6 * 2 / 4)
    assert survival.at(8) == pytest.approx(5 / 6 * 2 / 4 * 1 / 2)
    assert survival.before(4) == pytest.approx(5 / 6)


def test_kaplan_meier_matches_lifelines() -> None:
    rng = np.random.default_rng(1)
    time = rng.integers(1, 60, size=80)
    event = rng.integers(0, 2, size=80)
    fitter = KaplanMeierFitter().fit(time, event)
    days = np.arange(0, 62)

    expected = fitter.survival_function_at_times(days).to_numpy()
    assert kaplan_meier(time, event).at(days) == pytest.approx(expected)


def test_censoring_distribution_counts_events_first() -> None:
    censoring = censoring_distribution(TIME, EVENT)

    # Censoring at day 3 with 5 at risk, at day 9 with 1 at risk.
    assert censoring.at(2) == pytest.approx(1.0)
    assert censoring.at(3) == pytest.approx(4 / 5)
    assert censoring.before(3) == pytest.approx(1.0)
    assert censoring.at(9) == pytest.approx(0.0)


def test_breslow_by_hand() -> None:
    log_hazard = np.log(np.array([1.0, 2.0, 1.0, 3.0, 1.0, 1.0]))
    cumulative = breslow_cumulative_hazard(TIME, EVENT, log_hazard)

    # Risk sets: day 2 all (sum 9), day 4 patients 3-6 (sum 6), day 8 patients 5-6 (sum 2).
    assert cumulative.times.tolist() == [2.0, 4.0, 8.0]
    assert cumulative.values == pytest.approx([1 / 9, 1 / 9 + 2 / 6, 1 / 9 + 2 / 6 + 1 / 2])
    assert cumulative.at(3) == pytest.approx(1 / 9)


def test_breslow_matches_lifelines_baseline() -> None:
    rng = np.random.default_rng(2)
    covariate = rng.normal(size=200)
    time = np.ceil(rng.exponential(scale=np.exp(-0.7 * covariate)) * 100)
    event = rng.random(200) < 0.8
    frame = pd.DataFrame({"x": covariate, "time": time, "event": event.astype(int)})
    assert frame["time"].duplicated().any()

    fitter = CoxPHFitter(baseline_estimation_method="breslow").fit(frame, "time", "event")
    centred = fitter.params_["x"] * (covariate - covariate.mean())
    ours = breslow_cumulative_hazard(time, event, centred)

    expected = fitter.baseline_cumulative_hazard_.iloc[:, 0]
    for day in (20.0, 60.0, 150.0):
        assert float(ours.at(day)) == pytest.approx(expected.loc[:day].iloc[-1], rel=1e-9)


def test_survival_probability_shape_and_order() -> None:
    cumulative = StepFunction(times=np.array([10.0, 20.0]), values=np.array([0.1, 0.3]), initial=0.0)
    survival = survival_probability(cumulative, np.array([0.0, np.log(2.0)]), np.array([5.0, 15.0, 25.0]))

    assert survival.shape == (2, 3)
    assert survival[0] == pytest.approx(np.exp([-0.0, -0.1, -0.3]))
    assert survival[1] == pytest.approx(np.exp([-0.0, -0.2, -0.6]))


def test_harrell_c_perfect_and_reversed() -> None:
    time = np.array([1, 2, 3, 4])
    event = np.array([1, 1, 1, 1])

    assert harrell_c_index(time, event, np.array([4, 3, 2, 1])) == pytest.approx(1.0)
    assert harrell_c_index(time, event, np.array([1, 2, 3, 4])) == pytest.approx(0.0)


def test_cumulative_dynamic_auc_by_hand() -> None:
    # Without censoring before the horizon, G = 1 and the AUC is the plain case/control AUC.
    time = np.array([1, 2, 5, 6, 7])
    event = np.array([1, 1, 0, 1, 0])
    risk = np.array([0.9, 0.3, 0.5, 0.2, 0.3])
    censoring = censoring_distribution(np.array([10, 10]), np.array([0, 0]))

    # Cases 0.9 and 0.3 against controls 0.5, 0.2, 0.3: (3 + 1 + 0.5) / 6.
    assert cumulative_dynamic_auc(censoring, time, event, risk, horizon=3) == pytest.approx(4.5 / 6)


def test_cumulative_dynamic_auc_weights_cases() -> None:
    censoring = StepFunction(times=np.array([1.5]), values=np.array([0.5]), initial=1.0)
    time = np.array([1, 2, 5])
    event = np.array([1, 1, 0])
    risk = np.array([0.9, 0.1, 0.5])

    # Case at day 1 weighs 1, case at day 2 weighs 2; only the first ranks above the control.
    assert cumulative_dynamic_auc(censoring, time, event, risk, horizon=3) == pytest.approx(1 / 3)


def test_cumulative_dynamic_auc_needs_controls() -> None:
    censoring = censoring_distribution(np.array([10]), np.array([0]))

    with pytest.raises(ValueError, match="needs cases and controls"):
        cumulative_dynamic_auc(censoring, np.array([1, 2]), np.array([1, 1]), np.array([0.1, 0.2]), horizon=5)


def test_brier_score_by_hand() -> None:
    censoring = StepFunction(times=np.array([2.5]), values=np.array([0.5]), initial=1.0)
    time = np.array([1, 2, 3, 6])
    event = np.array([1, 0, 0, 1])
    survival = np.array([0.2, 0.7, 0.4, 0.9])

    # At t = 2.5: patient 1 had the event (0.04 / G(1-) = 0.04), patient 2 censored (0),
    # patients 3 and 4 event-free (0.6^2 / 0.5 and 0.1^2 / 0.5).
    expected = (0.04 + 0.0 + 0.36 / 0.5 + 0.01 / 0.5) / 4
    assert brier_score(censoring, time, event, survival, horizon=2.5) == pytest.approx(expected)


def test_integrated_brier_score_of_constant_curve() -> None:
    censoring = censoring_distribution(np.array([100]), np.array([0]))
    time = np.array([10, 20, 30, 40])
    event = np.array([0, 0, 0, 0])
    grid = np.array([1.0, 2.0, 3.0])
    survival = np.full((4, 3), 0.75)

    # Everyone is event-free and uncensored over the grid: each Brier score is 0.25^2.
    assert integrated_brier_score(censoring, time, event, survival, grid) == pytest.approx(0.0625)


def test_calibration_groups_perfect_model() -> None:
    time = np.array([1, 1, 9, 9, 1, 9, 9, 9])
    event = np.array([1, 1, 0, 0, 1, 0, 0, 0])
    predicted = np.array([1.0, 1.0, 1.0, 1.0, 0.25, 0.25, 0.25, 0.25])

    groups = calibration_groups(time, event, predicted, horizon=5, groups=2)

    assert [group.patients for group in groups] == [4, 4]
    assert groups[0].predicted == pytest.approx(0.25)
    assert groups[0].observed == pytest.approx(0.25)
    assert groups[1].observed == pytest.approx(0.5)
    assert calibration_error(groups) == pytest.approx(0.25)


def test_corrected_interval_wider_than_naive() -> None:
    differences = np.array([0.01, -0.02, 0.03, 0.0, 0.015, -0.005, 0.02, 0.01, -0.01, 0.005])
    low, high = corrected_interval(differences, test_share=0.2)

    naive_half = 2.262 * differences.std(ddof=1) / np.sqrt(len(differences))
    assert low < differences.mean() < high
    assert (high - low) / 2 > naive_half
