"""Errors of the model lifecycle package; each names the value, the rule and the fix."""

from __future__ import annotations

from crc_medai.errors import CrcMedAiError


class ModelLifecycleError(CrcMedAiError):
    """Root of the errors raised by :mod:`crc_medai.lifecycle`."""


class UnknownModelKindError(ModelLifecycleError):
    """A model kind other than ``detection`` or ``prognosis`` was requested."""


class ModelVersionNotFoundError(ModelLifecycleError):
    """A registered model, version or alias does not exist in the registry."""


class GateRejectedError(ModelLifecycleError):
    """A candidate fell below the champion beyond the tolerance, or could not be compared; it stays unpromoted."""

    def __init__(self, message: str, decision: object | None = None) -> None:
        super().__init__(message)
        #: The :class:`~crc_medai.lifecycle.gate.GateDecision` with every figure, when the gate ran.
        self.decision = decision


class RollbackError(ModelLifecycleError):
    """The champion alias has no earlier version to move back to."""


class ModelLoadError(ModelLifecycleError):
    """A registered version could not be downloaded or loaded."""
