r"""Evaluate a detector on held-out generated frames or on a labelled data set folder.

Segmentation: Dice and IoU of the predicted mask per frame that shows a
polyp, averaged over those frames. Presence: per-frame sensitivity (flagged
polyp frames / polyp frames) and specificity (unflagged polyp-free frames /
polyp-free frames), where a frame is flagged when the presence probability
is at least the threshold.

Examples::

    python -m processors.detection.evaluate \
        --weights processors/detection/weights/polyp_unet.pt --frames 400 --seed 1000
    python -m processors.detection.evaluate \
        --weights processors/detection/weights/polyp_unet.pt --data-dir ~/data/Kvasir-SEG
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import cv2
import numpy as np

from processors.detection.datasets import iter_labelled_frames
from processors.detection.errors import ParameterError
from processors.detection.explain import GRADCAM_STAGES_FROM_END, GradCamExplainer
from processors.detection.model import PolypDetector
from processors.detection.synth import generate_frame

logger = logging.getLogger(__name__)

BATCH_SIZE = 16


@dataclass
class EvaluationReport:
    """Metrics over a set of frames; a metric is None when its frames are absent."""

    frames: int = 0
    polyp_frames: int = 0
    polyp_free_frames: int = 0
    threshold: float = 0.5
    mean_dice: float | None = None
    mean_iou: float | None = None
    sensitivity: float | None = None
    specificity: float | None = None
    per_frame: list[dict] = field(default_factory=list)


def dice_and_iou(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Return Dice and IoU of two bool masks; both are 1.0 when both masks are empty."""
    intersection = int(np.logical_and(predicted, truth).sum())
    predicted_pixels = int(predicted.sum())
    truth_pixels = int(truth.sum())
    union = predicted_pixels + truth_pixels - intersection
    if union == 0:
        return 1.0, 1.0
    return 2.0 * intersection / (predicted_pixels + truth_pixels), intersection / union


def evaluate(
    detector: PolypDetector, labelled_frames: Iterable[tuple[str, np.ndarray, np.ndarray]], threshold: float = 0.5
) -> EvaluationReport:
    """Run the detector over (name, BGR frame, bool mask) triples and compute the metrics."""
    if not 0.0 <= threshold <= 1.0:
        raise ParameterError(f"threshold={threshold} is out of range; use a probability from 0 to 1")
    report = EvaluationReport(threshold=threshold)
    dices: list[float] = []
    ious: list[float] = []
    true_positives = 0
    true_negatives = 0

    for batch in _batches(iter(labelled_frames), BATCH_SIZE):
        predictions = detector.predict([image for _, image, _ in batch])
        for (name, _, truth), prediction in zip(batch, predictions, strict=True):
            has_polyp = bool(truth.any())
            flagged = prediction.probability >= threshold
            row: dict = {
                "name": name,
                "polyp": has_polyp,
                "probability": round(prediction.probability, 4),
                "flagged": flagged,
            }
            if has_polyp:
                dice, iou = dice_and_iou(prediction.mask, truth)
                dices.append(dice)
                ious.append(iou)
                row.update(dice=round(dice, 4), iou=round(iou, 4))
                true_positives += flagged
            else:
                true_negatives += not flagged
            report.per_frame.append(row)

    report.frames = len(report.per_frame)
    report.polyp_frames = len(dices)
    report.polyp_free_frames = report.frames - report.polyp_frames
    if dices:
        report.mean_dice = float(np.mean(dices))
        report.mean_iou = float(np.mean(ious))
        report.sensitivity = true_positives / report.polyp_frames
    if report.polyp_free_frames:
        report.specificity = true_negatives / report.polyp_free_frames
    return report


@dataclass
class PointingGameReport:
    """Pointing game of Grad-CAM heatmaps against ground-truth polyp masks."""

    frames: int = 0
    hits: int = 0
    tolerance_px: int = 0
    method: str = ""

    @property
    def hit_rate(self) -> float | None:
        """Share of heatmaps whose peak lies inside the polyp mask (within the tolerance)."""
        return self.hits / self.frames if self.frames else None


