"""Procedural endoscopy-like frames and procedure videos with ground-truth polyp masks.

Tests, the demo and the shipped demo weights use frames drawn by this module,
because the project bundles no real polyp data set. A frame shows a black
border around a circular or octagonal field of view and pink-red mucosa with
vessels and folds. Light falls off towards the edges, the wet surface has
specular reflections, and some frames have motion blur. Polyps are raised
blobs of varied size, outline, colour and surface; debris and bubbles serve as
distractors. A date/time overlay is burned into a corner and is never part of
the mask.

Everything is drawn from a ``numpy.random.Generator``: the same seed gives the
same pixels with the same NumPy and OpenCV versions.

Regenerate the demo video::

    python -m processors.detection.synth --out samples/video/procedure-demo.mp4 --seconds 20 --fps 15 --seed 7
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import cv2
import numpy as np

from processors.detection import scene
from processors.detection.errors import DetectionError, ParameterError, VideoWriteError

logger = logging.getLogger(__name__)

MIN_SIZE = 64
MAX_SIZE = 2048
#: A polyp counts as visible only when at least this fraction of the frame shows it.
MIN_VISIBLE_FRACTION = 0.002
#: Probability that a frame with a polyp shows two.
SECOND_POLYP_PROBABILITY = 0.15
#: Attempts to place a visible polyp before the generator gives up.
MAX_ATTEMPTS = 20
#: Share of generated polyps placed across the edge of the field of view. A polyp
#: that comes into view in a video crosses that edge. The rest lie in its central part.
EDGE_POLYP_SHARE = 0.35


@dataclass(frozen=True)
class SyntheticFrame:
    """One generated frame with its ground truth."""

    image: np.ndarray
    """BGR uint8, (size, size, 3)."""
    mask: np.ndarray
    """uint8 (size, size), 255 on polyp pixels, 0 elsewhere."""
    overlay_mask: np.ndarray
    """bool (size, size), True where on-screen text or a status box was burned in."""
    polyp_ids: tuple[int, ...]
    """Ids of the polyps visible in the frame."""


@dataclass(frozen=True)
class ProcedureFrame:
    """One frame of a generated procedure video with its ground truth."""

    index: int
    image: np.ndarray
    mask: np.ndarray
    polyp_ids: tuple[int, ...]

    @property
    def polyp_present(self) -> bool:
        """Whether any polyp is visible in this frame."""
        return bool(self.polyp_ids)


def generate_frame(
    rng: np.random.Generator, size: int = 256, with_polyp: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one endoscopy-like frame and its polyp mask.

    Args:
        rng: Source of randomness; the frame depends only on its state.
        size: Width and height in pixels.
        with_polyp: True for at least one visible polyp, False for none, None
            for either with probability 1/2.

    Returns:
        The BGR uint8 image (size, size, 3) and the uint8 mask (size, size),
        255 on polyp pixels. The mask is non-empty exactly when a polyp is shown.
    """
    frame = render_frame(rng, size=size, with_polyp=with_polyp)
    return frame.image, frame.mask


def render_frame(rng: np.random.Generator, size: int = 256, with_polyp: bool | None = None) -> SyntheticFrame:
    """Draw one frame like ``generate_frame`` and also return the overlay mask and polyp ids."""
    _check_size(size)
    if with_polyp is None:
        with_polyp = bool(rng.random() < 0.5)

    # A polyp placed near the field-of-view edge can end up too small to count
    # as visible; draw the whole frame again in that rare case.
    for _ in range(MAX_ATTEMPTS):
        frame = _render_frame_once(_draw_stream_seeds(rng), size, with_polyp)
        if frame.polyp_ids or not with_polyp:
            return frame
    raise DetectionError(f"could not place a visible polyp in a {size}x{size} frame after {MAX_ATTEMPTS} attempts")


def render_frame_pair(rng: np.random.Generator, size: int = 256) -> tuple[SyntheticFrame, SyntheticFrame]:
    """Draw one scene twice: with polyps, and identical except that the polyps are absent.

    Training on such pairs gives the presence output a clean contrast, because
    the polyp is the only difference between the positive and the negative.
    """
    _check_size(size)
    for _ in range(MAX_ATTEMPTS):
        seeds = _draw_stream_seeds(rng)
        with_polyp = _render_frame_once(seeds, size, with_polyp=True)
        if with_polyp.polyp_ids:
            return with_polyp, _render_frame_once(seeds, size, with_polyp=False)
    raise DetectionError(f"could not place a visible polyp in a {size}x{size} frame after {MAX_ATTEMPTS} attempts")


@dataclass(frozen=True)
class _StreamSeeds:
    """Seeds of the three random streams of one frame: scene, polyps, and finishing."""

    scene: int
    polyps: int
    finish: int


