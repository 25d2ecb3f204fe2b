"""Polyp detector: a U-Net (Ronneberger et al., 2015) with a frame-level presence head.

The network is ``segmentation_models_pytorch.Unet`` with a light encoder
(timm MobileNetV3-Small by default) and smp's auxiliary classification head
on the deepest encoder features. It returns a polyp mask logit per pixel and
one presence logit per frame. ``PolypDetector`` owns the preprocessing
(resize, BGR to RGB, ImageNet normalisation), so every caller feeds OpenCV
BGR frames of any size and gets masks back at that size.

A weights file is a ``torch.save`` of a dict of plain types and tensors
(``WEIGHTS_FORMAT``), readable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import segmentation_models_pytorch as smp
import torch

from processors.detection.errors import InvalidFrameError, ParameterError, WeightsFileError

logger = logging.getLogger(__name__)

WEIGHTS_FORMAT = "crc-medai/polyp-unet"
WEIGHTS_FORMAT_VERSION = 1
DEFAULT_ENCODER = "tu-mobilenetv3_small_100"
DEFAULT_DECODER_CHANNELS = (48, 32, 16, 8, 8)
DEFAULT_INPUT_SIZE = 128
#: Channel means and standard deviations of ImageNet (RGB, [0, 1] scale), so
#: that encoder weights pretrained on ImageNet see the inputs they expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Pixels whose mask probability is at least this value belong to the mask.
MASK_THRESHOLD = 0.5
#: Exceptions of ``torch.load(weights_only=True)`` on a file that is not a torch
#: file. Its unpickler raises KeyError on an unknown opcode, for example.
TORCH_LOAD_ERRORS = (OSError, RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError)
MAX_FRAME_SIDE = 8192


@dataclass(frozen=True)
class Prediction:
    """Detector output for one frame."""

    probability: float
    """Probability that the frame shows a polyp, from the presence head."""
    mask: np.ndarray
    """bool (height, width) at the original frame size, True on predicted polyp pixels."""
    region: tuple[int, int, int, int] | None
    """(x, y, width, height) of the largest connected part of the mask, in frame pixels; None if the mask is empty."""


@dataclass(frozen=True)
class NetworkConfig:
    """Architecture of the U-Net; stored in the weights file."""

    encoder: str = DEFAULT_ENCODER
    decoder_channels: tuple[int, ...] = DEFAULT_DECODER_CHANNELS
    input_size: int = DEFAULT_INPUT_SIZE
    presence_pooling: str = "avg"
    """Pooling of the deepest features before the presence head: "avg" or "max".

    In short training runs on generated frames the presence loss fell more
    slowly with "max" than with "avg", and rose above chance level at
    learning rate 3e-3, so "avg" is the default."""


def check_input_size(input_size: int) -> None:
    """Raise ``ParameterError`` unless ``input_size`` is a positive multiple of 32, the U-Net's total stride."""
    if input_size < 32 or input_size % 32 != 0:
        raise ParameterError(
            f"input_size={input_size} is invalid: the U-Net needs a multiple of 32, such as 128, 160 or 256"
        )


def build_network(config: NetworkConfig) -> smp.Unet:
    """Build an untrained U-Net with one mask channel and one presence logit."""
    if config.presence_pooling not in ("max", "avg"):
        raise ParameterError(f"presence_pooling={config.presence_pooling!r} is invalid; use 'max' or 'avg'")
    check_input_size(config.input_size)
    return smp.Unet(
        encoder_name=config.encoder,
        encoder_weights=None,
        encoder_depth=len(config.decoder_channels),
        decoder_channels=config.decoder_channels,
        in_channels=3,
        classes=1,
        aux_params={"classes": 1, "dropout": 0.2, "pooling": config.presence_pooling},
    )


def validate_frame(frame: object, index: int = 0) -> np.ndarray:
    """Return ``frame`` if it is a non-empty BGR uint8 image, else raise ``InvalidFrameError``."""
    if not isinstance(frame, np.ndarray):
        raise InvalidFrameError(
            f"frame {index} is a {type(frame).__name__}; expected a numpy.ndarray decoded by OpenCV"
        )
    if frame.dtype != np.uint8:
        raise InvalidFrameError(
            f"frame {index} has dtype {frame.dtype}; expected uint8 "
            "(convert with frame.astype(np.uint8) after scaling to 0-255)"
        )
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise InvalidFrameError(
            f"frame {index} has shape {frame.shape}; expected (height, width, 3) BGR "
            "(convert grayscale with cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))"
        )
    height, width = frame.shape[:2]
    if height == 0 or width == 0:
        raise InvalidFrameError(f"frame {index} has size {width}x{height}; expected at least 1x1 pixels")
    if height > MAX_FRAME_SIDE or width > MAX_FRAME_SIDE:
        raise InvalidFrameError(
            f"frame {index} has size {width}x{height}; each side must be at most {MAX_FRAME_SIDE} pixels"
        )
    return frame


