"""MLflow tracking: a SQLite store for runs and the registry, run artifacts in the stack's MinIO.

Each model kind has one experiment, ``crc-medai/<kind>``, whose artifacts live
under ``s3://<model_artifact_bucket>/<kind>/``. A training run records its
parameters, the identity of its data (a SHA-256 content hash), the code
version (git commit and dirty flag), its metrics and its artifacts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient

from crc_medai.settings import REPO_ROOT, Settings
from crc_medai.storage import create_minio, ensure_bucket

logger = logging.getLogger(__name__)

#: Tag names shared by runs and model versions.
TAG_KIND = "crc.kind"
TAG_DATA_SHA256 = "crc.data.sha256"
TAG_CODE_COMMIT = "crc.code.commit"
TAG_CODE_DIRTY = "crc.code.dirty"


@dataclass(frozen=True)
class CodeVersion:
    """Git commit of the working tree and whether it had uncommitted changes."""

    commit: str
    dirty: bool

    @classmethod
    def of_repository(cls, root: Path = REPO_ROOT) -> CodeVersion:
        """Read the commit with ``git``; 'unknown' (and dirty) when git or the repository is absent."""
        try:
            commit = _git(root, "rev-parse", "HEAD")
            status = _git(root, "status", "--porcelain", "--untracked-files=no")
        except (OSError, subprocess.CalledProcessError) as error:
            logger.warning("code version unknown root=%s error=%s", root, error)
            return cls(commit="unknown", dirty=True)
        return cls(commit=commit, dirty=bool(status))


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout.strip()


@dataclass(frozen=True)
class DataIdentity:
    """Identity of the data a model was trained or evaluated on: a description and the SHA-256 of its content."""

    description: dict[str, object]
    sha256: str

    @classmethod
    def of_config(cls, description: Mapping[str, object]) -> DataIdentity:
        """Hash a description that fully determines the data, such as a generator seed and its settings."""
        canonical = json.dumps(description, sort_keys=True, default=str).encode("utf-8")
        return cls(description=dict(description), sha256=hashlib.sha256(canonical).hexdigest())

    @classmethod
    def of_files(cls, description: Mapping[str, object], files: list[Path]) -> DataIdentity:
        """Hash the bytes of ``files`` (in the given order) together with the description."""
        digest = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode("utf-8"))
        for path in files:
            digest.update(path.read_bytes())
        return cls(description={**description, "files": [path.name for path in files]}, sha256=digest.hexdigest())


def configure_artifact_store(settings: Settings) -> None:
    """Point MLflow's S3 artifact client (boto3) at the stack's MinIO.

    NOTE: MLflow reads the S3 endpoint and the keys only from environment
    variables, so this sets them for the whole process.
    """
    scheme = "https" if settings.minio_secure else "http"
    os.environ["MLFLOW_S3_ENDPOINT_URL"] = f"{scheme}://{settings.minio_endpoint}"
    os.environ["AWS_ACCESS_KEY_ID"] = settings.minio_access_key
    os.environ["AWS_SECRET_ACCESS_KEY"] = settings.minio_secret_key.get_secret_value()
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    # Services log to files, where MLflow's tqdm progress bars are noise.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def tracking_uri(settings: Settings) -> str:
    """Return the SQLAlchemy URI of the SQLite store at ``settings.model_registry_db``."""
    return f"sqlite:///{settings.model_registry_db.resolve()}"


def create_client(settings: Settings) -> MlflowClient:
    """Return an MLflow client on the SQLite store, with the artifact bucket created in MinIO."""
    settings.model_registry_db.parent.mkdir(parents=True, exist_ok=True)
    configure_artifact_store(settings)
    ensure_bucket(create_minio(settings), settings.model_artifact_bucket)
    uri = tracking_uri(settings)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client: MlflowClient, settings: Settings, kind: str) -> str:
    """Return the id of the experiment of ``kind``, creating it with its artifact location in MinIO."""
    name = f"crc-medai/{kind}"
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = f"s3://{settings.model_artifact_bucket}/{kind}"
    logger.info("creating experiment name=%s artifact_location=%s", name, location)
    return client.create_experiment(name, artifact_location=location)


@dataclass(frozen=True)
class TrainingRun:
    """Everything one training run records."""

    kind: str
    params: Mapping[str, object]
    data: DataIdentity
    metrics: Mapping[str, float]
    #: Artifact folder in the run (for example ``model``) -> local files stored there.
    artifacts: Mapping[str, list[Path]]
    run_name: str | None = None


def record_training_run(client: MlflowClient, settings: Settings, run: TrainingRun) -> str:
    """Record a finished training run in the ``crc-medai/<kind>`` experiment and return its run id."""
    code = CodeVersion.of_repository()
    tags = {
        TAG_KIND: run.kind,
        TAG_DATA_SHA256: run.data.sha256,
        TAG_CODE_COMMIT: code.commit,
        TAG_CODE_DIRTY: str(code.dirty).lower(),
    }
    created = client.create_run(experiment_id(client, settings, run.kind), run_name=run.run_name, tags=tags)
    run_id = created.info.run_id
    try:
        for name, value in run.params.items():
            client.log_param(run_id, name, value)
        for name, value in run.metrics.items():
            client.log_metric(run_id, name, float(value))
        client.log_dict(run_id, {"sha256": run.data.sha256, **run.data.description}, "data/identity.json")
        for folder, files in run.artifacts.items():
            for path in files:
                client.log_artifact(run_id, str(path), folder)
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    logger.info(
        "training run recorded kind=%s run_id=%s data_sha256=%s commit=%s dirty=%s",
        run.kind,
        run_id,
        run.data.sha256[:12],
        code.commit[:12],
        code.dirty,
    )
    return run_id
