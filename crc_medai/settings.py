"""Runtime settings shared by every CRC-MedAI service.

All options are read once at start-up from environment variables with the
``CRC_`` prefix: the variable for a field is ``CRC_`` plus the field name in
upper case, for example ``CRC_KAFKA_BOOTSTRAP_SERVERS``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Connection, topic and model settings, one env var per field."""

    model_config = SettingsConfigDict(env_prefix="CRC_", frozen=True, extra="ignore")

    # Kafka
    kafka_bootstrap_servers: str = "127.0.0.1:19092"
    topic_prefix: str = Field(
        default="",
        description="Prepended to every topic and consumer group name; tests use it to isolate runs.",
    )
    topic_partitions: int = 3

    # MinIO (S3)
    minio_endpoint: str = "127.0.0.1:19000"
    minio_access_key: str = "crcmedai"
    minio_secret_key: SecretStr = SecretStr("crcmedai-local-secret")
    minio_secure: bool = False
    heatmap_bucket: str = "crc-heatmaps"

    # Redis
    redis_url: str = "redis://127.0.0.1:16379/0"

    # Models
    detection_model_path: Path = REPO_ROOT / "processors" / "detection" / "weights" / "polyp_unet.pt"
    prognosis_model_path: Path = REPO_ROOT / "processors" / "prognosis" / "weights" / "recurrence_survival_catboost.cbm"
    detection_threshold: float = Field(default=0.5, ge=0.0, le=1.0)

    # Monitoring
    metrics_port: int = Field(
        default=0, ge=0, le=65535, description="Port of /metrics, /healthz and /readyz; 0 turns the server off."
    )
    metrics_host: str = "127.0.0.1"

    # Output of the FHIR consumer for people to read
    output_dir: Path = REPO_ROOT / "out"

    def topic(self, name: str) -> str:
        """Return the full topic name for a logical topic such as ``frames``."""
        return f"{self.topic_prefix}{name}"

    def group(self, name: str) -> str:
        """Return the full consumer group id for a service."""
        return f"{self.topic_prefix}{name}"

    def public_dump(self) -> dict[str, object]:
        """Return the settings for a start-up log line, secrets masked."""
        return {key: str(value) for key, value in self.model_dump().items()}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Read the settings from the environment once per process."""
    return Settings()
