"""Pydantic contracts of every message on every CRC-MedAI topic.

Each message carries ``schema_version`` and ``event_id``. Consumers use the
event id for idempotency and reject a schema version they do not know.
Messages are serialised as UTF-8 JSON; binary payloads (JPEG frames) are
base64 strings in JSON.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer


def utc_now() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(UTC)


class Message(BaseModel):
    """Fields every message carries."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Logical topic the message belongs to (without any test prefix).
    topic: ClassVar[str]

    schema_version: Literal[1] = 1
    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    source_ts: AwareDatetime = Field(
        default_factory=utc_now,
        description="When the source system produced the content of this message (UTC).",
    )

    def to_bytes(self) -> bytes:
        """Serialise the message as UTF-8 JSON for a Kafka record value."""
        return self.model_dump_json().encode("utf-8")

    @classmethod
    def from_bytes(cls, value: bytes | None):
        """Parse a Kafka record value; raises ``pydantic.ValidationError``."""
        if value is None:
            raise ValueError(f"{cls.__name__}: the record value is empty (a tombstone); expected JSON")
        return cls.model_validate_json(value)


def _decode_base64(value: object) -> object:
    """Decode standard base64 text (RFC 4648 section 4) from JSON; pass bytes through."""
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"image is not standard base64 text: {exc}") from exc
    return value


#: Bytes that travel as standard base64 text in JSON.
Base64Bytes = Annotated[
    bytes,
    BeforeValidator(_decode_base64),
    PlainSerializer(lambda value: base64.b64encode(value).decode("ascii"), return_type=str, when_used="json"),
]

ProcedureId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
PatientPseudonym = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]


class ModelRef(BaseModel):
    """Name and version of the model that produced a result."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str


class Frame(Message):
    """One JPEG-encoded video frame from a capture agent; key: procedure id."""

    topic: ClassVar[str] = "frames"

    procedure_id: ProcedureId
    patient_id: PatientPseudonym | None = Field(
        default=None,
        description="Pseudonym of the patient examined, from the capture agent's worklist; null when unknown.",
    )
    sequence: int = Field(ge=0, description="Frame number within the procedure, from 0.")
    captured_at: AwareDatetime = Field(description="Capture timestamp of the frame (UTC).")
    width: int = Field(gt=0, le=8192)
    height: int = Field(gt=0, le=8192)
    encoding: Literal["jpeg"] = "jpeg"
    image: Base64Bytes = Field(description="The encoded image; standard base64 in JSON.")


class PatientRecord(Message):
    """A patient record published by the integration engine; key: patient pseudonym."""

    topic: ClassVar[str] = "patient-records"

    patient_id: PatientPseudonym
    format: Literal["fhir-r4-bundle"] = "fhir-r4-bundle"
    source_name: str = Field(description="Where the record came from, for example the file name.")
    bundle: dict[str, Any] = Field(description="The FHIR R4 Bundle as JSON.")
    missing: dict[str, str] = Field(
        default_factory=dict,
        description="Model features the Bundle does not supply, each with the reason, for example "
        "{'nodes': 'no Observation with code LOINC 21893-3 ...'}.",
    )


class Region(BaseModel):
    """A box in frame pixel coordinates."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    x: int = Field(ge=0)
    y: int = Field(ge=0)
    width: int = Field(gt=0)
    height: int = Field(gt=0)


class DetectionResult(Message):
    """The detector's output for one frame; key: procedure id."""

    topic: ClassVar[str] = "detections"

    frame_event_id: uuid.UUID
    procedure_id: ProcedureId
    patient_id: PatientPseudonym | None = None
    sequence: int = Field(ge=0)
    captured_at: AwareDatetime
    polyp_probability: float = Field(ge=0.0, le=1.0)
    flagged: bool
    region: Region | None = Field(default=None, description="Bounding box of the segmented polyp, when flagged.")
    heatmap_key: str | None = Field(default=None, description="MinIO object key of the Grad-CAM overlay PNG.")
    heatmap_bucket: str | None = None
    explanation_method: str | None = Field(default=None, description="For example 'GradCAM on encoder stage 4'.")
    model: ModelRef
    inference_ms: float = Field(ge=0.0)
    skipped_reason: Literal["stale"] | None = Field(
        default=None,
        description="Why the model did not run on this frame ('stale': older than the latency budget); "
        "polyp_probability is then 0 and flagged false.",
    )


