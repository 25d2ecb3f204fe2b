"""Frame producer: the video capture agent beside an endoscopy tower.

Reads a video with OpenCV, JPEG-encodes each frame and publishes it on
``frames`` keyed by procedure id, with its sequence number and capture
timestamp, paced at the video's frame rate unless asked to go as fast as
possible.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from crc_medai.errors import CrcMedAiError
from crc_medai.kafka import create_producer, dead_letter_headers, ensure_topics
from crc_medai.settings import Settings
from schemas.messages import Frame, utc_now

logger = logging.getLogger(__name__)

SERVICE = "frame-producer"
DEFAULT_JPEG_QUALITY = 90
# Frame rate assumed when a container does not state one (OpenCV reports 0).
FALLBACK_FPS = 25.0


class VideoSourceError(CrcMedAiError):
    """The video cannot be opened or decoded."""


@dataclass(frozen=True)
class PublishSummary:
    """Counts and timing of one frame-producer run."""

    procedure_id: str
    frames_published: int
    frames_unreadable: int
    fps: float
    seconds: float


def open_video(path: Path) -> tuple[cv2.VideoCapture, float]:
    """Open a video file and return the capture and its frame rate."""
    if not path.is_file():
        raise VideoSourceError(f"video {path} does not exist; pass the path of a video file")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise VideoSourceError(
            f"video {path} cannot be opened by OpenCV: unknown codec or container, or a truncated file; "
            "re-encode it (for example to MPEG-4 or H.264 in .mp4)"
        )
    fps = capture.get(cv2.CAP_PROP_FPS)
    return capture, fps if fps and fps > 0 else FALLBACK_FPS


def read_frames(capture: cv2.VideoCapture, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Yield BGR frames until the end of the stream or ``max_frames``."""
    count = 0
    while max_frames is None or count < max_frames:
        ok, image = capture.read()
        if not ok:
            return
        count += 1
        yield image


def encode_jpeg(image: np.ndarray, quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """Encode a BGR frame as JPEG."""
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise VideoSourceError(f"frame of shape {image.shape} could not be JPEG-encoded")
    return buffer.tobytes()


async def publish_video(
    settings: Settings,
    video: Path,
    procedure_id: str,
    *,
    realtime: bool = True,
    max_frames: int | None = None,
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
) -> PublishSummary:
    """Publish every frame of ``video`` on the frames topic.

    Args:
        realtime: pace frames at the video's frame rate; when false, publish as fast as possible.
        max_frames: stop after this many frames (all when None).
    """
    capture, fps = open_video(video)
    await ensure_topics(settings)
    producer = create_producer(settings)
    topic = settings.topic(Frame.topic)
    key = procedure_id.encode()
    published = unreadable = 0
    await producer.start()
    started = time.monotonic()
    logger.info("publishing video procedure=%s fps=%.2f realtime=%s topic=%s", procedure_id, fps, realtime, topic)
    try:
        for sequence, image in enumerate(read_frames(capture, max_frames)):
            if realtime:
                await asyncio.sleep(max(0.0, started + sequence / fps - time.monotonic()))
            captured_at = utc_now()
            try:
                jpeg = encode_jpeg(image, jpeg_quality)
            except VideoSourceError as exc:
                unreadable += 1
                await producer.send(
                    settings.topic(f"dlq.{SERVICE}"),
                    value=b"",
                    key=key,
                    headers=dead_letter_headers(service=SERVICE, error=exc, source=f"{video.name}#{sequence}"),
                )
                continue
            height, width = image.shape[:2]
            frame = Frame(
                procedure_id=procedure_id,
                sequence=sequence,
                captured_at=captured_at,
                source_ts=captured_at,
                width=width,
                height=height,
                image=jpeg,
            )
            await producer.send(topic, value=frame.to_bytes(), key=key)
            published += 1
        await producer.flush()
    finally:
        await producer.stop()
        capture.release()

    if published == 0:
        raise VideoSourceError(f"video {video} yielded no frames: it is empty, truncated or in an unsupported codec")
    seconds = time.monotonic() - started
    logger.info("video published procedure=%s frames=%d seconds=%.1f", procedure_id, published, seconds)
    return PublishSummary(procedure_id, published, unreadable, fps, seconds)
