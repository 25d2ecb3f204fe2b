"""Grad-CAM heatmaps for the detector's polyp-presence output.

Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks
via Gradient-based Localization", ICCV 2017) weights each channel of a
convolutional layer's activation by the spatial mean of the gradient of a
target score, sums the weighted channels and keeps the positive part. Here the
score is the presence logit of the U-Net's classification head, and the layer
is the encoder stage before the deepest one (see ``GRADCAM_STAGES_FROM_END``).
The computation is done by ``pytorch_grad_cam.GradCAM`` from the ``grad-cam``
package.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from types import TracebackType

import cv2
import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from processors.detection.errors import DetectionError
from processors.detection.model import PolypDetector, validate_frame

logger = logging.getLogger(__name__)

#: Weight of the frame in the overlay; the heatmap colours get the rest.
OVERLAY_IMAGE_WEIGHT = 0.6

#: Grad-CAM layer, counted back from the deepest encoder stage. The deepest
#: stage (stride 32) is only 4 x 4 cells at input size 128, and its heatmap
#: peak fell inside the polyp mask on 8 of 60 generated polyp frames. One stage
#: earlier (stride 16, 8 x 8 cells) the peak fell inside on 43 of the same 60
#: (pointing game, ``evaluate.py --pointing-game``, seed 4242, shipped weights).
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
    """Grad-CAM on the presence logit, as a context manager that removes its hooks on exit.

    The explainer hooks into a private copy of the detector's network, so
    ``detector.predict`` runs without hooks while the explainer is open.
    One explainer must not be used from several threads at once.

    Example::

        with GradCamExplainer(detector) as explainer:
            explanation = explainer.explain(frame_bgr)
    """

    def __init__(self, detector: PolypDetector, stages_from_end: int = GRADCAM_STAGES_FROM_END) -> None:
        self._detector = detector
        network = copy.deepcopy(detector.network).eval()
        self._model = PresenceLogit(network)
        layer, layer_description = encoder_stage(network, stages_from_end)
        self.method = f"Grad-CAM on {layer_description}, presence logit"
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

        cam = self._cam(input_tensor=inputs, targets=[ClassifierOutputTarget(0)])[0]
        height, width = frame_bgr.shape[:2]
        heatmap = np.clip(cv2.resize(cam, (width, height), interpolation=cv2.INTER_LINEAR), 0.0, 1.0).astype(np.float32)

        image = frame_bgr.astype(np.float32) / 255.0
        overlay = show_cam_on_image(image, heatmap, use_rgb=False, image_weight=OVERLAY_IMAGE_WEIGHT)
        encoded, png = cv2.imencode(".png", overlay)
        if not encoded:
            raise DetectionError(f"OpenCV could not encode the {width}x{height} Grad-CAM overlay as PNG")
        return Explanation(heatmap=heatmap, overlay_png=png.tobytes(), method=self.method)