def pointing_game(
    detector: PolypDetector,
    labelled_frames: Iterable[tuple[str, np.ndarray, np.ndarray]],
    tolerance_px: int = 0,
    stages_from_end: int = GRADCAM_STAGES_FROM_END,
) -> PointingGameReport:
    """Score Grad-CAM with the pointing game on the frames whose mask shows a polyp.

    The pointing game (Zhang et al., "Top-down Neural Attention by Excitation
    Backprop", ECCV 2016) counts a hit when the heatmap's maximum lies inside
    the object's mask. With ``tolerance_px`` > 0, a hit also counts when the
    maximum lies within that many pixels of the mask, as in that paper's 15-pixel
    variant. Frames without a polyp are ignored.
    """
    if tolerance_px < 0:
        raise ParameterError(f"tolerance_px={tolerance_px} is negative; use 0 or more pixels")
    report = PointingGameReport(tolerance_px=tolerance_px)
    with GradCamExplainer(detector, stages_from_end) as explainer:
        report.method = explainer.method
        for _, image, truth in labelled_frames:
            if not truth.any():
                continue
            heatmap = explainer.explain(image).heatmap
            row, column = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
            target = truth
            if tolerance_px > 0:
                kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * tolerance_px + 1, 2 * tolerance_px + 1))
                target = cv2.dilate(truth.astype(np.uint8), kernel) > 0
            report.frames += 1
            report.hits += bool(target[row, column])
    return report


def generated_frames(count: int, seed: int, size: int = 256) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yield ``count`` generated frames, polyp and polyp-free in turn, from ``seed``."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        image, mask = generate_frame(rng, size=size, with_polyp=index % 2 == 0)
        yield f"generated-{seed}-{index}", image, mask > 0


def _batches(items: Iterator, size: int) -> Iterator[list]:
    while batch := list(islice(items, size)):
        yield batch


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate the polyp detector.")
    parser.add_argument("--weights", type=Path, required=True, help="weights file to evaluate")
    parser.add_argument(
        "--frames", type=int, default=400, help="number of generated frames, half with a polyp (default 400)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=1000,
        help="generator seed of the held-out frames; use another seed than training (default 1000)",
    )
    parser.add_argument("--size", type=int, default=256, help="side of generated frames in pixels (default 256)")
    parser.add_argument(
        "--threshold", type=float, default=0.5, help="presence probability at which a frame is flagged (default 0.5)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="evaluate on a Kvasir-SEG or CVC-ClinicDB folder instead of generated frames",
    )
    parser.add_argument("--per-frame", action="store_true", help="also print one JSON line per frame")
    parser.add_argument(
        "--pointing-game",
        action="store_true",
        help="also score Grad-CAM with the pointing game on the polyp frames (slower: one Grad-CAM per frame)",
    )
    parser.add_argument(
        "--tolerance", type=int, default=0, help="pointing-game tolerance around the mask in pixels (default 0)"
    )
    parser.add_argument(
        "--stages-from-end",
        type=int,
        default=GRADCAM_STAGES_FROM_END,
        help=f"Grad-CAM layer for the pointing game, in encoder stages before the deepest "
        f"(default {GRADCAM_STAGES_FROM_END})",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Evaluate and print the metrics as one JSON object."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = _parse_args(argv)
    detector = PolypDetector.load(args.weights)

    if args.data_dir is not None:
        frames = ((frame.name, frame.image, frame.mask) for frame in iter_labelled_frames(args.data_dir))
        source = str(args.data_dir)
    else:
        if args.frames < 2:
            raise ParameterError(f"--frames={args.frames} is too small; use at least 2 so that both classes occur")
        training_seed = detector.metadata.get("training", {}).get("seed")
        if training_seed == args.seed:
            logger.warning("evaluation seed equals the training seed seed=%d; the frames are not held out", args.seed)
        frames = generated_frames(args.frames, args.seed, args.size)
        source = f"generated seed={args.seed} size={args.size}"

    frames = list(frames)
    report = evaluate(detector, frames, threshold=args.threshold)
    if args.per_frame:
        for row in report.per_frame:
            print(json.dumps(row))
    summary = {key: value for key, value in asdict(report).items() if key != "per_frame"}
    summary.update(source=source, model=detector.name, version=detector.version)
    if args.pointing_game:
        game = pointing_game(detector, frames, tolerance_px=args.tolerance, stages_from_end=args.stages_from_end)
        summary["pointing_game"] = {**asdict(game), "hit_rate": game.hit_rate}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
