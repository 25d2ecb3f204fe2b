r"""Train the polyp detector on frames generated on the fly by ``synth``, optionally mixed with a labelled folder.

Loss: Dice + binary cross-entropy on the mask logits, plus binary
cross-entropy on the presence logit. Optimiser: AdamW with a one-cycle
learning-rate schedule.

Frames come in pairs: the same scene with and without polyps. Trained on
independent frames for 450 steps at input size 192, the presence head stayed
at chance level (held-out AUC 0.56), most likely because scenes differ in
many ways besides the polyp. In a pair the polyp is the only difference.

Generating a 256-pixel frame costs about half the CPU time that a training
step spends per frame at input size 128. The trainer therefore keeps a pool of
generated pairs and draws each batch from it with random flips and colour
jitter, taking at most one frame of each pair. After each step it replaces a
few pairs with new ones, so every pair is used a few times before it leaves
the pool.

With ``--data-dir`` a share of each batch (``--data-share``) comes from a
labelled folder in a layout of ``datasets``, resized to the frame size, with
the same flips and colour jitter. The rest still comes from generated pairs,
because Kvasir-SEG and CVC-ClinicDB hold no polyp-free frame, so the presence
head would otherwise see only one class. With ``--held-out-share`` the
trainer uses only the training side of the sequence split that
``evaluate --data-dir --held-out-share`` scores, so evaluation stays held out
when both get the same split options. ``--init-weights`` starts from a saved
detector instead of a new network, to fine-tune it, at its own input size or
at another one (the U-Net and the presence head are fully convolutional).

With ``--video-share`` a share of each batch comes from generated procedure
videos instead: half are frames in which a polyp is coming into view (the
first ``ENTERING_FRAMES`` frames of each run in which it is visible), half are
polyp-free frames of the same videos. Frame pairs rarely show a polyp that
only starts to cross the edge of the view, and those are the frames on which
the time to first detection depends.

Example::

    python -m processors.detection.train --out processors/detection/weights/polyp_unet.pt \
        --seed 0 --steps 2000 --batch-size 8 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as functional

from processors.detection.datasets import frame_sequences, iter_labelled_frames, read_sequence_map, split_by_sequence
from processors.detection.errors import DatasetLayoutError, ParameterError
from processors.detection.model import DEFAULT_INPUT_SIZE, NetworkConfig, PolypDetector, check_input_size
from processors.detection.synth import SyntheticFrame, generate_procedure, render_frame_pair

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingConfig:
    """Settings of one training run; stored in the weights file."""

    seed: int = 0
    steps: int = 600
    batch_size: int = 16
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    frame_size: int = 256
    input_size: int = DEFAULT_INPUT_SIZE
    pool_size: int = 384
    pool_refresh: int = 4
    presence_weight: float = 1.0
    data_share: float = 0.0
    """Share of each batch drawn from a labelled folder, 0 without one."""
    video_share: float = 0.0
    """Share of each batch drawn from generated procedure videos (``VideoFrames``)."""
    videos: int = 20
    """Generated procedure videos that ``video_share`` draws from."""
    video_seed: int = 5000
    """Seed of the first of those videos, which follow it in order. Keep them apart from evaluation videos."""
    compression_share: float = 0.0
    """Share of training frames compressed as JPEG at a random quality (``JPEG_QUALITIES``)."""


#: JPEG qualities, lowest and highest, of the frames that ``compression_share`` compresses. Frames reach the
#: detector as JPEG, often after a lossy video file such as the benchmark's MPEG-4 one.
JPEG_QUALITIES = (20, 90)


#: Share of each batch from ``--data-dir`` when ``--data-share`` is not given.
DEFAULT_DATA_SHARE = 0.5
#: Largest seed numpy's generators take.
MAX_SEED = 2**32 - 1
#: Maximum videos ``video_share`` may generate. Each took about 3 s here, and its kept frames stay in memory.
MAX_VIDEOS = 500

#: Frames from the start of each visible run of a polyp that count as the polyp coming into view.
ENTERING_FRAMES = 10
#: Share of the polyp-free frames of the videos kept for training.
POLYP_FREE_SHARE = 0.1
#: Length and frame rate of the training videos. A 20 s video shows about 4 polyps, and 15 fps halves the cost of 30.
VIDEO_SECONDS = 20.0
VIDEO_FPS = 15.0


@dataclass(frozen=True)
class VideoFrames:
    """Frames of generated procedure videos: polyps coming into view, and polyp-free frames."""

    entering: list[tuple[np.ndarray, np.ndarray]]
    """(image, mask) of the first ``ENTERING_FRAMES`` frames of each run in which a polyp is visible."""
    polyp_free: list[tuple[np.ndarray, np.ndarray]]
    """(image, mask) of about ``POLYP_FREE_SHARE`` of the frames without a visible polyp."""

    @classmethod
    def generate(cls, first_seed: int, videos: int, frame_size: int) -> VideoFrames:
        """Generate ``videos`` procedure videos from ``first_seed`` on and keep their training frames."""
        rng = np.random.default_rng(first_seed)
        entering: list[tuple[np.ndarray, np.ndarray]] = []
        polyp_free: list[tuple[np.ndarray, np.ndarray]] = []
        for seed in range(first_seed, first_seed + videos):
            if seed > first_seed and (seed - first_seed) % 5 == 0:
                logger.info("generating training videos done=%d of=%d", seed - first_seed, videos)
            run_start = None
            for frame in generate_procedure(seed, seconds=VIDEO_SECONDS, fps=VIDEO_FPS, size=frame_size):
                if frame.polyp_present:
                    run_start = frame.index if run_start is None else run_start
                    if frame.index - run_start < ENTERING_FRAMES:
                        entering.append((frame.image, frame.mask))
                else:
                    run_start = None
                    if rng.random() < POLYP_FREE_SHARE:
                        polyp_free.append((frame.image, frame.mask))
        if not entering or not polyp_free:
            raise ParameterError(
                f"{videos} generated video(s) from seed {first_seed} gave {len(entering)} frames with a polyp "
                f"coming into view and {len(polyp_free)} polyp-free frames; use more videos"
            )
        return cls(entering=entering, polyp_free=polyp_free)

    def sample(self, rng: np.random.Generator, count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Draw ``count`` frames, half (rounded up) with a polyp coming into view, each flipped and jittered."""
        images: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        for index in range(count):
            frames = self.entering if index % 2 == 0 else self.polyp_free
            image, mask = augment(rng, *frames[int(rng.integers(len(frames)))])
            images.append(image)
            masks.append(mask)
        return images, masks


