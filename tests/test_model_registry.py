"""Model registry: tracked runs, versions, the evaluation gate, promotion events and rollback.

The gate unit tests need no service. The others use the real stack: the
MLflow store is a SQLite file in the test's folder, run artifacts go to a
MinIO bucket of the test's own, and deployment events to its own topics.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from crc_medai.kafka import collect_records
from crc_medai.lifecycle.errors import GateRejectedError, RollbackError, UnknownModelKindError
from crc_medai.lifecycle.events import MODELS_TOPIC, ModelDeployment
from crc_medai.lifecycle.gate import decide
from crc_medai.lifecycle.kinds import KINDS, Evaluation, model_kind
from crc_medai.lifecycle.registry import CHALLENGER, CHAMPION, ModelRegistry
from crc_medai.lifecycle.tracking import TAG_CODE_COMMIT, TAG_CODE_DIRTY, TAG_DATA_SHA256, DataIdentity
from crc_medai.lifecycle.training import train_detection, train_prognosis
from crc_medai.services import settings_env
from crc_medai.settings import Settings
from crc_medai.storage import create_minio
from tests.conftest import isolated_settings

PROGNOSIS = KINDS["prognosis"]
HOLDOUT = DataIdentity.of_config({"held-out": "set A"})
CHAMPION_FIGURES = {
    "c_index": 0.66,
    "auc_3y": 0.70,
    "auc_5y": 0.69,
    "ibs": 0.20,
    "calibration_error_3y": 0.05,
    "calibration_error_5y": 0.06,
}


def lifecycle_settings(stack: Settings, folder: Path) -> Settings:
    """Return isolated settings with a registry store, artifact bucket and cache of their own."""
    settings = isolated_settings(stack, folder / "out")
    return settings.model_copy(
        update={
            "model_registry_db": folder / "registry" / "mlflow.db",
            "model_artifact_bucket": f"models-{settings.heatmap_bucket}",
            "model_cache_dir": folder / "model-cache",
            "model_gate_detection_frames": 16,
        }
    )


@pytest.fixture
def registry(stack: Settings, tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(lifecycle_settings(stack, tmp_path))


def read_events(settings: Settings, count: int) -> list[ModelDeployment]:
    records = asyncio.run(
        collect_records(settings, [MODELS_TOPIC], until=lambda received: len(received) >= count, timeout_s=60)
    )
    return [ModelDeployment.from_bytes(record.value) for record in records]


def artifact_names(registry: ModelRegistry, run_id: str, folder: str) -> list[str]:
    return sorted(Path(item.path).name for item in registry.client.list_artifacts(run_id, folder))


# Gate decisions, no service needed ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metric", "candidate_value", "passed"),
    [
        ("c_index", 0.645, True),  # higher is better, drop 0.015 within 0.02
        ("c_index", 0.635, False),  # drop 0.025
        ("c_index", 0.70, True),  # better
        ("ibs", 0.215, True),  # lower is better, rise 0.015 within 0.02
        ("ibs", 0.225, False),  # rise 0.025
        ("calibration_error_5y", 0.01, True),  # better
        ("calibration_error_5y", 0.09, False),
    ],
)
def test_gate_compares_each_metric_in_its_direction(metric: str, candidate_value: float, passed: bool) -> None:
    champion = Evaluation(metrics=dict(CHAMPION_FIGURES), holdout=HOLDOUT)
    candidate = Evaluation(metrics={**CHAMPION_FIGURES, metric: candidate_value}, holdout=HOLDOUT)

    decision = decide(PROGNOSIS, "2", candidate, "1", champion, tolerance=0.02)

    assert decision.passed is passed
    assert decision.failed_metrics() == ([] if passed else [metric])
    assert [check.metric for check in decision.checks] == [rule.name for rule in PROGNOSIS.metrics]


def test_gate_without_champion_passes() -> None:
    candidate = Evaluation(metrics=dict(CHAMPION_FIGURES), holdout=HOLDOUT)

    decision = decide(PROGNOSIS, "1", candidate, None, None, tolerance=0.02)

    assert decision.passed
    assert decision.reason == "no champion yet"


def test_gate_rejects_different_holdout_sets() -> None:
    champion = Evaluation(metrics=dict(CHAMPION_FIGURES), holdout=HOLDOUT)
    candidate = Evaluation(metrics=dict(CHAMPION_FIGURES), holdout=DataIdentity.of_config({"held-out": "set B"}))

    with pytest.raises(GateRejectedError, match="re-evaluate both"):
        decide(PROGNOSIS, "2", candidate, "1", champion, tolerance=0.02)


def test_gate_rejects_missing_metric() -> None:
    champion = Evaluation(metrics=dict(CHAMPION_FIGURES), holdout=HOLDOUT)
    figures = {name: value for name, value in CHAMPION_FIGURES.items() if name != "auc_5y"}
    candidate = Evaluation(metrics=figures, holdout=HOLDOUT)

    with pytest.raises(GateRejectedError, match="'auc_5y' is missing from the candidate"):
        decide(PROGNOSIS, "2", candidate, "1", champion, tolerance=0.02)


def test_unknown_kind_names_the_valid_ones() -> None:
    with pytest.raises(
        UnknownModelKindError, match=r"model kind 'radiology' is unknown; use one of \['detection', 'prognosis'\]"
    ):
        model_kind("radiology")


# Registry on the real stack ----------------------------------------------------------------------------------------


@pytest.mark.integration
def test_bootstrap_registers_shipped_weights(registry: ModelRegistry) -> None:
    event = registry.bootstrap("prognosis")

    versions = registry.versions("prognosis")
    assert [info.version for info in versions] == ["1"]
    assert versions[0].aliases == [CHAMPION]
    assert event is not None
    assert (event.action, event.version, event.previous_version) == ("bootstrap", "1", None)
    assert event.artifact_uri.startswith(f"s3://{registry.settings.model_artifact_bucket}/prognosis/")
    assert artifact_names(registry, versions[0].run_id, "model") == [
        "MODEL_CARD.md",
        "evaluation.json",
        "recurrence_survival_catboost.cbm",
        "recurrence_survival_catboost.json",
    ]
    assert registry.champion_history("prognosis") == ["1"]
    assert registry.bootstrap("prognosis") is None


@pytest.mark.integration
def test_training_run_records_identity(registry: ModelRegistry, tmp_path: Path) -> None:
    registry.bootstrap("prognosis")

    info = train_prognosis(registry, tmp_path / "candidate", seed=1)

    run = registry.client.get_run(info.run_id)
    assert info.version == "2"
    assert info.aliases == [CHALLENGER]
    assert run.data.params["seed"] == "1"
    assert len(run.data.tags[TAG_DATA_SHA256]) == 64
    assert run.data.tags[TAG_CODE_COMMIT] != ""
    assert run.data.tags[TAG_CODE_DIRTY] in {"true", "false"}
    assert 0.5 < run.data.metrics["holdout_c_index"] < 0.8
    assert "train_c_index" in run.data.metrics
    identity = json.loads(
        Path(registry.client.download_artifacts(info.run_id, "data/identity.json", str(tmp_path))).read_text()
    )
    assert identity["sha256"] == run.data.tags[TAG_DATA_SHA256]
    assert identity["files"] == ["colon.pkl.compress"]

    bucket = registry.settings.model_artifact_bucket
    objects = [item.object_name for item in create_minio(registry.settings).list_objects(bucket, recursive=True)]
    assert f"prognosis/{info.run_id}/artifacts/model/recurrence_survival_catboost.cbm" in objects
    assert f"prognosis/{info.run_id}/artifacts/model/evaluation.json" in objects


@pytest.mark.integration
def test_gate_passes_retrained_model(registry: ModelRegistry, tmp_path: Path) -> None:
    registry.bootstrap("prognosis")
    candidate = train_prognosis(registry, tmp_path / "candidate", seed=1)

    decision = registry.gate("prognosis", candidate.version)

    assert decision.passed, decision.reason
    assert decision.champion_version == "1"
    assert len(decision.checks) == len(PROGNOSIS.metrics)
    tags = registry.version("prognosis", candidate.version).tags
    assert tags["crc.gate.decision"] == "pass"
    assert tags["crc.gate.champion"] == "1"
    assert artifact_names(registry, candidate.run_id, "gate") == ["version-2-vs-1.json"]


@pytest.mark.integration
def test_gate_rejects_undertrained_detector(registry: ModelRegistry, tmp_path: Path) -> None:
    from processors.detection.train import TrainingConfig

    registry.bootstrap("detection")
    config = TrainingConfig(seed=3, steps=2, batch_size=4, pool_size=8, frame_size=128)
    candidate = train_detection(registry, tmp_path / "candidate", config)

    with pytest.raises(GateRejectedError, match="polyp-unet version 2 not promoted") as rejected:
        registry.promote("detection", candidate.version)

    decision = rejected.value.decision
    assert decision is not None
    assert not decision.passed
    assert "sensitivity" in decision.failed_metrics()
    assert registry.alias("detection", CHAMPION).version == "1"
    assert registry.version("detection", candidate.version).tags["crc.gate.decision"] == "fail"


@pytest.mark.integration
def test_promote_publishes_event(registry: ModelRegistry, tmp_path: Path) -> None:
    registry.bootstrap("prognosis")
    candidate = train_prognosis(registry, tmp_path / "candidate", seed=1)

    decision, event = registry.promote("prognosis", candidate.version)

    assert decision.passed
    assert registry.alias("prognosis", CHAMPION).version == "2"
    assert registry.alias("prognosis", CHALLENGER) is None
    events = read_events(registry.settings, 2)
    assert [(item.action, item.version, item.previous_version) for item in events] == [
        ("bootstrap", "1", None),
        ("promote", "2", "1"),
    ]
    assert events[1] == event
    assert events[1].model_name == "crc-recurrence-survival-catboost"
    assert events[1].alias == CHAMPION
    assert events[1].artifact_uri == candidate.source


@pytest.mark.integration
def test_rollback_moves_alias_back(registry: ModelRegistry, tmp_path: Path) -> None:
    registry.bootstrap("prognosis")
    candidate = train_prognosis(registry, tmp_path / "candidate", seed=1)
    registry.promote("prognosis", candidate.version)

    event = registry.rollback("prognosis")

    assert (event.action, event.version, event.previous_version) == ("rollback", "1", "2")
    assert registry.alias("prognosis", CHAMPION).version == "1"
    assert registry.champion_history("prognosis") == ["1"]
    assert [item.action for item in read_events(registry.settings, 3)] == ["bootstrap", "promote", "rollback"]
    with pytest.raises(RollbackError, match="no earlier champion"):
        registry.rollback("prognosis")


@pytest.mark.integration
def test_models_command_lists_and_gates(registry: ModelRegistry, tmp_path: Path) -> None:
    registry.bootstrap("prognosis")
    train_prognosis(registry, tmp_path / "candidate", seed=1)
    env = {"PATH": "/usr/bin:/bin", **settings_env(registry.settings)}

    def models(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "crc_medai.cli", "models", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    listed = models("list", "prognosis")
    gated = models("gate", "prognosis", "2")
    missing = models("gate", "prognosis", "9")

    assert listed.returncode == 0, listed.stderr
    versions = json.loads(listed.stdout)[0]["versions"]
    assert [(item["version"], item["aliases"]) for item in versions] == [("1", [CHAMPION]), ("2", [CHALLENGER])]
    assert gated.returncode == 0, gated.stderr
    assert json.loads(gated.stdout)["passed"] is True
    assert missing.returncode == 2
    assert "crc-recurrence-survival-catboost version 9 not found" in missing.stderr


def test_deployment_event_rejects_unknown_action() -> None:
    with pytest.raises(ValueError, match="action"):
        ModelDeployment(
            kind="prognosis", model_name="m", version="2", alias=CHAMPION, action="delete", artifact_uri="s3://b/k"
        )


def test_deployment_event_round_trips() -> None:
    event = ModelDeployment(
        kind="detection",
        model_name="polyp-unet",
        version="3",
        alias=CHAMPION,
        action="promote",
        artifact_uri="s3://b/k",
    )

    assert ModelDeployment.from_bytes(event.to_bytes()) == event
