"""Exceptions of the detection package; every one derives from ``DetectionError``."""

from __future__ import annotations

from crc_medai.errors import CrcMedAiError


class DetectionError(CrcMedAiError):
    """Root of every error the detection package raises."""


class InvalidFrameError(DetectionError, ValueError):
    """A frame is not a non-empty BGR ``uint8`` array of shape (height, width, 3)."""


class WeightsFileError(DetectionError):
    """A weights file is missing, unreadable or not in the expected format."""


class DatasetLayoutError(DetectionError):
    """A data set folder does not follow a known image/mask layout."""


class ParameterError(DetectionError, ValueError):
    """A parameter of the generator, the network or the training is out of range."""


class VideoWriteError(DetectionError):
    """OpenCV could not open or write a video file."""


class BenchmarkError(DetectionError):
    """A benchmark run measured something other than it reports, so its figures are not written."""
