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

import numpy as np

from processors.detection.datasets import iter_labelled_frames
from processors.detection.errors import ParameterError
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

    report = evaluate(detector, frames, threshold=args.threshold)
    if args.per_frame:
        for row in report.per_frame:
            print(json.dumps(row))
    summary = {key: value for key, value in asdict(report).items() if key != "per_frame"}
    summary.update(source=source, model=detector.name, version=detector.version)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
