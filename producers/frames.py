"""Frame producer: the video capture agent beside an endoscopy tower.

Reads a video file, a camera device (an integer index such as ``0``) or a
network stream URL (``rtsp://``, ``http://``, ...) with OpenCV, optionally
resizes each frame, JPEG-encodes it and publishes it on ``frames`` keyed by
procedure id, with its sequence number and capture timestamp. Files are paced
at their frame rate unless ``realtime`` is false, which publishes as fast as
possible. Live sources pace themselves.

Bad input is handled by kind. A file that OpenCV cannot open is reported as
truncated or damaged when its first bytes name a known container, and as
unsupported otherwise. A file that ends before the frame count its header
declares is reported as truncated after its readable frames are published.
A frame that cannot be decoded is counted, logged, dead-lettered and skipped.
A live source that stops delivering frames is reopened with bounded retries
and exponential backoff.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import cv2
import numpy as np
from aiokafka import AIOKafkaProducer

from crc_medai.errors import CrcMedAiError
from crc_medai.kafka import DATA_TOPICS, create_producer, dead_letter_headers, ensure_topics
from crc_medai.settings import Settings
from schemas.messages import Frame, utc_now

# OpenCV and FFmpeg print warnings such as "moov atom not found" for a damaged file, which this module
# reports with its own errors. So OpenCV logs only errors and FFmpeg nothing (-8 is AV_LOG_QUIET).
# OpenCV reads OPENCV_FFMPEG_LOGLEVEL when it first opens a capture, and a value set before start wins.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

logger = logging.getLogger(__name__)

SERVICE = "frame-producer"
DEFAULT_JPEG_QUALITY = 90
# Frame rate assumed when a container does not state one (OpenCV reports 0).
FALLBACK_FPS = 25.0
#: First bytes of the containers OpenCV's FFmpeg backend reads: (offset, signature, container name).
CONTAINER_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (4, b"ftyp", "MP4/QuickTime"),
    (0, b"RIFF", "AVI (RIFF)"),
    (0, b"\x1aE\xdf\xa3", "Matroska/WebM"),
    (0, b"\x00\x00\x01\xba", "MPEG program stream"),
    (0, b"OggS", "Ogg"),
)
#: Number of unreadable frames per WARNING: the 1st is logged, then the 101st, 201st, ... for a value of 100.
UNREADABLE_LOG_EVERY = 100


class VideoSourceError(CrcMedAiError):
    """The video source cannot be opened or read."""


class UnsupportedVideoError(VideoSourceError):
    """The file is not in a container or codec that OpenCV can read."""


class TruncatedVideoError(VideoSourceError):
    """The file is in a known container but cut short or damaged."""


class SourceDisconnectedError(VideoSourceError):
    """A live source stopped delivering frames and could not be reopened."""


class CaptureOptionsError(VideoSourceError, ValueError):
    """A capture option is out of range."""


@dataclass(frozen=True)
class VideoSource:
    """Source of frames: a file, a camera device index or a network stream URL."""

    kind: Literal["file", "camera", "stream"]
    target: str | int

    @classmethod
    def parse(cls, value: str | Path | int) -> VideoSource:
        """Parse a source argument: digits are a camera index, ``scheme://`` a URL, and anything else a file path."""
        if isinstance(value, int):
            return cls("camera", value)
        text = str(value)
        if text.isdigit():
            return cls("camera", int(text))
        if "://" in text:
            return cls("stream", text)
        return cls("file", text)

    @property
    def live(self) -> bool:
        """True for cameras and network streams, which can drop and come back."""
        return self.kind != "file"

    @property
    def label(self) -> str:
        """Name for logs and dead-letter headers, without the credentials or query of a URL."""
        if self.kind == "camera":
            return f"camera {self.target}"
        if self.kind == "stream":
            parts = urlsplit(str(self.target))
            host = parts.hostname or ""
            port = f":{parts.port}" if parts.port else ""
            return f"{parts.scheme}://{host}{port}{parts.path}"
        return Path(str(self.target)).name


