"""Survival-analysis estimators: Kaplan-Meier, censoring distribution and Breslow baseline hazard.

Times are in days. Each estimator returns a right-continuous ``StepFunction``
that can be read at a time (``at``) or just before it (``before``), the left
limit that inverse probability of censoring weights need.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StepFunction:
    """Right-continuous step function: ``initial`` before ``times[0]``, ``values[k]`` from ``times[k]`` on."""

    times: np.ndarray
    values: np.ndarray
    initial: float

    def at(self, time: np.ndarray | float) -> np.ndarray:
        """Return the value at each time."""
        index = np.searchsorted(self.times, np.asarray(time, dtype=float), side="right") - 1
        return self._lookup(index)

    def before(self, time: np.ndarray | float) -> np.ndarray:
        """Return the left limit at each time: the value just before it."""
        index = np.searchsorted(self.times, np.asarray(time, dtype=float), side="left") - 1
        return self._lookup(index)

    def _lookup(self, index: np.ndarray) -> np.ndarray:
        padded = np.concatenate([[self.initial], self.values])
        return padded[index + 1]


def _event_counts(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the distinct times, the number at risk just before each and the events at each."""
    time = np.asarray(time, dtype=float)
    event = np.asarray(event, dtype=bool)
    distinct, inverse = np.unique(time, return_inverse=True)
    events = np.bincount(inverse, weights=event.astype(float), minlength=len(distinct))
    leaving = np.bincount(inverse, minlength=len(distinct)).astype(float)
    at_risk = len(time) - np.concatenate([[0.0], np.cumsum(leaving)[:-1]])
    return distinct, at_risk, events


def kaplan_meier(time: np.ndarray, event: np.ndarray) -> StepFunction:
    """Estimate the survival function S(t) (Kaplan and Meier, JASA 1958).

    Args:
        time: Follow-up time of each subject.
        event: 1 (or True) where the follow-up ended with the event, 0 where it was censored.
    """
    distinct, at_risk, events = _event_counts(time, event)
    survival = np.cumprod(1.0 - events / at_risk)
    return StepFunction(times=distinct, values=survival, initial=1.0)


def censoring_distribution(time: np.ndarray, event: np.ndarray) -> StepFunction:
    """Estimate G(t), the probability of remaining uncensored at t: Kaplan-Meier with censoring as the event.

    Subjects with the event at t still count at risk of censoring at t, so an
    event and a censoring on the same day order the event first.
    """
    return kaplan_meier(time, 1 - np.asarray(event, dtype=int))


def breslow_cumulative_hazard(time: np.ndarray, event: np.ndarray, log_hazard: np.ndarray) -> StepFunction:
    """Estimate the baseline cumulative hazard H0(t) of a proportional-hazards model (Breslow, 1972).

    ``H0(t) = sum over event times t_k <= t of d_k / sum_{j: T_j >= t_k} exp(log_hazard_j)``,
    with d_k events at t_k. A subject's survival is then
    ``S(t | x) = exp(-H0(t) * exp(log_hazard(x)))``.
    """
    time = np.asarray(time, dtype=float)
    order = np.argsort(time, kind="stable")
    sorted_time = time[order]
    relative_hazard = np.exp(np.asarray(log_hazard, dtype=float)[order])

    distinct, first_index = np.unique(sorted_time, return_index=True)
    risk_sum = np.cumsum(relative_hazard[::-1])[::-1][first_index]
    _, _, events = _event_counts(time, event)

    increments = np.where(events > 0, events / risk_sum, 0.0)
    keep = events > 0
    return StepFunction(times=distinct[keep], values=np.cumsum(increments)[keep], initial=0.0)


def survival_probability(
    cumulative_hazard: StepFunction, log_hazard: np.ndarray, times: np.ndarray | float
) -> np.ndarray:
    """Return S(t | x) for each subject (rows) and time (columns) under proportional hazards."""
    baseline = np.atleast_1d(cumulative_hazard.at(times))
    relative = np.exp(np.asarray(log_hazard, dtype=float))
    return np.exp(-np.outer(relative, baseline))
