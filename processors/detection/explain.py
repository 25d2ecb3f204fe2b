"""Grad-CAM heatmaps for the detector's polyp mask or presence output.

Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks
via Gradient-based Localization", ICCV 2017) weights each channel of a
convolutional layer's activation by the spatial mean of the gradient of a
target score, sums the weighted channels and keeps the positive part. The
computation is done by ``pytorch_grad_cam.GradCAM`` from the ``grad-cam``
package, with one of two targets:

- ``mask`` (the default): the sum of the mask logits over the pixels that the
  model segments as polyp (``SegmentedPolypTarget``), at the second
  decoder block (see ``GRADCAM_DECODER_BLOCK``). When the model flags a frame
  but segments no pixel, the score sums the mask logits over the whole frame.
- ``presence``: the presence logit of the U-Net's classification head, at an
  encoder stage (see ``GRADCAM_STAGES_FROM_END``).

The model card gives the pointing-game figures that chose the default.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

import cv2
import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from processors.detection.errors import DetectionError, ParameterError
from processors.detection.model import MASK_THRESHOLD, PolypDetector, validate_frame

logger = logging.getLogger(__name__)

#: Weight of the frame in the overlay; the heatmap colours get the rest.
OVERLAY_IMAGE_WEIGHT = 0.6

GradCamTarget = Literal["mask", "presence"]
GRADCAM_TARGETS: tuple[GradCamTarget, ...] = ("mask", "presence")

#: Decoder block of the ``mask`` target, as an index counted from the deepest
#: block (0). Index 1, the second block, has stride 8: 16 x 16 cells at input size 128.
GRADCAM_DECODER_BLOCK = 1

#: Encoder stage of the ``presence`` target, counted back from the deepest. The
#: deepest stage (stride 32) is only 4 x 4 cells at input size 128.
GRADCAM_STAGES_FROM_END = 1


@dataclass(frozen=True)
class Explanation:
    """A Grad-CAM explanation of one frame."""

    heatmap: np.ndarray
    """float32 (height, width) in [0, 1] at the frame size; 1 is the strongest evidence for a polyp."""
    overlay_png: bytes
    """The frame with the heatmap blended over it in the JET colour map, PNG-encoded."""
    method: str
    """Name of the method, layer and output that produced the heatmap."""


class PresenceLogit(torch.nn.Module):
    """The U-Net cut down to its presence output: encoder, then classification head.

    Returns the presence logit of shape (N, 1). The mask decoder is skipped
    because the presence head reads only the deepest encoder features.
    """

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = network.encoder
        self.classification_head = network.classification_head

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        features = self.encoder(inputs)
        return self.classification_head(features[-1])


class MaskLogits(torch.nn.Module):
    """The U-Net cut down to its mask output: the mask logits of shape (N, 1, H, W)."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        mask_logits, _ = self.network(inputs)
        return mask_logits


def decoder_block(network: torch.nn.Module, index: int) -> tuple[torch.nn.Module, str]:
    """Return a decoder block of an smp U-Net, counted from the deepest (0), and a description of it.

    Raises:
        DetectionError: The network has no decoder blocks, or fewer than requested.
    """
    blocks = getattr(network.decoder, "blocks", None)
    if blocks is None:
        raise DetectionError(
            f"cannot find the blocks of decoder {type(network.decoder).__name__} for Grad-CAM; use an smp U-Net"
        )
    if not 0 <= index < len(blocks):
        raise DetectionError(f"decoder block {index} is out of range; the decoder has {len(blocks)} blocks")
    stride = 2 ** (len(blocks) - 1 - index)
    return blocks[index], f"decoder block {index + 1} (stride {stride})"


def encoder_stage(network: torch.nn.Module, stages_from_end: int = 0) -> tuple[torch.nn.Module, str]:
    """Return an encoder stage of an smp U-Net, counted from the deepest (0), and a description of it.

    Supports timm encoders (``tu-`` names) and smp's own encoders that list
    their stages with ``get_stages``.

    Raises:
        DetectionError: The encoder exposes neither, or has fewer stages than requested.
    """
    encoder = network.encoder
    timm_model = getattr(encoder, "model", None)
    feature_info = getattr(timm_model, "feature_info", None)
    if timm_model is not None and feature_info is not None:
        names = feature_info.module_name()
        _check_stage_count(len(names), stages_from_end)
        index = len(names) - 1 - stages_from_end
        module_name = names[index]
        stride = feature_info.reduction()[index]
        return timm_model.get_submodule(module_name), f"encoder stage {index + 1} ({module_name}, stride {stride})"

    if hasattr(encoder, "get_stages"):
        stages = encoder.get_stages()
        strides = sorted(stages)
        _check_stage_count(len(strides), stages_from_end)
        stride = strides[len(strides) - 1 - stages_from_end]
        return stages[stride][-1], f"encoder stage {len(strides) - stages_from_end} (stride {stride})"

    raise DetectionError(
        f"cannot find the stages of encoder {type(encoder).__name__} for Grad-CAM; "
        "use a timm (tu-) encoder or an smp encoder with get_stages()"
    )