def _draw_stream_seeds(rng: np.random.Generator) -> _StreamSeeds:
    scene_seed, polyp_seed, finish_seed = (int(seed) for seed in rng.integers(0, 2**63 - 1, size=3))
    return _StreamSeeds(scene=scene_seed, polyps=polyp_seed, finish=finish_seed)


def _render_frame_once(seeds: _StreamSeeds, size: int, with_polyp: bool) -> SyntheticFrame:
    # Polyps draw from their own stream, so that the same seeds without
    # polyps give the same scene, light, noise and overlay.
    scene_rng = np.random.default_rng(seeds.scene)
    polyp_rng = np.random.default_rng(seeds.polyps)
    finish_rng = np.random.default_rng(seeds.finish)

    style = scene.sample_mucosa_style(scene_rng)
    optics = scene.sample_optics(scene_rng, size)
    world_size = int(size * 1.3)
    world = scene.render_mucosa(scene_rng, world_size, world_size, style, view_size=size)
    scene.render_debris(scene_rng, world)
    labels = np.zeros((world_size, world_size), dtype=np.int32)

    jitter = 0.05 * size
    centre = (
        world_size / 2.0 + scene_rng.uniform(-jitter, jitter),
        world_size / 2.0 + scene_rng.uniform(-jitter, jitter),
    )
    scale = scene_rng.uniform(0.8, 1.0)
    transform = scene.camera_transform(centre, scene_rng.uniform(0.0, 360.0), scale, size)

    if with_polyp:
        count = 2 if polyp_rng.random() < SECOND_POLYP_PROBABILITY else 1
        for polyp_id in range(1, count + 1):
            _place_polyp_in_view(polyp_rng, world, labels, transform, scale, size, polyp_id)
    scene.render_specular(finish_rng, world, density=finish_rng.uniform(0.3, 1.5), view_size=size)

    view, view_labels = scene.cut_view(world, labels, transform, size)
    scene.apply_lighting(view, optics)
    if finish_rng.random() < 0.2:
        view = scene.apply_motion_blur(view, int(finish_rng.integers(3, 10)), finish_rng.uniform(0.0, 180.0))

    timestamp = _random_timestamp(finish_rng)
    code = f"ID {int(finish_rng.integers(0, 10000)):04d}"
    return _finish_frame(finish_rng, view, view_labels, optics, timestamp, code)


def _place_polyp_in_view(
    rng: np.random.Generator,
    world: np.ndarray,
    labels: np.ndarray,
    transform: np.ndarray,
    scale: float,
    size: int,
    polyp_id: int,
) -> None:
    """Draw a polyp in the central part of the camera view, or across its edge (``EDGE_POLYP_SHARE``)."""
    if rng.random() < EDGE_POLYP_SHARE:
        distance = rng.uniform(0.28, 0.6) * size
    else:
        distance = rng.uniform(0.0, 0.28) * size
    angle = rng.uniform(0.0, 2.0 * math.pi)
    view_point = np.array([size / 2.0 + distance * math.cos(angle), size / 2.0 + distance * math.sin(angle), 1.0])
    world_x, world_y = transform @ view_point
    radius = rng.uniform(0.05, 0.22) * size * scale
    spec = scene.sample_polyp(rng, polyp_id, (float(world_x), float(world_y)), radius)
    scene.render_polyp(rng, world, labels, spec)


def _finish_frame(
    rng: np.random.Generator,
    view: np.ndarray,
    view_labels: np.ndarray,
    optics: scene.CameraOptics,
    timestamp: datetime,
    code: str,
) -> SyntheticFrame:
    """Apply field of view, noise and overlay, and build the mask from the visible labels."""
    size = view.shape[0]
    fov = scene.field_of_view(size, optics)
    image = scene.finish_view(rng, view, optics, fov)
    overlay_mask = scene.burn_overlay(image, optics, timestamp, code)

    view_labels = np.where(fov & ~overlay_mask, view_labels, 0)
    min_pixels = max(int(MIN_VISIBLE_FRACTION * size * size), 16)
    visible: list[int] = []
    for polyp_id in np.unique(view_labels):
        if polyp_id == 0:
            continue
        pixels = view_labels == polyp_id
        if int(pixels.sum()) >= min_pixels:
            visible.append(int(polyp_id))
        else:
            view_labels[pixels] = 0

    mask = np.where(view_labels > 0, 255, 0).astype(np.uint8)
    return SyntheticFrame(image=image, mask=mask, overlay_mask=overlay_mask, polyp_ids=tuple(visible))


def _random_timestamp(rng: np.random.Generator) -> datetime:
    start = datetime(2019, 1, 1, 7, 0, 0)
    return start + timedelta(days=int(rng.integers(0, 2000)), seconds=int(rng.integers(0, 11 * 3600)))