def largest_region(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Return (x, y, width, height) of the largest 8-connected component of a bool mask."""
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, width, height = (int(value) for value in stats[largest, :4])
    return x, y, width, height


class PolypDetector:
    """U-Net polyp detector with its preprocessing, ready for batched inference.

    Attributes:
        name: Model name, for result messages and the FHIR Device.
        version: Model version.
        input_size: Side of the square network input in pixels.
        device: Torch device the network runs on.
        network: The ``torch.nn.Module``; its forward returns (mask logits,
            presence logits). Explanation code hooks into it.
        metadata: Everything else the weights file stores (training settings).
    """

    def __init__(
        self,
        network: smp.Unet,
        config: NetworkConfig,
        *,
        name: str,
        version: str,
        device: str | torch.device = "cpu",
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.config = config
        self.name = name
        self.version = version
        self.input_size = config.input_size
        self.metadata: dict[str, Any] = dict(metadata or {})
        self._mean = np.array(IMAGENET_MEAN, dtype=np.float32) * 255.0
        self._scale = 1.0 / (np.array(IMAGENET_STD, dtype=np.float32) * 255.0)

    @classmethod
    def create(
        cls,
        config: NetworkConfig = NetworkConfig(),
        *,
        name: str = "polyp-unet",
        version: str = "0.0.0",
        device: str | torch.device = "cpu",
        encoder_weights: Path | None = None,
    ) -> PolypDetector:
        """Build an untrained detector, for training.

        Args:
            encoder_weights: Optional state dict file of ImageNet-pretrained
                encoder weights the user already has on disk (for example
                timm's ``mobilenetv3_small_100`` weights saved with
                ``torch.save``). Nothing is ever downloaded.
        """
        network = build_network(config)
        if encoder_weights is not None:
            load_encoder_weights(network, encoder_weights)
        return cls(network, config, name=name, version=version, device=device)

    @classmethod
    def load(cls, path: Path, device: str = "cpu") -> PolypDetector:
        """Load a detector from a weights file written by ``save``.

        Raises:
            WeightsFileError: The file is missing, unreadable, in another
                format, or its tensors do not fit the stored architecture.
        """
        path = Path(path)
        if path.is_dir():
            raise WeightsFileError(f"weights file {path} is a folder; pass the .pt file inside it")
        if not path.is_file():
            raise WeightsFileError(
                f"weights file {path} not found; train one with `crc-medai train-detection --out {path}`"
            )
        try:
            checkpoint = torch.load(path, map_location=device, weights_only=True)
        except TORCH_LOAD_ERRORS as error:
            raise WeightsFileError(
                f"weights file {path} could not be read as a torch file ({type(error).__name__}: "
                f"{_first_line(error)}); pass a file written by `crc-medai train-detection`"
            ) from error

        _check_checkpoint(checkpoint, path)
        config = NetworkConfig(
            encoder=str(checkpoint["encoder"]),
            decoder_channels=tuple(int(channels) for channels in checkpoint["decoder_channels"]),
            input_size=int(checkpoint["input_size"]),
            presence_pooling=str(checkpoint["presence_pooling"]),
        )
        network = build_network(config)
        try:
            network.load_state_dict(checkpoint["state_dict"])
        except RuntimeError as error:
            raise WeightsFileError(f"weights file {path} does not fit a {config.encoder} U-Net: {error}") from error

        metadata = {key: value for key, value in checkpoint.items() if key not in _CHECKPOINT_KEYS}
        detector = cls(
            network,
            config,
            name=str(checkpoint["name"]),
            version=str(checkpoint["version"]),
            device=device,
            metadata=metadata,
        )
        logger.info(
            "detector loaded path=%s model=%s version=%s encoder=%s input_size=%d device=%s",
            path,
            detector.name,
            detector.version,
            config.encoder,
            config.input_size,
            detector.device,
        )
        return detector

    def save(self, path: Path, metadata: Mapping[str, Any] | None = None) -> None:
        """Write weights, architecture, name, version and ``metadata`` to one torch file.

        ``metadata`` values must be plain types (str, int, float, bool, lists
        and dicts of them) so that ``torch.load(weights_only=True)`` reads them.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint: dict[str, Any] = dict(metadata or self.metadata)
        checkpoint.update(
            {
                "format": WEIGHTS_FORMAT,
                "format_version": WEIGHTS_FORMAT_VERSION,
                "name": self.name,
                "version": self.version,
                "architecture": "Unet",
                "encoder": self.config.encoder,
                "decoder_channels": list(self.config.decoder_channels),
                "input_size": self.config.input_size,
                "presence_pooling": self.config.presence_pooling,
                "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD),
                "state_dict": {key: value.detach().cpu() for key, value in self.network.state_dict().items()},
            }
        )
        torch.save(checkpoint, path)
        logger.info("detector saved path=%s model=%s version=%s", path, self.name, self.version)

    def preprocess(self, frames_bgr: Sequence[np.ndarray]) -> torch.Tensor:
        """Convert BGR uint8 frames of any size to a normalised RGB batch on the device.

        Returns:
            float32 tensor (N, 3, input_size, input_size).

        Raises:
            InvalidFrameError: The list is empty or a frame is not a BGR uint8 image.
        """
        if len(frames_bgr) == 0:
            raise InvalidFrameError("the frame list is empty; pass at least one frame")

        size = self.input_size
        batch = np.empty((len(frames_bgr), size, size, 3), dtype=np.float32)
        for index, frame in enumerate(frames_bgr):
            validate_frame(frame, index)
            shrinking = frame.shape[0] > size or frame.shape[1] > size
            interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
            resized = cv2.resize(frame, (size, size), interpolation=interpolation)
            rgb = cv2.cvtColor(resized, cv2.COLOR_BGR2RGB)
            batch[index] = (rgb.astype(np.float32) - self._mean) * self._scale

        tensor = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
        return tensor.to(self.device)

    def predict(self, frames_bgr: Sequence[np.ndarray]) -> list[Prediction]:
        """Run the detector on a batch of BGR frames, one ``Prediction`` per frame, in order."""
        inputs = self.preprocess(frames_bgr)
        with torch.inference_mode():
            mask_logits, presence_logits = self.network(inputs)
            mask_probabilities = torch.sigmoid(mask_logits[:, 0]).cpu().numpy()
            presence = torch.sigmoid(presence_logits[:, 0]).cpu().numpy()

        predictions: list[Prediction] = []
        for frame, probability_map, probability in zip(frames_bgr, mask_probabilities, presence, strict=True):
            height, width = frame.shape[:2]
            full_size = cv2.resize(probability_map, (width, height), interpolation=cv2.INTER_LINEAR)
            mask = full_size >= MASK_THRESHOLD
            predictions.append(Prediction(probability=float(probability), mask=mask, region=largest_region(mask)))
        return predictions


def _first_line(error: BaseException) -> str:
    """Return the first line of an error's message, because torch's unpickling errors go on with unsafe advice."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


_CHECKPOINT_KEYS = frozenset(
    {
        "format",
        "format_version",
        "name",
        "version",
        "architecture",
        "encoder",
        "decoder_channels",
        "input_size",
        "presence_pooling",
        "mean",
        "std",
        "state_dict",
    }
)


def _check_checkpoint(checkpoint: object, path: Path) -> None:
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != WEIGHTS_FORMAT:
        raise WeightsFileError(
            f"weights file {path} is not a {WEIGHTS_FORMAT} file; save detectors with PolypDetector.save"
        )
    if checkpoint.get("format_version") != WEIGHTS_FORMAT_VERSION:
        raise WeightsFileError(
            f"weights file {path} has format_version {checkpoint.get('format_version')!r}; "
            f"this code reads version {WEIGHTS_FORMAT_VERSION}"
        )
    missing = sorted(_CHECKPOINT_KEYS - checkpoint.keys())
    if missing:
        raise WeightsFileError(f"weights file {path} lacks the keys {missing}; save detectors with PolypDetector.save")
    if list(checkpoint["mean"]) != list(IMAGENET_MEAN) or list(checkpoint["std"]) != list(IMAGENET_STD):
        raise WeightsFileError(
            f"weights file {path} was trained with another input normalisation than ImageNet mean/std"
        )


def load_encoder_weights(network: smp.Unet, path: Path) -> None:
    """Load pretrained encoder weights from a state dict file on disk into ``network.encoder``.

    Accepts a plain state dict or a dict with a ``state_dict`` entry. Keys may
    carry the prefixes ``module.``, ``encoder.`` or ``model.``; keys the
    encoder does not have (such as a classifier) are ignored.

    Raises:
        WeightsFileError: The file is unreadable or lacks some encoder tensors.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except TORCH_LOAD_ERRORS as error:
        raise WeightsFileError(
            f"encoder weights {path} could not be read as a torch state dict ({type(error).__name__}: {error})"
        ) from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise WeightsFileError(f"encoder weights {path} are not a state dict (a dict of parameter name to tensor)")

    target = network.encoder.state_dict()
    stripped = {_strip_prefixes(key): value for key, value in state.items()}
    # Timm encoders wrap the timm model as ``encoder.model``; smp's own
    # encoders subclass the torchvision model, so their keys have no prefix.
    candidates = [stripped, {f"model.{key}": value for key, value in stripped.items()}]
    matched = max(
        (
            {key: value for key, value in candidate.items() if key in target and target[key].shape == value.shape}
            for candidate in candidates
        ),
        key=len,
    )
    required = [key for key in target if not key.endswith("num_batches_tracked")]
    missing = [key for key in required if key not in matched]
    if missing:
        raise WeightsFileError(
            f"encoder weights {path} lack {len(missing)} of {len(required)} tensors of the encoder "
            f"(first: {missing[:3]}); pass a state dict of the same architecture"
        )
    network.encoder.load_state_dict(matched, strict=False)
    logger.info("encoder weights loaded path=%s tensors=%d ignored=%d", path, len(matched), len(state) - len(matched))


def _strip_prefixes(key: str) -> str:
    for prefix in ("module.", "encoder.", "model."):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key
