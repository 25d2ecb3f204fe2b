"""Frame producer: sources, options, unreadable frames, reconnection and bad video files."""

from __future__ import annotations

import asyncio
from pathlib import Path

import cv2
import numpy as np
import pytest

from crc_medai.kafka import collect_records
from crc_medai.settings import Settings
from producers.frames import (
    CaptureOptions,
    CaptureOptionsError,
    FrameReader,
    SourceDisconnectedError,
    TruncatedVideoError,
    UnsupportedVideoError,
    VideoSource,
    VideoSourceError,
    encode_jpeg,
    publish_video,
)
from schemas.messages import Frame


def write_video(path: Path, frames: int = 12, size: tuple[int, int] = (96, 64), fourcc: str = "MJPG") -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10.0, size)
    assert writer.isOpened()
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8))
    writer.release()
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


class ScriptedCapture:
    """An OpenCV-like capture that plays a script: an array is a frame, None an unreadable one, 'drop' a lost link."""

    def __init__(self, script: list) -> None:
        self.script = list(script)
        self.released = False

    def get(self, prop: int) -> float:
        return 30.0 if prop == cv2.CAP_PROP_FPS else -1.0

    def grab(self) -> bool:
        if not self.script or isinstance(self.script[0], str):
            if self.script:
                self.script.pop(0)
            return False
        return True

    def retrieve(self) -> tuple[bool, np.ndarray | None]:
        item = self.script.pop(0)
        return item is not None, item

    def release(self) -> None:
        self.released = True


IMAGE = np.full((48, 64, 3), 120, dtype=np.uint8)


@pytest.mark.parametrize(
    ("value", "kind", "target", "label"),
    [
        ("0", "camera", 0, "camera 0"),
        (2, "camera", 2, "camera 2"),
        (
            "rtsp://user:secret@10.0.0.5:554/live?token=x",
            "stream",
            "rtsp://user:secret@10.0.0.5:554/live?token=x",
            "rtsp://10.0.0.5:554/live",
        ),
        ("http://tower-3/video.mjpg", "stream", "http://tower-3/video.mjpg", "http://tower-3/video.mjpg"),
        ("videos/case 1.mp4", "file", "videos/case 1.mp4", "case 1.mp4"),
    ],
)
def test_source_parse(value: str | int, kind: str, target: str | int, label: str) -> None:
    source = VideoSource.parse(value)

    assert source.kind == kind
    assert source.target == target
    assert source.label == label
    assert "secret" not in source.label
    assert source.live == (kind != "file")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"jpeg_quality": 0}, "jpeg_quality=0"),
        ({"jpeg_quality": 101}, "jpeg_quality=101"),
        ({"width": 0}, "width=0"),
        ({"height": 9000}, "height=9000"),
        ({"max_frames": -1}, "max_frames=-1"),
        ({"reconnect_attempts": -2}, "reconnect_attempts=-2"),
    ],
)
def test_options_out_of_range(options: dict, message: str) -> None:
    with pytest.raises(CaptureOptionsError, match=message):
        CaptureOptions(**options)


def test_output_size_keeps_aspect() -> None:
    assert CaptureOptions(width=320).output_size(640, 480) == (320, 240)
    assert CaptureOptions(height=120).output_size(640, 480) == (160, 120)
    assert CaptureOptions(width=100, height=100).output_size(640, 480) == (100, 100)
    assert CaptureOptions().output_size(640, 480) == (640, 480)


def test_file_frames_resized(tmp_path: Path) -> None:
    video = write_video(tmp_path / "clip.avi", frames=12)
    reader = FrameReader(VideoSource.parse(video), CaptureOptions(width=48, max_frames=5))

    frames = list(reader)
    reader.close()

    assert [index for index, _ in frames] == [0, 1, 2, 3, 4]
    assert all(image.shape == (32, 48, 3) for _, image in frames)
    assert reader.fps == 10.0
    assert reader.stats.end_reason == "max frames (5)"


def test_jpeg_quality_changes_size() -> None:
    image = np.random.default_rng(1).integers(0, 255, size=(64, 96, 3), dtype=np.uint8)

    low = encode_jpeg(image, 10)
    high = encode_jpeg(image, 95)

    assert len(low) < len(high)
    assert cv2.imdecode(np.frombuffer(low, np.uint8), cv2.IMREAD_COLOR).shape == (64, 96, 3)


def test_missing_file_named(tmp_path: Path) -> None:
    with pytest.raises(VideoSourceError, match="not found"):
        FrameReader(VideoSource.parse(tmp_path / "absent.mp4"))


