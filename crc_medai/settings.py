"""Runtime settings shared by every CRC-MedAI service.

All options are read once at start-up from environment variables with the
``CRC_`` prefix: the variable for a field is ``CRC_`` plus the field name in
upper case, for example ``CRC_KAFKA_BOOTSTRAP_SERVERS``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from crc_medai.errors import SettingsError

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
    kafka_max_message_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=1024 * 1024,
        description="Maximum Kafka record size (bytes), used as the producers' max_request_size. "
        "The broker's message.max.bytes must be at least this.",
    )

    # MinIO (S3)
    minio_endpoint: str = "127.0.0.1:19000"
    minio_access_key: str = "crcmedai"
    minio_secret_key: SecretStr = SecretStr("crcmedai-local-secret")
    minio_secure: bool = False
    heatmap_bucket: str = "crc-heatmaps"

    # Redis
    redis_url: str = "redis://127.0.0.1:16379/0"
    redis_key_prefix: str = Field(
        default="crc-medai:",
        description="Prepended, with the topic prefix, to every Redis key the services write.",
    )

    # FHIR delivery to the hospital's FHIR server (crc-medai fhir-delivery)
    fhir_server_url: str = Field(
        default="", description="Base URL of the FHIR R4 server results are delivered to; empty turns delivery off."
    )
    fhir_server_token: SecretStr = Field(
        default=SecretStr(""), description="Bearer token sent to the FHIR server; empty sends no Authorization header."
    )
    fhir_delivery_attempts: int = Field(
        default=5, ge=1, description="Attempts per transaction Bundle before its records are dead-lettered."
    )
    fhir_delivery_backoff_s: float = Field(
        default=0.5, gt=0, description="Wait before the first retry (seconds); it doubles after each failure."
    )
    fhir_delivery_backoff_max_s: float = Field(
        default=30.0, gt=0, description="Maximum wait between retries (seconds)."
    )
    fhir_delivery_timeout_s: float = Field(default=10.0, gt=0, description="HTTP timeout of one request (seconds).")
    fhir_delivery_batch_size: int = Field(
        default=50, ge=1, le=1000, description="Maximum number of resources in one transaction Bundle."
    )
    fhir_delivery_batch_wait_s: float = Field(
        default=0.5, gt=0, description="How long a batch waits for more resources before it is sent (seconds)."
    )

    # FHIR read API (crc-medai fhir-api)
    fhir_api_tokens: SecretStr = Field(
        default=SecretStr(""),
        description="JSON object mapping each bearer token to its space-separated SMART scopes, for example "
        '{"token-1": "system/Observation.read"}; empty rejects every request except /metadata.',
    )

    # Models
    detection_model_path: Path = REPO_ROOT / "processors" / "detection" / "weights" / "polyp_unet.pt"
    prognosis_model_path: Path = REPO_ROOT / "processors" / "prognosis" / "weights" / "recurrence_survival_catboost.cbm"
    detection_threshold: float = Field(
        default=0.65, ge=0.0, le=1.0, description="Presence probability at which the detector flags a frame."
    )

    # Model lifecycle: MLflow tracking and registry (crc-medai models)
    model_registry_db: Path = Field(
        default=REPO_ROOT / "out" / "model-registry" / "mlflow.db",
        description="SQLite file of the MLflow tracking and model registry store; created on first use.",
    )
    model_artifact_bucket: str = Field(
        default="crc-models", description="MinIO bucket of MLflow run artifacts (weights, model cards, reports)."
    )
    model_cache_dir: Path = Field(
        default=REPO_ROOT / "out" / "model-cache",
        description="Folder where services download registered model versions before loading them.",
    )
    model_gate_tolerance: float = Field(
        default=0.02,
        ge=0.0,
        description="Maximum drop a candidate may show against the champion on any gated metric (absolute).",
    )
    model_gate_detection_frames: int = Field(
        default=200, ge=2, description="Generated held-out frames the detection gate evaluates, half with a polyp."
    )
    model_gate_detection_seed: int = Field(
        default=1000, description="Generator seed of the detection held-out frames; keep it apart from training."
    )
    model_gate_prognosis_holdout_share: float = Field(
        default=0.2, gt=0.0, lt=1.0, description="Share of trial patients held out for the prognosis gate."
    )
    model_gate_prognosis_seed: int = Field(default=0, description="Seed of the stratified held-out patient split.")
    model_registry_enabled: bool = Field(
        default=True,
        description="Load models from the registry's champion alias and follow the models topic; "
        "false loads the weights files of detection_model_path and prognosis_model_path.",
    )

    # Detection processor, real-time behaviour
    detection_device: str = Field(
        default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="Torch device; auto picks CUDA when present."
    )
    detection_torch_threads: int = Field(
        default=0, ge=0, description="CPU threads of the model; 0 uses half the cores the process may run on."
    )
    detection_batch_size: int = Field(default=8, ge=1, le=256, description="Maximum frames in one model forward pass.")
    detection_batch_wait_ms: float = Field(
        default=1.0, gt=0, description="How long a batch waits for more frames before it runs (milliseconds)."
    )
    detection_latency_budget_ms: float = Field(
        default=500.0,
        ge=0,
        description="Frames older than this since capture are skipped as stale (milliseconds); 0 turns skipping off, "
        "for example to replay a recorded video faster than real time.",
    )
    detection_heatmaps_per_s: float = Field(
        default=2.0,
        ge=0,
        description="Maximum Grad-CAM heatmaps per second per procedure for flagged frames of findings; "
        "a new finding's heatmap counts, later representative frames do not.",
    )
    detection_track_max_gap_s: float = Field(
        default=1.0, gt=0, description="Capture-time gap without a flagged frame that one finding tolerates (s)."
    )
    detection_track_min_frames: int = Field(
        default=3, ge=1, description="Flagged frames a track needs within the confirm window to open a finding."
    )
    detection_track_confirm_window_s: float = Field(
        default=0.2, gt=0, description="Capture-time window in which a track must reach its minimum frames (s)."
    )
    detection_track_idle_close_s: float = Field(
        default=2.0,
        gt=0,
        description="Wall-clock time without a new flagged frame after which a finding closes (s), because a "
        "stream that ends sends no frame to close it. It must be at least detection_track_max_gap_s. Keep a "
        "margin above it for the time frames wait before the worker gets to them.",
    )

    # HL7 v2 MLLP listener (crc-medai hl7-listener)
    hl7_listener_host: str = Field(default="127.0.0.1", description="Address the MLLP listener binds to.")
    hl7_listener_port: int = Field(
        default=2575, ge=0, le=65535, description="TCP port of the MLLP listener (2575 is the registered HL7 port)."
    )
    hl7_max_message_bytes: int = Field(
        default=512 * 1024,
        gt=0,
        description="Maximum HL7 message size one MLLP frame may carry (bytes). Keep it well under the broker's "
        "message.max.bytes (about 1 MiB by Kafka's default, 8 MiB in the local stack), because each message "
        "becomes a Kafka record.",
    )

    # Monitoring
    metrics_port: int = Field(
        default=0, ge=0, le=65535, description="Port of /metrics, /healthz and /readyz; 0 turns the server off."
    )
    metrics_host: str = "127.0.0.1"

    # Output of the FHIR consumer for people to read
    output_dir: Path = REPO_ROOT / "out"
    model_card_base_url: str = Field(
        default="https://crc-medai.example/",
        description="Base URL where the repository's model cards are published; Device resources link the card's "
        "repository path under it.",
    )

    @model_validator(mode="after")
    def _check_track_times(self) -> Settings:
        """Reject a wall-clock close shorter than the capture-time gap that a finding tolerates."""
        if self.detection_track_idle_close_s < self.detection_track_max_gap_s:
            raise ValueError(
                f"detection_track_idle_close_s={self.detection_track_idle_close_s} is invalid because it is shorter "
                f"than detection_track_max_gap_s={self.detection_track_max_gap_s}, so a finding would close during a "
                f"gap that the tracker tolerates. Set CRC_DETECTION_TRACK_IDLE_CLOSE_S to at least "
                f"{self.detection_track_max_gap_s:g} or lower CRC_DETECTION_TRACK_MAX_GAP_S."
            )
        return self

    def topic(self, name: str) -> str:
        """Return the full topic name for a logical topic such as ``frames``."""
        return f"{self.topic_prefix}{name}"

    def redis_key(self, name: str) -> str:
        """Return the full Redis key for a logical key such as ``fhir-view:``."""
        return f"{self.redis_key_prefix}{self.topic_prefix}{name}"

    def group(self, name: str) -> str:
        """Return the full consumer group id for a service."""
        return f"{self.topic_prefix}{name}"

    def public_dump(self) -> dict[str, object]:
        """Return the settings for a start-up log line, secrets masked."""
        return {key: str(value) for key, value in self.model_dump().items()}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Read the settings from the environment once per process.

    Raises:
        SettingsError: A ``CRC_`` variable has an invalid value. The message names each one.
    """
    try:
        return Settings()
    except ValidationError as error:
        raise SettingsError(describe_invalid_settings(error)) from None


def describe_invalid_settings(error: ValidationError) -> str:
    """Return one line per invalid setting, named by its environment variable, with the value unless it is a secret."""
    lines = ["invalid settings in the environment. Fix these variables and start again:"]
    for item in error.errors(include_url=False):
        message = item["msg"].removeprefix("Value error, ")
        if not item["loc"]:
            lines.append(f"  {message}")
            continue
        field = str(item["loc"][0])
        field_info = Settings.model_fields.get(field)
        secret = field_info is not None and field_info.annotation is SecretStr
        value_text = "" if secret else f"={item['input']!r}"
        lines.append(f"  CRC_{field.upper()}{value_text}: {message}")
    return "\n".join(lines)