@dataclass(frozen=True)
class CaptureOptions:
    """Options for reading, resizing and encoding frames."""

    width: int | None = None
    """Output width in pixels; with only one of width and height set, the other keeps the aspect ratio."""
    height: int | None = None
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    """JPEG quality from 1 (smallest) to 100 (best)."""
    max_frames: int | None = None
    """Maximum number of frames to grab, unreadable ones included (no limit when None)."""
    reconnect_attempts: int = 5
    """Attempts to reopen a live source after it stops delivering frames, before giving up."""
    reconnect_backoff_s: float = 0.5
    """Wait before the first reopen attempt (seconds), doubled after each failed attempt."""
    reconnect_backoff_max_s: float = 8.0
    """Maximum wait between reopen attempts (seconds)."""

    def __post_init__(self) -> None:
        if not 1 <= self.jpeg_quality <= 100:
            raise CaptureOptionsError(f"jpeg_quality={self.jpeg_quality} is out of range; use 1 to 100")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= 8192:
                raise CaptureOptionsError(f"{name}={value} is out of range; use 1 to 8192 pixels or leave it unset")
        if self.max_frames is not None and self.max_frames < 0:
            raise CaptureOptionsError(f"max_frames={self.max_frames} is negative; use 0 or more, or leave it unset")
        if self.reconnect_attempts < 0:
            raise CaptureOptionsError(f"reconnect_attempts={self.reconnect_attempts} is negative; use 0 or more")

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """Return the (width, height) a frame of the given size is resized to."""
        if self.width and self.height:
            return self.width, self.height
        if self.width:
            return self.width, max(1, round(height * self.width / width))
        if self.height:
            return max(1, round(width * self.height / height)), self.height
        return width, height


@dataclass
class CaptureStats:
    """Counts of one capture run."""

    frames_read: int = 0
    frames_unreadable: int = 0
    reconnects: int = 0
    end_reason: str = "not started"


@dataclass(frozen=True)
class PublishSummary:
    """Counts and timing of one frame-producer run."""

    procedure_id: str
    frames_published: int
    frames_unreadable: int
    fps: float
    seconds: float
    source: str = ""
    reconnects: int = 0
    end_reason: str = "end of stream"


def open_capture(source: VideoSource) -> cv2.VideoCapture:
    """Open ``source`` with OpenCV, or raise a ``VideoSourceError`` that states why it failed and what to do."""
    if source.kind == "file":
        path = Path(str(source.target))
        if not path.is_file():
            raise VideoSourceError(f"video {path} not found; pass the path of a video file")
        capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
        if not capture.isOpened():
            raise diagnose_unopenable_file(path)
        return capture

    capture = cv2.VideoCapture(source.target)
    if not capture.isOpened():
        what = "camera device" if source.kind == "camera" else "network stream"
        raise VideoSourceError(
            f"{what} {source.label} cannot be opened by OpenCV; check that it is connected and not in use, "
            "and for a stream the URL and credentials"
        )
    return capture


def diagnose_unopenable_file(path: Path) -> VideoSourceError:
    """Return the error for an unopenable file: truncated if it starts like a known container, else unsupported."""
    with path.open("rb") as handle:
        head = handle.read(16)
    if not head:
        return TruncatedVideoError(f"video {path} is empty (0 bytes); copy the recording again")
    for offset, signature, container in CONTAINER_SIGNATURES:
        if head[offset : offset + len(signature)] == signature:
            return TruncatedVideoError(
                f"video {path} starts like a {container} file but OpenCV cannot read it: it is truncated "
                "or damaged (an interrupted copy or recording); copy it again or repair it with ffmpeg"
            )
    return UnsupportedVideoError(
        f"video {path} is not in a container OpenCV can read (first bytes {head[:8].hex()}); "
        "re-encode it to MPEG-4 or H.264 in .mp4, or MJPEG in .avi"
    )


