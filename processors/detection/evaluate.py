r"""Evaluate a detector on held-out generated frames or on a labelled data set folder.

Segmentation: Dice and IoU of the predicted mask per frame that shows a
polyp, averaged over those frames. Presence: per-frame sensitivity (flagged
polyp frames / polyp frames) and specificity (unflagged polyp-free frames /
polyp-free frames), where a frame is flagged when the presence probability
is at least the threshold.

Videos (``--videos N``): the model and the finding tracker, set up as the
detection worker runs them, go over N held-out generated procedure videos.
A polyp counts as detected when a finding overlaps a frame that shows it.
Time to first detection is the capture time from the first frame that shows
a polyp to the frame on which its finding opened. It leaves out the pipeline
latency, which ``crc-medai benchmark-detection`` measures through Kafka.

Examples::

    python -m processors.detection.evaluate \
        --weights processors/detection/weights/polyp_unet.pt --frames 400 --seed 1000
    python -m processors.detection.evaluate \
        --weights processors/detection/weights/polyp_unet.pt --frames 0 --videos 6 --video-seed 11
    python -m processors.detection.evaluate \
        --weights processors/detection/weights/polyp_unet.pt --data-dir ~/data/Kvasir-SEG
    python -m processors.detection.evaluate \
        --weights processors/detection/weights/polyp_unet.pt --data-dir ~/data/CVC-ClinicDB \
        --sequence-map ~/data/cvc-sequences.csv --held-out-share 0.2
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path

import cv2
import numpy as np

from crc_medai.settings import Settings, get_settings
from processors.detection.datasets import frame_sequences, iter_labelled_frames, read_sequence_map, split_by_sequence
from processors.detection.errors import ParameterError
from processors.detection.explain import GRADCAM_STAGES_FROM_END, GRADCAM_TARGETS, GradCamExplainer, GradCamTarget
from processors.detection.model import PolypDetector
from processors.detection.synth import generate_frame, generate_procedure, summarise_ground_truth
from processors.detection.tracking import FindingTracker, box_region
from schemas.messages import DetectionResult, ModelRef, PolypFinding

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
    target: GradCamTarget = "mask",
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
    with GradCamExplainer(detector, target, stages_from_end) as explainer:
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


@dataclass
class VideoReport:
    """Per-polyp detection over generated procedure videos, through the finding tracker."""

    videos: int = 0
    fps: float = 30.0
    polyps: int = 0
    polyps_detected: int = 0
    findings: int = 0
    findings_on_polyps: int = 0
    """Findings that overlap a polyp; more than ``polyps_detected`` when one polyp was split into several."""
    findings_without_polyp: int = 0
    first_flag_delays: list[int] = field(default_factory=list)
    """Per detected polyp: frames from its first visible frame to the first frame the model flagged."""
    ttfd_ms: list[float] = field(default_factory=list)
    """Per detected polyp: capture time from its first visible frame to the frame that opened its finding."""

    @property
    def detection_rate(self) -> float | None:
        return self.polyps_detected / self.polyps if self.polyps else None

    def summary(self) -> dict:
        return {
            "videos": self.videos,
            "fps": self.fps,
            "polyps": self.polyps,
            "polyps_detected": self.polyps_detected,
            "detection_rate": self.detection_rate,
            "findings": self.findings,
            "findings_on_polyps": self.findings_on_polyps,
            "findings_without_polyp": self.findings_without_polyp,
            "first_flag_delay_median_frames": statistics.median(self.first_flag_delays)
            if self.first_flag_delays
            else None,
            "ttfd_median_ms": statistics.median(self.ttfd_ms) if self.ttfd_ms else None,
            "ttfd_p90_ms": float(np.percentile(self.ttfd_ms, 90)) if self.ttfd_ms else None,
        }


def track_frames(
    detector: PolypDetector, frames: list[np.ndarray], fps: float, tracker: FindingTracker, threshold: float
) -> tuple[list[bool], list[tuple[PolypFinding, int]]]:
    """Run the model and the tracker over decoded frames, captured at ``fps``.

    Returns:
        Whether each frame was flagged, and each finding event with the
        sequence of the frame that emitted it. Tracks still open at the end
        are closed and listed with the sequence after the last frame.
    """
    start = datetime(2026, 1, 1, tzinfo=UTC)
    model = ModelRef(name=detector.name, version=detector.version)
    flags: list[bool] = []
    events: list[tuple[PolypFinding, int]] = []
    for index in range(0, len(frames), BATCH_SIZE):
        for offset, prediction in enumerate(detector.predict(frames[index : index + BATCH_SIZE])):
            sequence = index + offset
            flagged = prediction.probability >= threshold
            result = DetectionResult(
                frame_event_id=uuid.uuid4(),
                procedure_id="offline",
                sequence=sequence,
                captured_at=start + timedelta(seconds=sequence / fps),
                polyp_probability=prediction.probability,
                flagged=flagged,
                region=box_region(prediction.region) if flagged else None,
                model=model,
                inference_ms=0.0,
            )
            flags.append(flagged)
            events += [(event, sequence) for event in tracker.update(result)]
    events += [(event, len(frames)) for event in tracker.close_idle(now=float("inf"))]
    return flags, events


def evaluate_videos(
    detector: PolypDetector,
    seeds: Iterable[int],
    settings: Settings,
    *,
    fps: float = 30.0,
    seconds: float = 20.0,
    size: int = 256,
) -> VideoReport:
    """Score per-polyp detection and time to first detection on generated procedure videos."""
    report = VideoReport(fps=fps)
    for seed in seeds:
        video = list(generate_procedure(seed, seconds=seconds, fps=fps, size=size))
        truth = summarise_ground_truth([frame.polyp_ids for frame in video], seed, fps, size)
        flags, events = track_frames(
            detector,
            [frame.image for frame in video],
            fps,
            FindingTracker.from_settings(settings),
            settings.detection_threshold,
        )
        _score_video(report, truth, flags, events)
    return report


def _score_video(report: VideoReport, truth: dict, flags: list[bool], events: list[tuple[PolypFinding, int]]) -> None:
    """Add one video's polyps and findings to ``report``.

    A finding counts for every polyp that is visible on a frame it spans.
    """
    opened = {event.finding_id: sequence for event, sequence in events if event.status == "open"}
    closed = [event for event, _ in events if event.status == "closed"]
    spans = {event.finding_id: (event.first_sequence, event.last_sequence) for event in closed}
    matched: set[uuid.UUID] = set()
    report.videos += 1
    report.findings += len(opened)
    for polyp in truth["polyps"]:
        visible = [index for first, last in polyp["frame_ranges"] for index in range(first, last + 1)]
        report.polyps += 1
        hits = [
            finding_id
            for finding_id, (first, last) in spans.items()
            if finding_id in opened and any(first <= index <= last for index in visible)
        ]
        if not hits:
            continue
        matched.update(hits)
        report.polyps_detected += 1
        report.ttfd_ms.append(1000.0 * (min(opened[hit] for hit in hits) - visible[0]) / report.fps)
        first_flag = next((index for index in visible if flags[index]), None)
        if first_flag is not None:
            report.first_flag_delays.append(first_flag - visible[0])
    report.findings_on_polyps += len(matched)
    report.findings_without_polyp += len(set(opened) - matched)


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
        "--frames",
        type=int,
        default=400,
        help="number of generated frames, half with a polyp; 0 for none (default 400)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=1000,
        help="generator seed of the held-out frames; use another seed than training (default 1000)",
    )
    parser.add_argument("--size", type=int, default=256, help="side of generated frames in pixels (default 256)")
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="presence probability at which a frame is flagged (default: the detection worker's,"
        " CRC_DETECTION_THRESHOLD)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="evaluate on a Kvasir-SEG or CVC-ClinicDB folder instead of generated frames",
    )
    parser.add_argument(
        "--held-out-share",
        type=float,
        default=None,
        help="with --data-dir, evaluate only the held-out side of a split that keeps each video sequence on one "
        "side; the share is of sequences, between 0 and 1 (default: every frame)",
    )
    parser.add_argument(
        "--sequence-map",
        type=Path,
        default=None,
        help="CSV file with the columns name,sequence that gives each frame's video sequence (needed for "
        "CVC-ClinicDB; each Kvasir-SEG image is its own sequence)",
    )
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the sequence split (default 0)")
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
        "--gradcam-target",
        choices=GRADCAM_TARGETS,
        default="mask",
        help="Grad-CAM score for the pointing game: the mask logits over the segmented polyp, "
        "or the presence logit (default mask)",
    )
    parser.add_argument(
        "--stages-from-end",
        type=int,
        default=GRADCAM_STAGES_FROM_END,
        help=f"Grad-CAM layer of the presence target, in encoder stages before the deepest "
        f"(default {GRADCAM_STAGES_FROM_END})",
    )
    parser.add_argument(
        "--videos",
        type=int,
        default=0,
        help="also score per-polyp detection and time to first detection on this many generated videos (default 0)",
    )
    parser.add_argument(
        "--video-seed", type=int, default=11, help="seed of the first video; the others follow it (default 11)"
    )
    parser.add_argument("--video-fps", type=float, default=30.0, help="frame rate of the videos (default 30)")
    parser.add_argument("--video-seconds", type=float, default=20.0, help="length of each video (default 20)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Evaluate and print the metrics as one JSON object."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = _parse_args(argv)
    _check_args(args)
    if args.threshold is None:
        args.threshold = get_settings().detection_threshold
    detector = PolypDetector.load(args.weights)

    summary: dict = {"model": detector.name, "version": detector.version}
    if args.data_dir is not None or args.frames != 0:
        summary.update(_evaluate_frames(detector, args))
    if args.videos > 0:
        settings = get_settings().model_copy(update={"detection_threshold": args.threshold})
        seeds = range(args.video_seed, args.video_seed + args.videos)
        videos = evaluate_videos(detector, seeds, settings, fps=args.video_fps, seconds=args.video_seconds)
        summary["videos"] = {
            **videos.summary(),
            "seeds": [seeds.start, seeds.stop - 1],
            "tracker": {
                "min_frames_to_open": settings.detection_track_min_frames,
                "confirm_window_s": settings.detection_track_confirm_window_s,
                "max_gap_s": settings.detection_track_max_gap_s,
            },
        }
    print(json.dumps(summary, indent=1))


def _check_args(args: argparse.Namespace) -> None:
    if args.videos < 0:
        raise ParameterError(f"--videos={args.videos} is invalid; use 0 or more")
    if args.data_dir is None and args.frames == 0 and args.videos == 0:
        raise ParameterError("nothing to evaluate; pass --frames N, --videos N or --data-dir DIR")
    if args.held_out_share is not None and args.data_dir is None:
        raise ParameterError(
            "--held-out-share applies to --data-dir only; generated frames are held out by their --seed"
        )
    if args.videos and args.video_seconds * args.video_fps < 1:
        raise ParameterError(
            f"--video-seconds={args.video_seconds} at --video-fps={args.video_fps} is shorter than one frame; "
            "use a longer video"
        )


def _evaluate_frames(detector: PolypDetector, args: argparse.Namespace) -> dict:
    if args.data_dir is not None:
        frames = [(frame.name, frame.image, frame.mask) for frame in iter_labelled_frames(args.data_dir)]
        source = str(args.data_dir)
        if args.held_out_share is not None:
            sequence_map = read_sequence_map(args.sequence_map) if args.sequence_map is not None else None
            sequences = frame_sequences(args.data_dir, [name for name, _, _ in frames], sequence_map)
            _, held_out = split_by_sequence(sequences, args.held_out_share, args.split_seed)
            frames = [frames[index] for index in held_out]
            source += (
                f" held-out side: {len(held_out)} frames of {len({sequences[index] for index in held_out})}"
                f" of {len(set(sequences))} sequences, split seed {args.split_seed}"
            )
    else:
        if args.frames < 2:
            raise ParameterError(
                f"--frames={args.frames} is too small; use at least 2 so that both classes occur, or 0 for none"
            )
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
    summary["source"] = source
    if args.pointing_game:
        game = pointing_game(
            detector,
            frames,
            tolerance_px=args.tolerance,
            target=args.gradcam_target,
            stages_from_end=args.stages_from_end,
        )
        summary["pointing_game"] = {**asdict(game), "hit_rate": game.hit_rate}
    return summary


if __name__ == "__main__":
    main()