class PolypFinding(Message):
    """One polyp tracked across consecutive flagged frames; key: procedure id.

    A finding is published with status ``open`` once the tracker has confirmed
    the polyp and again with status ``closed`` once the polyp has left the view,
    so that downstream systems get one finding per polyp, not one per frame.
    An ``open`` event that goes out before the heatmap of its representative
    frame is ready is repeated, still ``open``, with the heatmap. Every event of
    a finding carries the same ``finding_id``; the latest one holds.
    """

    topic: ClassVar[str] = "findings"

    finding_id: uuid.UUID
    procedure_id: ProcedureId
    patient_id: PatientPseudonym | None = Field(
        default=None, description="The patient examined, when the frames named one."
    )
    status: Literal["open", "closed"]
    first_sequence: int = Field(ge=0)
    last_sequence: int = Field(ge=0)
    first_seen: AwareDatetime = Field(description="Capture timestamp of the first flagged frame.")
    last_seen: AwareDatetime = Field(description="Capture timestamp of the last flagged frame.")
    frames_flagged: int = Field(gt=0)
    peak_probability: float = Field(ge=0.0, le=1.0)
    representative_sequence: int = Field(ge=0, description="The frame with the peak probability.")
    region: Region | None = Field(default=None, description="Region of the polyp in the representative frame.")
    heatmap_key: str | None = Field(default=None, description="Grad-CAM overlay of the representative frame.")
    heatmap_bucket: str | None = None
    explanation_method: str | None = None
    model: ModelRef
    stale_frames_skipped: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Frames of the procedure that the detection worker skipped as stale (older than its latency budget, "
            "so never examined) up to this event; null when the producer did not count them."
        ),
    )


class FeatureContribution(BaseModel):
    """One SHAP contribution to the recurrence log-odds, in clinical words."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    feature: str = Field(description="Feature name as the model knows it, for example 'nodes'.")
    label: str = Field(description="Clinical meaning, for example 'Positive lymph nodes'.")
    value: float | str | None = Field(description="The patient's value; null when missing.")
    display_value: str = Field(description="The value with its unit or category, for display.")
    contribution: float = Field(description="SHAP value on the result's explanation_scale; positive raises the risk.")


class HorizonProbability(BaseModel):
    """Probability of recurrence within one horizon."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    horizon_years: float = Field(gt=0)
    probability: float = Field(ge=0.0, le=1.0)


class PrognosisResult(Message):
    """Recurrence risk for one patient record; key: patient pseudonym."""

    topic: ClassVar[str] = "prognoses"

    record_event_id: uuid.UUID
    patient_id: PatientPseudonym
    horizon_years: float = Field(gt=0)
    recurrence_probability: float = Field(ge=0.0, le=1.0)
    risk_group: Literal["low", "intermediate", "high"]
    base_value: float = Field(description="SHAP base value the contributions add to, on explanation_scale.")
    contributions: list[FeatureContribution] = Field(description="All contributions, largest magnitude first.")
    missing_features: list[str] = Field(default_factory=list, description="Features absent from the record.")
    missing_reasons: dict[str, str] = Field(
        default_factory=dict, description="Why each of missing_features is absent, by feature name."
    )
    model: ModelRef
    inference_ms: float = Field(ge=0.0)
    explanation_scale: Literal["log-odds", "log-hazard"] = Field(
        default="log-odds",
        description="Scale of base_value, contributions and model_output: log-odds (model 1.x) or log relative "
        "hazard (model 2.x, where exp(contribution) is the factor on the hazard against the average patient).",
    )
    model_output: float | None = Field(
        default=None, description="The model's raw output, equal to base_value plus the contributions."
    )
    probabilities: list[HorizonProbability] = Field(
        default_factory=list, description="Recurrence probability within each horizon, for example 3 and 5 years."
    )
    top_contributions: list[str] = Field(
        default_factory=list, description="The largest contributions in clinical words, largest first."
    )
    decision_path: list[str] = Field(
        default_factory=list,
        description="Steps of the surrogate-tree decision path in clinical words, then its conclusion.",
    )
    decision_path_fidelity_r2: float | None = Field(
        default=None, description="Cross-validated R^2 of the surrogate tree against the model."
    )


class FhirResourceEvent(Message):
    """A FHIR R4 resource produced from a result; key: the resource's logical id."""

    topic: ClassVar[str] = "fhir-resources"

    source_event_id: uuid.UUID = Field(description="Event id of the result this resource was built from.")
    resource_type: str
    resource_id: str
    resource: dict[str, Any]


#: Every message class, in data-flow order.
MESSAGE_TYPES: tuple[type[Message], ...] = (
    Frame,
    PatientRecord,
    DetectionResult,
    PolypFinding,
    PrognosisResult,
    FhirResourceEvent,
)