def _check_size(size: int) -> None:
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ParameterError(f"size={size} is out of range; use {MIN_SIZE} to {MAX_SIZE} pixels")


@dataclass(frozen=True)
class _CameraPath:
    """Smooth camera motion along a long strip of colon wall, in world pixels."""

    start_x: float
    centre_y: float
    speed: float
    sway: float
    sway_period: float
    sway_phase: float
    roll: float
    roll_period: float
    base_angle: float
    zoom_period: float

    def transform(self, time_s: float, size: int) -> tuple[np.ndarray, float]:
        x = self.start_x + self.speed * time_s
        y = self.centre_y + self.sway * math.sin(2.0 * math.pi * time_s / self.sway_period + self.sway_phase)
        angle = self.base_angle + self.roll * math.sin(2.0 * math.pi * time_s / self.roll_period)
        scale = 0.95 + 0.06 * math.sin(2.0 * math.pi * time_s / self.zoom_period)
        return scene.camera_transform((x, y), angle, scale, size), scale


def generate_procedure(
    seed: int, seconds: float = 20.0, fps: float = 15.0, size: int = 256
) -> Iterator[ProcedureFrame]:
    """Generate a procedure video in which polyps come into view and leave it again.

    The camera drifts along a strip of colon wall with slow sway, roll and
    zoom. Polyps sit on the wall at intervals, so each one enters the view,
    stays visible for about 2-4 seconds and leaves, with polyp-free stretches
    of about 1.5-2.5 seconds between them.

    Args:
        seed: Seed of the generator; the same seed gives the same video.
        seconds: Duration of the video.
        fps: Frames per second.
        size: Width and height of each frame in pixels.

    Yields:
        One ``ProcedureFrame`` per frame, with its mask and the visible polyp ids.
    """
    _check_size(size)
    if not 0.0 < seconds <= 600.0:
        raise ParameterError(f"seconds={seconds} is out of range; use more than 0 and at most 600")
    if not 1.0 <= fps <= 120.0:
        raise ParameterError(f"fps={fps} is out of range; use 1 to 120 frames per second")

    rng = np.random.default_rng(seed)
    style = scene.sample_mucosa_style(rng)
    optics = scene.sample_optics(rng, size)
    path = _sample_camera_path(rng, size)
    world, labels = _render_procedure_world(rng, style, path, seconds, size)

    start_time = _random_timestamp(rng)
    code = f"ID {int(rng.integers(0, 10000)):04d}"
    frame_count = int(round(seconds * fps))
    for index in range(frame_count):
        time_s = index / fps
        transform, _ = path.transform(time_s, size)
        view, view_labels = scene.cut_view(world, labels, transform, size)
        scene.apply_lighting(view, optics)
        timestamp = start_time + timedelta(seconds=int(time_s))
        frame = _finish_frame(rng, view, view_labels, optics, timestamp, code)
        yield ProcedureFrame(index=index, image=frame.image, mask=frame.mask, polyp_ids=frame.polyp_ids)


def _sample_camera_path(rng: np.random.Generator, size: int) -> _CameraPath:
    return _CameraPath(
        start_x=float(size),
        centre_y=float(size),
        speed=size / rng.uniform(2.2, 2.6),
        sway=rng.uniform(0.05, 0.12) * size,
        sway_period=rng.uniform(4.0, 7.0),
        sway_phase=rng.uniform(0.0, 2.0 * math.pi),
        roll=rng.uniform(4.0, 12.0),
        roll_period=rng.uniform(5.0, 9.0),
        base_angle=rng.uniform(0.0, 360.0),
        zoom_period=rng.uniform(3.0, 6.0),
    )