@dataclass(frozen=True)
class LabelledData:
    """A labelled folder's frames to train on, resized to the training frame size."""

    source: str
    """Description of the frames for the weights file: folder name, frame count and split."""
    names: list[str]
    """File names of the frames, in the order of ``images``."""
    images: list[np.ndarray]
    masks: list[np.ndarray]
    """uint8, 255 on polyp pixels, as ``synth`` draws them."""

    @classmethod
    def load(
        cls,
        root: Path,
        frame_size: int,
        *,
        held_out_share: float | None = None,
        sequence_map: Path | None = None,
        split_seed: int = 0,
    ) -> LabelledData:
        """Read the folder at ``root``, keeping only the training side of the split when ``held_out_share`` is set.

        Raises:
            DatasetLayoutError: The folder, its layout, a file or the split is invalid (see ``datasets``).
        """
        frames = list(iter_labelled_frames(root))
        source = f"{root.name}: {len(frames)} frames"
        if held_out_share is not None:
            mapping = read_sequence_map(sequence_map) if sequence_map is not None else None
            sequences = frame_sequences(root, [frame.name for frame in frames], mapping)
            training, _ = split_by_sequence(sequences, held_out_share, split_seed)
            frames = [frames[index] for index in training]
            if sequence_map is not None:
                source += f", sequence map {sequence_map.name}"
            source += (
                f", training side {len(frames)} frames of {len({sequences[index] for index in training})}"
                f" sequences, held-out share {held_out_share}, split seed {split_seed}"
            )
        if frames and not any(frame.mask.any() for frame in frames):
            raise DatasetLayoutError(
                f"every mask of the {len(frames)} frames in {root} is empty (no pixel above 127); masks must be 255 "
                "on polyp pixels, so scale masks stored as 0 and 1 by 255"
            )
        size = (frame_size, frame_size)
        return cls(
            source=source,
            names=[frame.name for frame in frames],
            images=[cv2.resize(frame.image, size, interpolation=cv2.INTER_AREA) for frame in frames],
            masks=[
                cv2.resize(frame.mask.astype(np.uint8) * 255, size, interpolation=cv2.INTER_NEAREST) for frame in frames
            ],
        )

    def sample(self, rng: np.random.Generator, count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Draw ``count`` frames at random, with replacement, each flipped and jittered."""
        images: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        for index in rng.integers(len(self.images), size=count):
            image, mask = augment(rng, self.images[index], self.masks[index])
            images.append(image)
            masks.append(mask)
        return images, masks


def compress(rng: np.random.Generator, images: list[np.ndarray], share: float) -> list[np.ndarray]:
    """Return the images, each JPEG-compressed and decoded again with probability ``share``.

    With a share of 0 the generator is not drawn from, so older training runs stay reproducible.
    """
    if share <= 0:
        return images
    compressed = []
    for image in images:
        if rng.random() < share:
            quality = int(rng.integers(JPEG_QUALITIES[0], JPEG_QUALITIES[1] + 1))
            _, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
            image = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
        compressed.append(image)
    return compressed


def augment(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the frame with random colour jitter and, three times in four, a flip of frame and mask."""
    image = ColourJitter.sample(rng).apply(image)
    flip = int(rng.integers(-1, 3))
    if flip < 2:
        # cv2.flip codes: 0 vertical, 1 horizontal, -1 both.
        image, mask = cv2.flip(image, flip), cv2.flip(mask, flip)
    return image, mask


class FramePool:
    """Generated frames and masks, drawn at random and refreshed a few at a time.

    The pool contains pairs of the same scene with and without polyps (see
    ``synth.render_frame_pair``).
    """

    def __init__(self, rng: np.random.Generator, config: TrainingConfig) -> None:
        self._rng = rng
        self._config = config
        self.pairs: list[tuple[SyntheticFrame, SyntheticFrame]] = [
            self._generate() for _ in range(config.pool_size // 2)
        ]

    def _generate(self) -> tuple[SyntheticFrame, SyntheticFrame]:
        return render_frame_pair(self._rng, size=self._config.frame_size)

    def refresh(self) -> None:
        """Replace ``pool_refresh`` frames (as pairs) with new ones."""
        count = self._config.pool_refresh // 2
        for index in self._rng.choice(len(self.pairs), size=count, replace=False):
            self.pairs[index] = self._generate()

    def sample(self, count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Draw ``count`` frames, half with and half without polyps, each from a different pair.

        Both frames of a pair never share a batch. With the twins together,
        batch normalisation lets the network tell them apart by comparing
        them within the batch, which does not work at inference time. Trained
        that way for 2000 steps, the presence loss was 0.08 on batches of
        twins and 1.41 on the same frames shuffled into other batches.
        """
        images: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        members = self._rng.permutation([0] * (count - count // 2) + [1] * (count // 2))
        for index, member in zip(self._rng.choice(len(self.pairs), size=count, replace=False), members, strict=True):
            frame = self.pairs[index][member]
            image, mask = augment(self._rng, frame.image, frame.mask)
            images.append(image)
            masks.append(mask)
        return images, masks


@dataclass(frozen=True)
class ColourJitter:
    """A global hue, saturation and brightness change of a frame.

    Without it the network learns absolute colours: a pale polyp on a deep red
    wall has the colour of a pale wall elsewhere, and the network then marks
    pale walls as polyp. Jitter leaves only the contrast to the wall as a cue.
    """

    hue_shift: float
    saturation_gain: float
    value_gain: float

    @classmethod
    def sample(cls, rng: np.random.Generator) -> ColourJitter:
        # OpenCV stores 8-bit hue as degrees / 2, so a shift of 10 is 20 degrees.
        return cls(
            hue_shift=rng.uniform(-10.0, 10.0), saturation_gain=rng.uniform(0.6, 1.4), value_gain=rng.uniform(0.7, 1.3)
        )

    def apply(self, image: np.ndarray) -> np.ndarray:
        hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV).astype(np.float32)
        hsv[..., 0] = np.mod(hsv[..., 0] + self.hue_shift, 180.0)
        hsv[..., 1] = np.clip(hsv[..., 1] * self.saturation_gain, 0.0, 255.0)
        hsv[..., 2] = np.clip(hsv[..., 2] * self.value_gain, 0.0, 255.0)
        return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)


def mask_targets(masks: list[np.ndarray], input_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize masks to the network input and return (mask targets (N,1,H,W), presence targets (N,1))."""
    resized = np.stack([cv2.resize(mask, (input_size, input_size), interpolation=cv2.INTER_NEAREST) for mask in masks])
    mask_tensor = torch.from_numpy((resized > 127).astype(np.float32))[:, None].to(device)
    presence = torch.tensor([[float(mask.any())] for mask in masks], dtype=torch.float32, device=device)
    return mask_tensor, presence


def train(
    config: TrainingConfig,
    out: Path,
    encoder_weights: Path | None = None,
    version: str = "0.1.0",
    log_every: int = 25,
    *,
    data: LabelledData | None = None,
    init_weights: Path | None = None,
) -> PolypDetector:
    """Train a detector, write it to ``out`` and return it.

    Args:
        data: Labelled frames that make up ``config.data_share`` of each batch.
        init_weights: A weights file to fine-tune instead of a new network, at ``config.input_size``.
    """
    _check_config(config)
    data_frames = data_frames_per_batch(config)
    video_frames = video_frames_per_batch(config)
    if data_frames and data is None:
        raise ParameterError(f"data_share={config.data_share} needs labelled frames; pass --data-dir DIR")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    init_training = None
    if init_weights is not None:
        detector = PolypDetector.load(init_weights)
        init_training = detector.metadata.get("training")
        if detector.input_size != config.input_size:
            logger.info(
                "fine-tuning at another input size init_weights=%s from=%d to=%d",
                init_weights,
                detector.input_size,
                config.input_size,
            )
            detector.config = dataclasses.replace(detector.config, input_size=config.input_size)
            detector.input_size = config.input_size
        detector.version = version
    else:
        detector = PolypDetector.create(
            NetworkConfig(input_size=config.input_size),
            name="polyp-unet",
            version=version,
            encoder_weights=encoder_weights,
        )
    network = detector.network.train()
    optimiser = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=config.learning_rate, total_steps=config.steps, pct_start=0.1
    )
    dice_loss = smp.losses.DiceLoss(mode="binary", from_logits=True)

    started = time.perf_counter()
    cpu_started = time.process_time()
    pool = FramePool(rng, config)
    logger.info("frame pool ready frames=%d seconds=%.1f", config.pool_size, time.perf_counter() - started)
    videos = None
    if video_frames:
        videos = VideoFrames.generate(config.video_seed, config.videos, config.frame_size)
        logger.info(
            "video frames ready entering=%d polyp_free=%d seconds=%.1f",
            len(videos.entering),
            len(videos.polyp_free),
            time.perf_counter() - started,
        )

    running: dict[str, float] = {"dice": 0.0, "mask_bce": 0.0, "presence_bce": 0.0}
    for step in range(1, config.steps + 1):
        images, masks = pool.sample(config.batch_size - data_frames - video_frames)
        if data is not None and data_frames:
            data_images, data_masks = data.sample(rng, data_frames)
            images += data_images
            masks += data_masks
        if videos is not None:
            video_images, video_masks = videos.sample(rng, video_frames)
            images += video_images
            masks += video_masks
        images = compress(rng, images, config.compression_share)
        inputs = detector.preprocess(images)
        mask_target, presence_target = mask_targets(masks, config.input_size, detector.device)

        mask_logits, presence_logits = network(inputs)
        losses = {
            "dice": dice_loss(mask_logits, mask_target),
            "mask_bce": functional.binary_cross_entropy_with_logits(mask_logits, mask_target),
            "presence_bce": config.presence_weight
            * functional.binary_cross_entropy_with_logits(presence_logits, presence_target),
        }
        optimiser.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimiser.step()
        schedule.step()
        pool.refresh()

        for name, value in losses.items():
            running[name] += float(value.detach())
        if step % log_every == 0 or step == config.steps:
            _log_progress(step, config, running, log_every, schedule.get_last_lr()[0], started, cpu_started)
            running = dict.fromkeys(running, 0.0)

    elapsed = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    detector.network.eval()
    training = {
        "data": "synthetic frames from processors.detection.synth, generated during training"
        + (
            f"; {data_frames} of {config.batch_size} frames of each batch from {data.source}"
            if data is not None and data_frames
            else ""
        )
        + (
            f"; {video_frames} of {config.batch_size} frames of each batch from {config.videos} generated procedure"
            f" videos (seeds {config.video_seed}-{config.video_seed + config.videos - 1}, {VIDEO_FPS:g} fps):"
            " polyps coming into view and polyp-free frames"
            if video_frames
            else ""
        ),
        "init_weights": init_weights.name if init_weights else None,
        # The starting model's own record, so a fine-tuned model's metadata names all of its training data.
        "init_training": init_training,
        "seed": config.seed,
        "steps": config.steps,
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "weight_decay": config.weight_decay,
        "frame_size": config.frame_size,
        "pool_size": config.pool_size,
        "pool_refresh": config.pool_refresh,
        "compression_share": config.compression_share,
        "frames": "pairs of the same scene with and without polyps",
        "encoder_weights": encoder_weights.name if encoder_weights else None,
        "seconds": round(elapsed, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "torch_threads": torch.get_num_threads(),
    }
    detector.save(out, {"training": training})
    logger.info(
        "training finished steps=%d seconds=%.1f cpu_seconds=%.1f out=%s", config.steps, elapsed, cpu_seconds, out
    )
    return detector


def _log_progress(
    step: int,
    config: TrainingConfig,
    running: dict[str, float],
    log_every: int,
    learning_rate: float,
    started: float,
    cpu_started: float,
) -> None:
    steps_in_window = step % log_every or log_every
    means = {name: total / steps_in_window for name, total in running.items()}
    logger.info(
        "step=%d/%d dice=%.4f mask_bce=%.4f presence_bce=%.4f lr=%.2e elapsed_s=%.0f cpu_s=%.0f",
        step,
        config.steps,
        means["dice"],
        means["mask_bce"],
        means["presence_bce"],
        learning_rate,
        time.perf_counter() - started,
        time.process_time() - cpu_started,
    )


def data_frames_per_batch(config: TrainingConfig) -> int:
    """Return how many frames of each batch come from the labelled folder."""
    return round(config.batch_size * config.data_share)


def video_frames_per_batch(config: TrainingConfig) -> int:
    """Return how many frames of each batch come from generated procedure videos."""
    return round(config.batch_size * config.video_share)


def _check_config(config: TrainingConfig) -> None:
    if config.steps < 1:
        raise ParameterError(f"steps={config.steps} is invalid; train for at least 1 step")
    if not 2 <= config.batch_size <= config.pool_size // 2:
        raise ParameterError(
            f"batch_size={config.batch_size} is invalid; use 2 to half of pool_size={config.pool_size}"
        )
    if not 2 <= config.pool_refresh <= config.pool_size:
        raise ParameterError(f"pool_refresh={config.pool_refresh} is invalid; use 2 to pool_size={config.pool_size}")
    if config.batch_size % 2 or config.pool_size % 2 or config.pool_refresh % 2:
        raise ParameterError(
            f"batch_size={config.batch_size}, pool_size={config.pool_size} and pool_refresh={config.pool_refresh} "
            "must be even, because frames come in pairs with and without polyps"
        )
    if not 0.0 <= config.data_share < 1.0:
        raise ParameterError(
            f"data_share={config.data_share} is invalid; use 0 to less than 1, because generated frames "
            "supply the polyp-free examples"
        )
    check_input_size(config.input_size)
    if not 0.0 <= config.compression_share <= 1.0:
        raise ParameterError(f"compression_share={config.compression_share} is invalid; use 0 to 1")
    if not 0.0 <= config.video_share < 1.0:
        raise ParameterError(f"video_share={config.video_share} is invalid; use 0 to less than 1")
    if config.video_share > 0 and not 1 <= config.videos <= MAX_VIDEOS:
        raise ParameterError(f"videos={config.videos} is invalid; use 1 to {MAX_VIDEOS} videos with video_share")
    if config.video_share > 0 and not 0 <= config.video_seed <= MAX_SEED - config.videos:
        raise ParameterError(
            f"video_seed={config.video_seed} is invalid; use 0 to {MAX_SEED - config.videos} for {config.videos} videos"
        )
    data_frames, video_frames = data_frames_per_batch(config), video_frames_per_batch(config)
    generated = config.batch_size - data_frames - video_frames
    if config.data_share > 0 and (generated < 2 or data_frames == 0):
        raise ParameterError(
            f"data_share={config.data_share} with batch_size={config.batch_size} gives {data_frames} labelled and "
            f"{generated} generated frames per batch; each batch needs at least 1 labelled and 2 generated frames"
        )
    if config.video_share > 0 and (generated < 2 or video_frames < 2):
        raise ParameterError(
            f"video_share={config.video_share} with batch_size={config.batch_size} gives {video_frames} video and "
            f"{generated} generated frames per batch; each batch needs at least 2 of each"
        )


def _check_args(args: argparse.Namespace) -> None:
    """Reject options that would fail only after training, or inside torch with a traceback."""
    if args.threads is not None and args.threads < 1:
        raise ParameterError(f"--threads={args.threads} is invalid; use 1 or more")
    if args.log_every < 1:
        raise ParameterError(f"--log-every={args.log_every} is invalid; use 1 or more steps")
    if not args.learning_rate > 0:
        raise ParameterError(f"--learning-rate={args.learning_rate} is invalid; use a positive rate such as 0.002")
    if args.init_weights is not None and args.encoder_weights is not None:
        raise ParameterError(
            "--init-weights and --encoder-weights both set the starting weights; pass only one of them"
        )
    _reject_unused(args, "data_dir", "--data-dir DIR", ["data_share", "held_out_share"])
    if args.data_share is not None and args.data_share == 0:
        raise ParameterError("--data-share=0 would leave --data-dir unused; use a share above 0, such as 0.5")
    _reject_unused(args, "held_out_share", "--held-out-share F", ["sequence_map", "split_seed"])
    _reject_unused(args, "video_share", "--video-share F", ["videos", "video_seed"])
    if args.split_seed is not None and not 0 <= args.split_seed <= MAX_SEED:
        raise ParameterError(f"--split-seed={args.split_seed} is invalid; use 0 to {MAX_SEED}")
    if args.out.is_dir():
        raise ParameterError(
            f"--out {args.out} is a folder; name the weights file to write, such as {args.out / 'model.pt'}"
        )
    parent = next((folder for folder in args.out.parents if folder.exists()), None)
    if parent is not None and (not parent.is_dir() or not os.access(parent, os.W_OK)):
        raise ParameterError(f"--out {args.out} cannot be written: {parent} is not a writable folder")


def _reject_unused(args: argparse.Namespace, needed: str, needed_option: str, dependents: list[str]) -> None:
    """Reject each option of ``dependents`` that was given without the option it applies to."""
    if getattr(args, needed) is not None:
        return
    for name in dependents:
        if getattr(args, name) is not None:
            option = "--" + name.replace("_", "-")
            raise ParameterError(f"{option} applies to {needed_option} only; pass {needed_option} or drop {option}")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = TrainingConfig()
    parser = argparse.ArgumentParser(
        description="Train the polyp U-Net on generated endoscopy frames, optionally with a labelled folder."
    )
    parser.add_argument("--out", type=Path, required=True, help="path of the weights file to write")
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed of the generator and of torch (default 0)"
    )
    parser.add_argument("--steps", type=int, default=defaults.steps, help=f"optimiser steps (default {defaults.steps})")
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help=f"frames per step (default {defaults.batch_size})"
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=defaults.learning_rate,
        help=f"peak AdamW learning rate (default {defaults.learning_rate})",
    )
    parser.add_argument(
        "--frame-size",
        type=int,
        default=defaults.frame_size,
        help=f"side of generated frames in pixels (default {defaults.frame_size})",
    )
    parser.add_argument(
        "--input-size",
        type=int,
        default=defaults.input_size,
        help=f"side of the network input in pixels, a multiple of 32 (default {defaults.input_size})",
    )
    parser.add_argument(
        "--pool-size",
        type=int,
        default=defaults.pool_size,
        help=f"generated frames kept in memory (default {defaults.pool_size})",
    )
    parser.add_argument(
        "--pool-refresh",
        type=int,
        default=defaults.pool_refresh,
        help=f"pool frames replaced per step (default {defaults.pool_refresh})",
    )
    parser.add_argument(
        "--presence-weight",
        type=float,
        default=defaults.presence_weight,
        help=f"weight of the presence loss against the mask losses (default {defaults.presence_weight})",
    )
    parser.add_argument(
        "--encoder-weights",
        type=Path,
        default=None,
        help="optional ImageNet encoder state dict on disk to start from; nothing is downloaded",
    )
    parser.add_argument(
        "--init-weights", type=Path, default=None, help="weights file of a detector to fine-tune instead of a new one"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="labelled folder to train on as well: Kvasir-SEG (images/ + masks/) or CVC-ClinicDB layout",
    )
    parser.add_argument(
        "--data-share",
        type=float,
        default=None,
        help=f"share of each batch taken from --data-dir; the rest is generated (default {DEFAULT_DATA_SHARE})",
    )
    parser.add_argument(
        "--held-out-share",
        type=float,
        default=None,
        help="train only on the training side of this sequence split of --data-dir, as evaluate-detection splits it",
    )
    parser.add_argument(
        "--sequence-map", type=Path, default=None, help="CSV of name,sequence for --data-dir frames (CVC-ClinicDB)"
    )
    parser.add_argument("--split-seed", type=int, default=None, help="seed of the sequence split (default 0)")
    parser.add_argument(
        "--video-share",
        type=float,
        default=None,
        help="share of each batch taken from generated procedure videos: polyps coming into view and polyp-free"
        " frames (default 0)",
    )
    parser.add_argument(
        "--compression-share",
        type=float,
        default=defaults.compression_share,
        help=f"share of training frames JPEG-compressed at quality {JPEG_QUALITIES[0]}-{JPEG_QUALITIES[1]} (default 0)",
    )
    parser.add_argument(
        "--videos", type=int, default=None, help=f"videos for --video-share (default {defaults.videos})"
    )
    parser.add_argument(
        "--video-seed",
        type=int,
        default=None,
        help=f"seed of the first video for --video-share; keep it apart from evaluation videos"
        f" (default {defaults.video_seed})",
    )
    parser.add_argument("--version", default="0.1.0", help="model version stored in the weights file (default 0.1.0)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--log-every", type=int, default=25, help="steps between progress lines (default 25)")
    return parser.parse_args(argv)


def _given(value: Any, default: Any) -> Any:
    """Return an option's value, or ``default`` when the option was not given."""
    return default if value is None else value


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and train."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = _parse_args(argv)
    _check_args(args)
    defaults = TrainingConfig()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = TrainingConfig(
        seed=args.seed,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        frame_size=args.frame_size,
        input_size=args.input_size,
        pool_size=args.pool_size,
        pool_refresh=args.pool_refresh,
        presence_weight=args.presence_weight,
        data_share=_given(args.data_share, DEFAULT_DATA_SHARE) if args.data_dir is not None else 0.0,
        video_share=_given(args.video_share, defaults.video_share),
        videos=_given(args.videos, defaults.videos),
        video_seed=_given(args.video_seed, defaults.video_seed),
        compression_share=args.compression_share,
    )
    _check_config(config)
    data = None
    if args.data_dir is not None:
        data = LabelledData.load(
            args.data_dir,
            config.frame_size,
            held_out_share=args.held_out_share,
            sequence_map=args.sequence_map,
            split_seed=_given(args.split_seed, 0),
        )
        logger.info("labelled frames loaded source=%s", data.source)
    logger.info(
        "training started config=%s encoder_weights=%s init_weights=%s",
        config,
        args.encoder_weights,
        args.init_weights,
    )
    train(
        config,
        args.out,
        encoder_weights=args.encoder_weights,
        version=args.version,
        log_every=args.log_every,
        data=data,
        init_weights=args.init_weights,
    )


if __name__ == "__main__":
    main()
