"""The model registry: versions of the detection and prognosis models, their aliases, promotion and rollback.

Every version is an MLflow model version whose source is the ``model/``
folder of a run. That folder contains the weights (and sidecar), the model card
and ``evaluation.json``, the version's figures on the kind's held-out set.
Aliases: ``champion`` is the version the processors run, ``challenger`` the
latest registered candidate. The registered model's tag
``crc.champion.history`` lists the champions in order, which is what a
rollback walks back.

Promotion and rollback publish a :class:`ModelDeployment` on the ``models``
topic. They call ``asyncio.run``, so they must not run inside an event loop.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from crc_medai.lifecycle.errors import GateRejectedError, ModelVersionNotFoundError, RollbackError
from crc_medai.lifecycle.events import ModelDeployment, publish_deployment
from crc_medai.lifecycle.gate import GateDecision, decide
from crc_medai.lifecycle.kinds import (
    EVALUATION_NAME,
    MODEL_ARTIFACT_PATH,
    Evaluation,
    ModelKind,
    model_kind,
)
from crc_medai.lifecycle.tracking import DataIdentity, TrainingRun, create_client, record_training_run
from crc_medai.settings import Settings

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_CHAMPION_HISTORY = "crc.champion.history"
TAG_HOLDOUT = "crc.holdout.sha256"
TAG_GATE_DECISION = "crc.gate.decision"
TAG_GATE_CHAMPION = "crc.gate.champion"
TAG_GATE_REASON = "crc.gate.reason"


@dataclass(frozen=True)
class VersionInfo:
    """One registered version as the command lists it."""

    kind: str
    name: str
    version: str
    run_id: str
    source: str
    aliases: list[str]
    tags: dict[str, str]

    def to_dict(self) -> dict[str, object]:
        """Return the version as JSON-ready data."""
        return asdict(self)


@contextmanager
def registry_lock(settings: Settings) -> Iterator[None]:
    """Hold an exclusive file lock next to the SQLite store.

    Several processes (the demo's services, a test and its workers) may
    create the store or bootstrap a model at the same time. SQLite locks one
    write at a time, but MLflow's schema creation and a bootstrap are many
    writes that must not interleave.
    """
    path = settings.model_registry_db.with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ModelRegistry:
    """Registers, gates, promotes and rolls back model versions in the MLflow registry."""

    def __init__(self, settings: Settings, client: MlflowClient | None = None) -> None:
        self.settings = settings
        if client is None:
            with registry_lock(settings):
                client = create_client(settings)
                # The first query creates the SQLite schema, so it runs while holding the lock.
                client.search_registered_models(max_results=1)
        self.client = client

    # Registration ------------------------------------------------------------------------------------------------

    def register_file(self, kind_name: str, weights: Path, *, description: str = "") -> VersionInfo:
        """Evaluate a weights file, record it as a run with its card and report, and register it as challenger."""
        kind = model_kind(kind_name)
        weights = Path(weights)
        evaluation = self.evaluate_file(kind, weights)
        data = DataIdentity.of_files({"weights": weights.name}, kind.files(weights))
        with tempfile.TemporaryDirectory(prefix="crc-register-") as folder:
            run = TrainingRun(
                kind=kind.name,
                params={"source": "registered weights file", "weights_file": weights.name},
                data=data,
                metrics={f"holdout_{name}": value for name, value in evaluation.metrics.items()},
                artifacts={MODEL_ARTIFACT_PATH: self.version_files(kind, weights, evaluation, Path(folder))},
                run_name=f"register {weights.name}",
            )
            run_id = record_training_run(self.client, self.settings, run)
        return self.register_run(kind.name, run_id, evaluation, description=description)

    def evaluate_file(self, kind: ModelKind, weights: Path) -> Evaluation:
        """Load a weights file and evaluate it on the kind's held-out set."""
        evaluation = kind.evaluate(kind.load(weights), self.settings)
        logger.info(
            "model evaluated kind=%s weights=%s holdout=%s metrics=%s",
            kind.name,
            weights.name,
            evaluation.holdout.sha256[:12],
            json.dumps({name: round(value, 4) for name, value in evaluation.metrics.items()}),
        )
        return evaluation

    @staticmethod
    def version_files(kind: ModelKind, weights: Path, evaluation: Evaluation, folder: Path) -> list[Path]:
        """Return the files of one version: weights (and sidecar), model card and the evaluation report.

        NOTE: the card is the kind's card in the repository, which describes
        the shipped weights. A retrained version's own figures are in its
        evaluation report, not in the card.
        """
        report = folder / EVALUATION_NAME
        report.write_text(json.dumps(evaluation.to_dict(), indent=2) + "\n", encoding="utf-8")
        return [*kind.files(weights), kind.model_card, report]

    def register_run(
        self, kind_name: str, run_id: str, evaluation: Evaluation, *, description: str = ""
    ) -> VersionInfo:
        """Register the ``model/`` folder of a recorded run as a new version and point ``challenger`` at it."""
        kind = model_kind(kind_name)
        self._ensure_registered_model(kind)
        run = self.client.get_run(run_id)
        source = f"{run.info.artifact_uri}/{MODEL_ARTIFACT_PATH}"
        tags = {TAG_HOLDOUT: evaluation.holdout.sha256}
        tags.update({f"crc.metric.{name}": f"{value:.6g}" for name, value in evaluation.metrics.items()})
        created = self.client.create_model_version(
            kind.registered_name, source, run_id=run_id, tags=tags, description=description or None
        )
        self.client.set_registered_model_alias(kind.registered_name, CHALLENGER, created.version)
        logger.info(
            "model version registered model=%s version=%s run_id=%s source=%s",
            kind.registered_name,
            created.version,
            run_id,
            source,
        )
        return self.version(kind.name, str(created.version))

    def _ensure_registered_model(self, kind: ModelKind) -> None:
        try:
            self.client.get_registered_model(kind.registered_name)
        except MlflowException as error:
            if error.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                raise
            self.client.create_registered_model(
                kind.registered_name, tags={"crc.kind": kind.name}, description=f"CRC-MedAI {kind.name} model"
            )

    # Queries -----------------------------------------------------------------------------------------------------

    def versions(self, kind_name: str) -> list[VersionInfo]:
        """Return every version of the kind's registered model, oldest first."""
        kind = model_kind(kind_name)
        found = self.client.search_model_versions(f"name='{kind.registered_name}'")
        # NOTE: search results carry no aliases (MLflow 3.18), so each version is read again.
        infos = [self._info(kind, self.client.get_model_version(version.name, version.version)) for version in found]
        return sorted(infos, key=lambda info: int(info.version))

    def version(self, kind_name: str, version: str) -> VersionInfo:
        """Return one version.

        Raises:
            ModelVersionNotFoundError: the version does not exist.
        """
        kind = model_kind(kind_name)
        try:
            found = self.client.get_model_version(kind.registered_name, str(version))
        except MlflowException as error:
            raise ModelVersionNotFoundError(
                f"{kind.registered_name} version {version} not found in the registry at "
                f"{self.settings.model_registry_db}; list the versions with 'crc-medai models list {kind.name}'"
            ) from error
        return self._info(kind, found)

    def alias(self, kind_name: str, alias: str) -> VersionInfo | None:
        """Return the version ``alias`` names, or None when the alias is not set."""
        kind = model_kind(kind_name)
        try:
            found = self.client.get_model_version_by_alias(kind.registered_name, alias)
        except MlflowException:
            return None
        return self._info(kind, found)

    def champion_history(self, kind_name: str) -> list[str]:
        """Return the versions that were champion, oldest first; the last one is the champion now."""
        kind = model_kind(kind_name)
        try:
            model = self.client.get_registered_model(kind.registered_name)
        except MlflowException:
            return []
        return json.loads(model.tags.get(TAG_CHAMPION_HISTORY, "[]"))

    def evaluation(self, kind_name: str, version: str) -> Evaluation:
        """Read a version's stored evaluation report."""
        info = self.version(kind_name, version)
        with tempfile.TemporaryDirectory(prefix="crc-evaluation-") as folder:
            path = self.client.download_artifacts(info.run_id, f"{MODEL_ARTIFACT_PATH}/{EVALUATION_NAME}", folder)
            return Evaluation.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def download(self, kind_name: str, version: str) -> Path:
        """Download a version's files into ``model_cache_dir`` once and return its main weights file.

        The files land in a temporary folder first and move into place whole,
        so an interrupted download never leaves a half-filled version folder.
        """
        kind = model_kind(kind_name)
        info = self.version(kind.name, version)
        target = self.settings.model_cache_dir / kind.registered_name / info.version
        weights = target / kind.weights_name
        if weights.exists():
            return weights
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{info.version}-", dir=target.parent))
        try:
            downloaded = Path(self.client.download_artifacts(info.run_id, MODEL_ARTIFACT_PATH, str(staging)))
            if not (downloaded / kind.weights_name).exists():
                raise ModelVersionNotFoundError(
                    f"{kind.registered_name} version {info.version} has no {kind.weights_name} under {info.source}; "
                    "register the weights again"
                )
            try:
                downloaded.rename(target)
            except OSError:
                if not weights.exists():  # another process may have placed the same version meanwhile
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return weights

    def _info(self, kind: ModelKind, version: object) -> VersionInfo:
        return VersionInfo(
            kind=kind.name,
            name=kind.registered_name,
            version=str(version.version),
            run_id=version.run_id,
            source=version.source,
            aliases=sorted(version.aliases),
            tags=dict(version.tags),
        )

    # Gate, promotion, rollback -----------------------------------------------------------------------------------

    def gate(self, kind_name: str, version: str) -> GateDecision:
        """Compare a version with the champion on the same held-out set and record the decision on the version."""
        kind = model_kind(kind_name)
        candidate = self.version(kind.name, version)
        champion = self.alias(kind.name, CHAMPION)
        candidate_evaluation = self.evaluation(kind.name, candidate.version)
        champion_evaluation = self.evaluation(kind.name, champion.version) if champion else None
        if (
            champion_evaluation is not None
            and champion_evaluation.holdout.sha256 != candidate_evaluation.holdout.sha256
        ):
            logger.info("held-out sets differ, evaluating both again kind=%s candidate=%s", kind.name, version)
            candidate_evaluation = self.evaluate_file(kind, self.download(kind.name, candidate.version))
            champion_evaluation = self.evaluate_file(kind, self.download(kind.name, champion.version))

        decision = decide(
            kind,
            candidate.version,
            candidate_evaluation,
            champion.version if champion else None,
            champion_evaluation,
            self.settings.model_gate_tolerance,
        )
        self._record_decision(kind, candidate, decision)
        return decision

    def _record_decision(self, kind: ModelKind, candidate: VersionInfo, decision: GateDecision) -> None:
        champion = decision.champion_version or "none"
        self.client.log_dict(
            candidate.run_id, decision.to_dict(), f"gate/version-{candidate.version}-vs-{champion}.json"
        )
        tags = {
            TAG_GATE_DECISION: "pass" if decision.passed else "fail",
            TAG_GATE_CHAMPION: champion,
            TAG_GATE_REASON: decision.reason[:500],
        }
        for name, value in tags.items():
            self.client.set_model_version_tag(kind.registered_name, candidate.version, name, value)
        logger.info(
            "gate decided model=%s candidate=%s champion=%s passed=%s reason=%s",
            kind.registered_name,
            candidate.version,
            champion,
            decision.passed,
            decision.reason,
        )

    def promote(self, kind_name: str, version: str) -> tuple[GateDecision, ModelDeployment]:
        """Gate a version and, when it passes, make it the champion and publish the deployment.

        Raises:
            GateRejectedError: the version failed the gate; the champion is unchanged.
        """
        kind = model_kind(kind_name)
        decision = self.gate(kind.name, version)
        if not decision.passed:
            figures = "; ".join(
                f"{check.metric} {check.candidate:.4f} vs {check.champion:.4f} (drop {check.drop:+.4f})"
                for check in decision.checks
                if not check.passed
            )
            raise GateRejectedError(
                f"{kind.registered_name} version {version} not promoted: {decision.reason} ({figures}); "
                f"the tolerance is model_gate_tolerance={decision.tolerance:g}",
                decision,
            )
        event = self._move_champion(kind, decision.candidate_version, action="promote")
        return decision, event

    def rollback(self, kind_name: str) -> ModelDeployment:
        """Move ``champion`` back to the previous champion and publish the deployment.

        Raises:
            RollbackError: there is no earlier champion.
        """
        kind = model_kind(kind_name)
        history = self.champion_history(kind.name)
        if len(history) < 2:
            raise RollbackError(
                f"{kind.registered_name} has no earlier champion to roll back to (champion history {history}); "
                f"promote another version with 'crc-medai models promote {kind.name} VERSION'"
            )
        return self._move_champion(kind, history[-2], action="rollback")

    def bootstrap(self, kind_name: str) -> ModelDeployment | None:
        """Register the shipped weights as version 1 and champion when the registered model has no version.

        Returns the deployment, or None when the registry already had a version.
        """
        kind = model_kind(kind_name)
        with registry_lock(self.settings):
            if self.versions(kind.name):
                return None
            weights = kind.shipped_weights(self.settings)
            logger.info("registry empty, registering the shipped weights kind=%s weights=%s", kind.name, weights)
            info = self.register_file(kind.name, weights, description=f"shipped weights {weights.name}")
            self.gate(kind.name, info.version)
            return self._move_champion(kind, info.version, action="bootstrap")

    def _move_champion(self, kind: ModelKind, version: str, *, action: str) -> ModelDeployment:
        info = self.version(kind.name, version)
        previous = self.alias(kind.name, CHAMPION)
        history = self.champion_history(kind.name)
        history = history[:-1] if action == "rollback" else [*history, info.version]

        self.client.set_registered_model_alias(kind.registered_name, CHAMPION, info.version)
        self.client.set_registered_model_tag(kind.registered_name, TAG_CHAMPION_HISTORY, json.dumps(history))
        if CHALLENGER in info.aliases:
            self.client.delete_registered_model_alias(kind.registered_name, CHALLENGER)

        event = ModelDeployment(
            kind=kind.name,
            model_name=kind.registered_name,
            version=info.version,
            alias=CHAMPION,
            action=action,
            previous_version=previous.version if previous else None,
            artifact_uri=info.source,
        )
        asyncio.run(publish_deployment(self.settings, event))
        logger.info(
            "champion moved model=%s version=%s previous=%s action=%s",
            kind.registered_name,
            info.version,
            event.previous_version,
            action,
        )
        return event