def last_encoder_stage(network: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """Return the deepest encoder stage of an smp U-Net and a description of it."""
    return encoder_stage(network, 0)


def _check_stage_count(count: int, stages_from_end: int) -> None:
    if not 0 <= stages_from_end < count:
        raise DetectionError(f"stages_from_end={stages_from_end} is out of range; the encoder has {count} stages")


class GradCamExplainer:
    """Grad-CAM on the mask or presence output, as a context manager that removes its hooks on exit.

    The explainer hooks into a private copy of the detector's network, so
    ``detector.predict`` runs without hooks while the explainer is open.
    One explainer must not be used from several threads at once.

    Example::

        with GradCamExplainer(detector) as explainer:
            explanation = explainer.explain(frame_bgr)
    """

    def __init__(
        self,
        detector: PolypDetector,
        target: GradCamTarget = "mask",
        stages_from_end: int = GRADCAM_STAGES_FROM_END,
    ) -> None:
        self._detector = detector
        self.target = target
        network = copy.deepcopy(detector.network).eval()
        if target == "mask":
            self._model: torch.nn.Module = MaskLogits(network)
            layer, layer_description = decoder_block(network, GRADCAM_DECODER_BLOCK)
            self.method = f"Grad-CAM on {layer_description}, mask logits over the segmented polyp"
            # Grad-CAM needs gradients only from the mask output back to the hooked block.
            # Without gradients upstream of it, the backward pass skips the encoder and
            # takes about 30 % less time; the heatmap is the same.
            network.requires_grad_(False)
            for block in network.decoder.blocks[GRADCAM_DECODER_BLOCK:]:
                block.requires_grad_(True)
            network.segmentation_head.requires_grad_(True)
        elif target == "presence":
            self._model = PresenceLogit(network)
            layer, layer_description = encoder_stage(network, stages_from_end)
            self.method = f"Grad-CAM on {layer_description}, presence logit"
        else:
            raise ParameterError(f"Grad-CAM target {target!r} is unknown; use one of {', '.join(GRADCAM_TARGETS)}")
        self._cam: GradCAM | None = GradCAM(model=self._model, target_layers=[layer])
        logger.debug("Grad-CAM hooks registered model=%s method=%s", detector.name, self.method)

    def __enter__(self) -> GradCamExplainer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc_value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks; the explainer cannot be used afterwards."""
        if self._cam is not None:
            self._cam.activations_and_grads.release()
            self._cam = None

    def explain(self, frame_bgr: np.ndarray) -> Explanation:
        """Compute the Grad-CAM heatmap of one BGR uint8 frame and its PNG overlay.

        Raises:
            InvalidFrameError: The frame is not a BGR uint8 image.
            DetectionError: The explainer was closed.
        """
        if self._cam is None:
            raise DetectionError("the Grad-CAM explainer is closed; open a new GradCamExplainer")
        validate_frame(frame_bgr)
        inputs = self._detector.preprocess([frame_bgr])

        cam = self._cam(input_tensor=inputs, targets=[self._target()])[0]
        height, width = frame_bgr.shape[:2]
        heatmap = np.clip(cv2.resize(cam, (width, height), interpolation=cv2.INTER_LINEAR), 0.0, 1.0).astype(np.float32)

        image = frame_bgr.astype(np.float32) / 255.0
        overlay = show_cam_on_image(image, heatmap, use_rgb=False, image_weight=OVERLAY_IMAGE_WEIGHT)
        encoded, png = cv2.imencode(".png", overlay)
        if not encoded:
            raise DetectionError(f"OpenCV could not encode the {width}x{height} Grad-CAM overlay as PNG")
        return Explanation(heatmap=heatmap, overlay_png=png.tobytes(), method=self.method)

    def _target(self) -> ClassifierOutputTarget | SegmentedPolypTarget:
        if self.target == "presence":
            return ClassifierOutputTarget(0)
        return SegmentedPolypTarget()


class SegmentedPolypTarget:
    """Grad-CAM target: the sum of the mask logits over the pixels that the same forward pass segments as polyp.

    It scores what ``SemanticSegmentationTarget`` scores with the model's own
    mask, but takes the mask from the forward pass that Grad-CAM runs anyway,
    which saves a second forward pass per heatmap. When no pixel is segmented,
    it sums the mask logits over the whole frame.
    """

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        logits = model_output[0]
        segmented = torch.sigmoid(logits.detach()) >= MASK_THRESHOLD
        if not bool(segmented.any()):
            return logits.sum()
        return (logits * segmented).sum()