def _render_procedure_world(
    rng: np.random.Generator, style: scene.MucosaStyle, path: _CameraPath, seconds: float, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Paint the strip of wall the camera passes over, with polyps along its middle."""
    width = int(path.start_x + path.speed * seconds + 2 * size)
    height = 2 * size
    world = scene.render_mucosa(rng, height, width, style, view_size=size)
    scene.render_debris(rng, world)
    labels = np.zeros((height, width), dtype=np.int32)

    # A polyp whose centre is under the camera at time t is in view for about
    # (view width + diameter) / speed seconds around t.
    time_s = rng.uniform(3.0, 3.8)
    polyp_id = 1
    while time_s < seconds + 1.0:
        radius = rng.uniform(0.07, 0.18) * size
        centre = (path.start_x + path.speed * time_s, path.centre_y + rng.uniform(-0.12, 0.12) * size)
        scene.render_polyp(rng, world, labels, scene.sample_polyp(rng, polyp_id, centre, radius))
        in_view_s = (size + 2.0 * radius) / path.speed
        time_s += in_view_s + rng.uniform(1.5, 2.5)
        polyp_id += 1

    scene.render_specular(rng, world, density=rng.uniform(0.4, 1.2), view_size=size)
    return world, labels


def summarise_ground_truth(frames_polyp_ids: list[tuple[int, ...]], seed: int, fps: float, size: int) -> dict:
    """Build the ground-truth record of a procedure from the polyp ids of each frame.

    Returns:
        A JSON-ready dict: per-frame presence flags, for each polyp the inclusive
        frame ranges where it is visible, and the episodes (maximal runs of
        frames showing any polyp).
    """
    present = [bool(ids) for ids in frames_polyp_ids]
    ranges_by_polyp: dict[int, list[list[int]]] = {}
    for index, ids in enumerate(frames_polyp_ids):
        for polyp_id in ids:
            ranges = ranges_by_polyp.setdefault(polyp_id, [])
            if ranges and ranges[-1][1] == index - 1:
                ranges[-1][1] = index
            else:
                ranges.append([index, index])

    episodes: list[dict] = []
    for index, is_present in enumerate(present):
        if not is_present:
            continue
        if episodes and episodes[-1]["last_frame"] == index - 1:
            episodes[-1]["last_frame"] = index
            episodes[-1]["polyp_ids"] = sorted(set(episodes[-1]["polyp_ids"]) | set(frames_polyp_ids[index]))
        else:
            episodes.append({"first_frame": index, "last_frame": index, "polyp_ids": sorted(frames_polyp_ids[index])})
    for episode in episodes:
        episode["first_time_s"] = round(episode["first_frame"] / fps, 3)
        episode["last_time_s"] = round(episode["last_frame"] / fps, 3)

    return {
        "generator": "processors.detection.synth",
        "seed": seed,
        "fps": fps,
        "size": size,
        "frame_count": len(present),
        "frames_with_polyp": sum(present),
        "polyps": [
            {"polyp_id": polyp_id, "frame_ranges": ranges} for polyp_id, ranges in sorted(ranges_by_polyp.items())
        ],
        "episodes": episodes,
        "polyp_present": present,
    }


def write_procedure_video(path: Path, seed: int, seconds: float = 20.0, fps: float = 15.0, size: int = 256) -> dict:
    """Write a generated procedure as an MPEG-4 video and its ground truth as JSON beside it.

    The ground truth goes to ``path`` with the suffix ``.json``.

    Returns:
        The ground-truth record written to the JSON file.

    Raises:
        VideoWriteError: OpenCV cannot open ``path`` for writing with the mp4v codec.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (size, size))
    if not writer.isOpened():
        raise VideoWriteError(
            f"OpenCV could not open {path} for writing with codec mp4v; check the folder and the .mp4 suffix"
        )

    frames_polyp_ids: list[tuple[int, ...]] = []
    try:
        for frame in generate_procedure(seed, seconds=seconds, fps=fps, size=size):
            writer.write(frame.image)
            frames_polyp_ids.append(frame.polyp_ids)
    finally:
        writer.release()

    truth = summarise_ground_truth(frames_polyp_ids, seed=seed, fps=fps, size=size)
    truth["video"] = path.name
    truth_path = path.with_suffix(".json")
    truth_path.write_text(_format_json(truth), encoding="utf-8")
    logger.info(
        "procedure video written path=%s frames=%d episodes=%d truth=%s",
        path,
        truth["frame_count"],
        len(truth["episodes"]),
        truth_path,
    )
    return truth


def _format_json(record: dict) -> str:
    """Indent ``record`` as JSON but keep each list of numbers or booleans on one line."""
    text = json.dumps(record, indent=1)

    def join_items(match: re.Match[str]) -> str:
        return "[" + ", ".join(item.strip() for item in match.group(1).split(",")) + "]"

    return re.sub(r"\[\s+([^\[\]{}\"]*?)\s+\]", join_items, text) + "\n"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Write a generated endoscopy procedure video with ground truth.")
    parser.add_argument(
        "--out", type=Path, required=True, help="output .mp4 path; the ground truth goes to the same path with .json"
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="duration in seconds (default 20)")
    parser.add_argument("--fps", type=float, default=15.0, help="frames per second (default 15)")
    parser.add_argument("--seed", type=int, default=7, help="generator seed (default 7)")
    parser.add_argument("--size", type=int, default=256, help="frame width and height in pixels (default 256)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Write the procedure video and print a summary of its ground truth."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = _parse_args(argv)
    truth = write_procedure_video(args.out, seed=args.seed, seconds=args.seconds, fps=args.fps, size=args.size)
    for episode in truth["episodes"]:
        print(
            f"episode frames={episode['first_frame']}-{episode['last_frame']} "
            f"seconds={episode['first_time_s']}-{episode['last_time_s']} polyps={episode['polyp_ids']}"
        )
    print(f"frames={truth['frame_count']} with_polyp={truth['frames_with_polyp']} out={args.out}")


if __name__ == "__main__":
    main()
