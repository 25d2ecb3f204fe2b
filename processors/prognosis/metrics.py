"""Discrimination and calibration metrics for right-censored survival predictions.

Every inverse probability of censoring weight (IPCW) uses G, the Kaplan-Meier
estimate of the censoring distribution, fitted on the training patients as in
scikit-survival. A test patient followed past the last training time would get
no weight, so the evaluation times must stay below it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from lifelines.utils import concordance_index

from processors.prognosis.survival import StepFunction, kaplan_meier


def harrell_c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Return Harrell's C: the share of comparable pairs whose higher risk has the earlier event."""
    return float(concordance_index(time, -np.asarray(risk, dtype=float), event))


def cumulative_dynamic_auc(
    censoring: StepFunction, time: np.ndarray, event: np.ndarray, risk: np.ndarray, horizon: float
) -> float:
    """Return the IPCW cumulative/dynamic AUC at ``horizon`` (Uno et al., 2007; Hung and Chiang, 2010).

    Cases had the event by ``horizon`` and weigh 1/G(T-). Controls are still
    event-free after ``horizon`` and weigh equally. Censored patients before
    the horizon count through the weights only. Ties in risk count one half.

    Args:
        censoring: G estimated on the training patients.
        time: Follow-up times of the test patients.
        event: Event indicators of the test patients.
        risk: Predicted risk at ``horizon``; higher means an earlier event.
        horizon: The time t of AUC(t), in the unit of ``time``.
    """
    time = np.asarray(time, dtype=float)
    event = np.asarray(event, dtype=bool)
    risk = np.asarray(risk, dtype=float)

    cases = event & (time <= horizon)
    controls = time > horizon
    if not cases.any() or not controls.any():
        raise ValueError(f"AUC at {horizon:g} needs cases and controls; got {cases.sum()} and {controls.sum()}")

    case_weight = 1.0 / censoring.before(time[cases])
    control_risk = np.sort(risk[controls])
    below = np.searchsorted(control_risk, risk[cases], side="left")
    tied = np.searchsorted(control_risk, risk[cases], side="right") - below
    concordant = below + 0.5 * tied
    return float(np.sum(case_weight * concordant) / (np.sum(case_weight) * len(control_risk)))


def brier_score(
    censoring: StepFunction, time: np.ndarray, event: np.ndarray, survival: np.ndarray, horizon: float
) -> float:
    """Return the IPCW Brier score of predicted survival at ``horizon`` (Graf et al., Stat Med 1999).

    A patient with the event by the horizon adds S(t)^2 / G(T-), one still
    event-free adds (1 - S(t))^2 / G(t), and one censored earlier adds 0.
    """
    time = np.asarray(time, dtype=float)
    event = np.asarray(event, dtype=bool)
    survival = np.asarray(survival, dtype=float)

    had_event = event & (time <= horizon)
    event_free = time > horizon
    terms = np.zeros(len(time))
    terms[had_event] = survival[had_event] ** 2 / censoring.before(time[had_event])
    terms[event_free] = (1.0 - survival[event_free]) ** 2 / float(censoring.at(horizon))
    return float(terms.mean())


def integrated_brier_score(
    censoring: StepFunction, time: np.ndarray, event: np.ndarray, survival: np.ndarray, grid: np.ndarray
) -> float:
    """Return the Brier score integrated over ``grid`` by the trapezoid rule, divided by its length.

    Args:
        survival: Predicted S(t | x), one row per patient, one column per time of ``grid``.
        grid: Increasing evaluation times.
    """
    scores = np.array([brier_score(censoring, time, event, survival[:, column], t) for column, t in enumerate(grid)])
    return float(np.trapezoid(scores, grid) / (grid[-1] - grid[0]))


@dataclass(frozen=True)
class CalibrationGroup:
    """Mean predicted and Kaplan-Meier observed event probability by the horizon in one risk group."""

    patients: int
    predicted: float
    observed: float


def calibration_groups(
    time: np.ndarray, event: np.ndarray, predicted: np.ndarray, horizon: float, groups: int = 10
) -> list[CalibrationGroup]:
    """Split patients into quantile groups of predicted event probability and compare with Kaplan-Meier.

    The observed probability is 1 - S_KM(horizon) within the group, so
    patients censored before the horizon count for the time they were followed.
    """
    predicted = np.asarray(predicted, dtype=float)
    order = np.argsort(predicted, kind="stable")
    result: list[CalibrationGroup] = []
    for members in np.array_split(order, groups):
        observed = 1.0 - float(kaplan_meier(time[members], event[members]).at(horizon))
        result.append(CalibrationGroup(len(members), float(predicted[members].mean()), observed))
    return result


def calibration_error(groups: list[CalibrationGroup]) -> float:
    """Return the patient-weighted mean absolute difference between predicted and observed."""
    total = sum(group.patients for group in groups)
    return sum(group.patients * abs(group.predicted - group.observed) for group in groups) / total
