"""Root exception of CRC-MedAI and the errors shared by every service."""


class CrcMedAiError(Exception):
    """Root of every error CRC-MedAI raises on purpose."""


class SettingsError(CrcMedAiError):
    """A ``CRC_`` environment variable has an invalid value, so the command stops before it starts."""


class InvalidMessageError(CrcMedAiError):
    """A record value could not be parsed into its message contract.

    The record goes to the consumer's dead-letter topic; the partition goes on.
    """


class ProcessingError(CrcMedAiError):
    """A valid message could not be processed (bad image, unmappable record)."""