def test_unsupported_file(tmp_path: Path) -> None:
    fake = tmp_path / "notes.mp4"
    fake.write_text("these are notes, not a video")

    with pytest.raises(UnsupportedVideoError, match="re-encode"):
        FrameReader(VideoSource.parse(fake))


def test_truncated_mp4_rejected_at_open(tmp_path: Path) -> None:
    # OpenCV's mp4v writer puts the index (moov atom) last, so the first half cannot be opened.
    video = truncate(write_video(tmp_path / "clip.mp4", fourcc="mp4v"))

    with pytest.raises(TruncatedVideoError, match="MP4/QuickTime file but OpenCV cannot read it"):
        FrameReader(VideoSource.parse(video))


def test_truncated_avi_rejected_after_frames(tmp_path: Path) -> None:
    video = truncate(write_video(tmp_path / "clip.avi", frames=12, fourcc="MJPG"))
    reader = FrameReader(VideoSource.parse(video))
    frames = []

    with pytest.raises(TruncatedVideoError, match="of the 12 frames its header declares"):
        frames.extend(reader)
    assert 0 < len(frames) < 12
    assert reader.stats.end_reason == "truncated"


def test_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")

    with pytest.raises(TruncatedVideoError, match="0 bytes"):
        FrameReader(VideoSource.parse(empty))


def test_unreadable_frame_counted() -> None:
    capture = ScriptedCapture([IMAGE, None, IMAGE])
    reader = FrameReader(VideoSource("file", "scripted.avi"), opener=lambda source: capture)

    frames = list(reader)

    assert [(index, image is None) for index, image in frames] == [(0, False), (1, True), (2, False)]
    assert reader.stats.frames_unreadable == 1
    assert reader.stats.frames_read == 2
    assert reader.stats.end_reason == "end of stream"


def test_live_source_reconnects() -> None:
    captures = iter([ScriptedCapture([IMAGE, "drop"]), ScriptedCapture([IMAGE, IMAGE])])
    waits: list[float] = []
    reader = FrameReader(
        VideoSource.parse(0),
        CaptureOptions(max_frames=3, reconnect_backoff_s=0.25),
        opener=lambda source: next(captures),
        sleep=waits.append,
    )

    frames = list(reader)

    assert [index for index, _ in frames] == [0, 1, 2]
    assert reader.stats.reconnects == 1
    assert waits == [0.25]


def test_live_source_gives_up() -> None:
    opened = [ScriptedCapture([IMAGE, "drop"])]

    def opener(source: VideoSource) -> ScriptedCapture:
        if opened:
            return opened.pop()
        raise VideoSourceError("camera 0 cannot be opened")

    waits: list[float] = []
    reader = FrameReader(
        VideoSource.parse("0"),
        CaptureOptions(reconnect_attempts=3, reconnect_backoff_s=1.0, reconnect_backoff_max_s=1.5),
        opener=opener,
        sleep=waits.append,
    )

    with pytest.raises(SourceDisconnectedError, match="after 3 attempts"):
        list(reader)
    assert waits == [1.0, 1.5, 1.5]
    assert reader.stats.end_reason == "disconnected"


@pytest.mark.integration
def test_publish_with_size_and_quality(settings: Settings, tmp_path: Path) -> None:
    video = write_video(tmp_path / "clip.avi", frames=6, size=(96, 64))
    options = CaptureOptions(width=48, height=32, jpeg_quality=30)

    summary = asyncio.run(publish_video(settings, video, "proc-producer", realtime=False, options=options))
    records = asyncio.run(
        collect_records(settings, ["frames"], until=lambda received: len(received) >= 6, timeout_s=60)
    )

    frames = sorted((Frame.from_bytes(record.value) for record in records), key=lambda frame: frame.sequence)
    assert summary.frames_published == 6
    assert summary.end_reason == "end of stream"
    assert [frame.sequence for frame in frames] == list(range(6))
    assert {(frame.width, frame.height) for frame in frames} == {(48, 32)}
    decoded = cv2.imdecode(np.frombuffer(frames[0].image, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (32, 48, 3)


@pytest.mark.integration
def test_publish_truncated_dead_letters(settings: Settings, tmp_path: Path) -> None:
    video = truncate(write_video(tmp_path / "clip.mp4", fourcc="mp4v"))

    with pytest.raises(TruncatedVideoError):
        asyncio.run(publish_video(settings, video, "proc-producer", realtime=False))
    records = asyncio.run(
        collect_records(settings, ["dlq.frame-producer"], until=lambda received: len(received) >= 1, timeout_s=60)
    )

    assert len(records) == 1
    assert records[0].headers["crc-error-type"] == "TruncatedVideoError"
    assert records[0].headers["crc-origin-source"] == "clip.mp4#open"
    assert "truncated" in records[0].headers["crc-error"]