def encode_jpeg(image: np.ndarray, quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """Encode a BGR frame as JPEG."""
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise VideoSourceError(f"frame of shape {image.shape} could not be JPEG-encoded")
    return buffer.tobytes()


@dataclass
class FrameReader:
    """Iterable of (index, BGR frame or None when unreadable) over a source, which reopens live sources.

    Args:
        source: where to read.
        options: size, frame limit and reconnection policy.
        opener: opens a source; tests pass a scripted capture.
        sleep: waits between reconnection attempts.
    """

    source: VideoSource
    options: CaptureOptions = field(default_factory=CaptureOptions)
    opener: Callable[[VideoSource], cv2.VideoCapture] = open_capture
    sleep: Callable[[float], None] = time.sleep
    stats: CaptureStats = field(default_factory=CaptureStats)

    def __post_init__(self) -> None:
        self._capture = self.opener(self.source)
        fps = self._capture.get(cv2.CAP_PROP_FPS)
        self.fps = fps if fps and fps > 0 else FALLBACK_FPS
        count = self._capture.get(cv2.CAP_PROP_FRAME_COUNT)
        self.declared_frames = int(count) if count and count > 0 and not self.source.live else None

    def close(self) -> None:
        """Release the OpenCV capture."""
        self._capture.release()

    def __iter__(self) -> Iterator[tuple[int, np.ndarray | None]]:
        index = 0
        limit = self.options.max_frames
        while limit is None or index < limit:
            if not self._capture.grab():
                if self.source.live:
                    self._reconnect()
                    continue
                self._end_of_file(index)
                return
            ok, image = self._capture.retrieve()
            if not ok or image is None or image.size == 0:
                self._count_unreadable(index)
                yield index, None
            else:
                self.stats.frames_read += 1
                yield index, self._resize(image)
            index += 1
        self.stats.end_reason = f"max frames ({limit})"

    def _resize(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        size = self.options.output_size(width, height)
        if size == (width, height):
            return image
        shrinking = size[0] < width or size[1] < height
        return cv2.resize(image, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)

    def _count_unreadable(self, index: int) -> None:
        self.stats.frames_unreadable += 1
        if self.stats.frames_unreadable % UNREADABLE_LOG_EVERY == 1:
            logger.warning(
                "unreadable frame skipped source=%s frame=%d unreadable_total=%d",
                self.source.label,
                index,
                self.stats.frames_unreadable,
            )

    def _end_of_file(self, index: int) -> None:
        """Finish a file: raise when it ended before its declared frame count or gave nothing."""
        self.stats.end_reason = "end of stream"
        # FFmpeg's frame count is an estimate for some containers, so one frame of slack is allowed.
        if self.declared_frames is not None and index < self.declared_frames - 1:
            self.stats.end_reason = "truncated"
            raise TruncatedVideoError(
                f"video {self.source.label} ended after {index} of the {self.declared_frames} frames its "
                "header declares: it is truncated or damaged; the frames read were published, copy it again"
            )
        if self.stats.frames_read == 0:
            raise UnsupportedVideoError(
                f"video {self.source.label} opened but no frame could be decoded: unsupported codec or "
                "damaged file; re-encode it to MPEG-4 or H.264"
            )

    def _reconnect(self) -> None:
        """Reopen a live source with exponential backoff, or raise ``SourceDisconnectedError``."""
        self._capture.release()
        delay = self.options.reconnect_backoff_s
        for attempt in range(1, self.options.reconnect_attempts + 1):
            logger.warning(
                "source stopped delivering frames, reopening source=%s attempt=%d/%d wait_s=%.1f",
                self.source.label,
                attempt,
                self.options.reconnect_attempts,
                delay,
            )
            self.sleep(delay)
            try:
                self._capture = self.opener(self.source)
            except VideoSourceError as exc:
                logger.warning("reopen failed source=%s attempt=%d error=%s", self.source.label, attempt, exc)
                delay = min(delay * 2.0, self.options.reconnect_backoff_max_s)
                continue
            self.stats.reconnects += 1
            logger.info("source reopened source=%s attempt=%d", self.source.label, attempt)
            return
        self.stats.end_reason = "disconnected"
        raise SourceDisconnectedError(
            f"{self.source.label} stopped delivering frames and did not come back after "
            f"{self.options.reconnect_attempts} attempts; check the device or stream and start the producer again"
        )


async def publish_video(
    settings: Settings,
    video: str | Path | int,
    procedure_id: str,
    *,
    realtime: bool = True,
    max_frames: int | None = None,
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
    options: CaptureOptions | None = None,
    patient_id: str | None = None,
) -> PublishSummary:
    """Publish every frame of a video file, camera or stream on the frames topic.

    Args:
        video: a file path, a camera index or a stream URL (see ``VideoSource.parse``).
        patient_id: pseudonym of the patient examined, from the worklist; findings name it as their subject.
        realtime: pace a file's frames at its frame rate; when false, publish as fast as possible.
            Live sources are never paced here.
        max_frames, jpeg_quality: shortcuts for the fields of ``options`` when it is not given.

    Raises:
        VideoSourceError: the source cannot be opened, a file is truncated or unsupported, or a live
            source did not come back. An unreadable frame is dead-lettered and skipped; a truncated
            file also gets a dead-letter record, after its readable frames are published.
    """
    source = VideoSource.parse(video)
    options = options or CaptureOptions(jpeg_quality=jpeg_quality, max_frames=max_frames)
    await ensure_topics(settings, (*DATA_TOPICS, f"dlq.{SERVICE}"))
    producer = create_producer(settings)
    await producer.start()
    publisher = _Publisher(settings, producer, source, procedure_id, options.jpeg_quality, patient_id)
    started = time.monotonic()
    try:
        reader = await publisher.open(options)
        logger.info(
            "publishing video source=%s fps=%.2f realtime=%s topic=%s",
            source.label,
            reader.fps,
            realtime,
            settings.topic(Frame.topic),
        )
        try:
            await publisher.run(reader, pace_fps=reader.fps if realtime and not source.live else None)
        finally:
            reader.close()
        await producer.flush()
    finally:
        await producer.stop()

    seconds = time.monotonic() - started
    logger.info(
        "video published source=%s frames=%d unreadable=%d reconnects=%d seconds=%.1f",
        source.label,
        publisher.published,
        reader.stats.frames_unreadable,
        reader.stats.reconnects,
        seconds,
    )
    return PublishSummary(
        procedure_id,
        publisher.published,
        reader.stats.frames_unreadable,
        reader.fps,
        seconds,
        source=source.label,
        reconnects=reader.stats.reconnects,
        end_reason=reader.stats.end_reason,
    )


class _Publisher:
    """Sender of a reader's frames, and of dead-letter records for what the reader cannot read."""

    def __init__(
        self,
        settings: Settings,
        producer: AIOKafkaProducer,
        source: VideoSource,
        procedure_id: str,
        quality: int,
        patient_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.patient_id = patient_id
        self.producer = producer
        self.source = source
        self.procedure_id = procedure_id
        self.quality = quality
        self.key = procedure_id.encode()
        self.published = 0

    async def open(self, options: CaptureOptions) -> FrameReader:
        """Open the source; a source that cannot be opened also gets a dead-letter record."""
        try:
            return FrameReader(self.source, options)
        except VideoSourceError as exc:
            await self.dead_letter(exc, f"{self.source.label}#open")
            raise

    async def run(self, reader: FrameReader, pace_fps: float | None) -> None:
        started = time.monotonic()
        try:
            # NOTE: OpenCV reads in the event loop's thread, so a slow camera read blocks the loop meanwhile.
            for sequence, image in reader:
                if pace_fps is not None:
                    await asyncio.sleep(max(0.0, started + sequence / pace_fps - time.monotonic()))
                await self.send(sequence, image)
        except VideoSourceError as exc:
            await self.dead_letter(exc, f"{self.source.label}#end")
            raise

    async def send(self, sequence: int, image: np.ndarray | None) -> None:
        captured_at = utc_now()
        if image is None:
            await self.dead_letter(
                VideoSourceError(f"frame {sequence} of {self.source.label} could not be decoded; it was skipped"),
                f"{self.source.label}#{sequence}",
            )
            return
        try:
            jpeg = encode_jpeg(image, self.quality)
        except VideoSourceError as exc:
            await self.dead_letter(exc, f"{self.source.label}#{sequence}")
            return
        height, width = image.shape[:2]
        frame = Frame(
            procedure_id=self.procedure_id,
            patient_id=self.patient_id,
            sequence=sequence,
            captured_at=captured_at,
            source_ts=captured_at,
            width=width,
            height=height,
            image=jpeg,
        )
        await self.producer.send(self.settings.topic(Frame.topic), value=frame.to_bytes(), key=self.key)
        self.published += 1

    async def dead_letter(self, error: BaseException, origin: str) -> None:
        await self.producer.send(
            self.settings.topic(f"dlq.{SERVICE}"),
            value=b"",
            key=self.key,
            headers=dead_letter_headers(service=SERVICE, error=error, source=origin),
        )
