"""Latency and throughput picture: PNG and HTML page with the measured figures."""

from __future__ import annotations

import base64
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import matplotlib.image
import pytest

from crc_medai.demo import Results, write_demo_picture
from crc_medai.picture import PictureError, summarize_latency, write_latency_summary
from crc_medai.settings import Settings
from schemas.messages import DetectionResult, ModelRef

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_summary_percentiles_nearest_rank() -> None:
    figures = summarize_latency([50.0, 10.0, 40.0, 20.0, 30.0], [])

    assert figures.count == 5
    assert figures.percentiles_ms == {50: 30.0, 95: 50.0, 99: 50.0}
    assert figures.min_ms == 10.0
    assert figures.max_ms == 50.0
    assert figures.mean_ms == 30.0


def test_summary_throughput_per_second_bins() -> None:
    figures = summarize_latency([1.0] * 7, [10.0, 10.5, 11.2, 11.4, 11.9, 13.0, 20.0])

    assert figures.completed == 7
    assert figures.span_s == 10.0
    assert figures.bin_s == 1.0
    assert figures.mean_per_s == pytest.approx(0.6)
    assert figures.peak_per_s == 3.0


def test_summary_short_burst_uses_narrow_bins() -> None:
    completions = [index / 100.0 for index in range(81)]

    figures = summarize_latency([1.0] * len(completions), completions)

    assert figures.bin_s == 0.1
    assert figures.mean_per_s == pytest.approx(100.0)
    assert figures.peak_per_s == pytest.approx(110.0)
    assert figures.peak_per_s >= figures.mean_per_s


def test_summary_long_run_widens_bins() -> None:
    completions = [float(second) for second in range(0, 601)]

    figures = summarize_latency([1.0] * len(completions), completions)

    assert figures.bin_s == 5.0
    assert figures.peak_per_s == pytest.approx(1.2)


def test_summary_accepts_negative_completion_times() -> None:
    figures = summarize_latency([1.0] * 3, [-2.0, -1.0, 8.0])

    assert figures.span_s == 10.0
    assert figures.mean_per_s == pytest.approx(0.2)


def test_summary_without_span_has_no_throughput() -> None:
    figures = summarize_latency([5.0, 6.0], [4.0])

    assert figures.span_s == 0.0
    assert figures.mean_per_s is None
    assert figures.peak_per_s is None
    assert figures.bin_s is None


def test_write_png_and_html(tmp_path: Path) -> None:
    path = tmp_path / "run" / "latency.png"
    latencies = [12.0 + index % 7 for index in range(100)] + [95.0]
    completions = [index / 30.0 for index in range(101)]

    written = write_latency_summary(
        path,
        title="Detection <demo> latency",
        latencies_ms=latencies,
        completed_at_s=completions,
        notes=["capture to result published", "2-core machine & local stack"],
    )

    assert written == path
    png = path.read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    height, width, _ = matplotlib.image.imread(path).shape
    assert width > 500
    assert height > 200

    page = path.with_suffix(".html").read_text(encoding="utf-8")
    assert "<h1>Detection &lt;demo&gt; latency</h1>" in page
    assert "<tr><th>results</th><td>101</td></tr>" in page
    assert "<tr><th>p50 latency</th><td>15.0 ms</td></tr>" in page
    assert "<tr><th>p95 latency</th><td>18.0 ms</td></tr>" in page
    assert "<tr><th>p99 latency</th><td>18.0 ms</td></tr>" in page
    assert "12.0 / 15.7 / 95.0 ms" in page
    assert "<li>2-core machine &amp; local stack</li>" in page
    embedded = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert embedded is not None
    assert base64.b64decode(embedded.group(1)) == png


def test_write_without_completion_times(tmp_path: Path) -> None:
    path = tmp_path / "latency.png"

    write_latency_summary(path, title="one result", latencies_ms=[42.0], completed_at_s=[])

    assert path.read_bytes().startswith(PNG_SIGNATURE)
    page = path.with_suffix(".html").read_text(encoding="utf-8")
    assert "<tr><th>mean throughput</th><td>n/a</td></tr>" in page


@pytest.mark.parametrize(
    ("latencies", "completions", "message"),
    [
        ([], [], "latencies_ms is empty"),
        ([1.0, float("nan")], [], "invalid value nan in latencies_ms"),
        ([1.0, -2.0], [], "invalid value -2.0 in latencies_ms"),
        ([1.0], [float("inf")], "invalid value inf in completed_at_s"),
        ([[1.0, 2.0]], [], "pass a flat sequence of numbers"),
        ([1.0], [[0.0], [1.0, 2.0]], "invalid completed_at_s: pass a flat sequence of numbers"),
        ([1.0], ["soon"], "invalid completed_at_s: pass a flat sequence of numbers"),
    ],
    ids=["empty", "nan", "negative", "infinite-completion", "nested", "ragged-completions", "text-completion"],
)
def test_invalid_measurements_rejected(latencies: list, completions: list, message: str, tmp_path: Path) -> None:
    path = tmp_path / "latency.png"

    with pytest.raises(PictureError, match=message):
        write_latency_summary(path, title="bad", latencies_ms=latencies, completed_at_s=completions)

    assert not path.exists()


def test_path_must_be_png(tmp_path: Path) -> None:
    with pytest.raises(PictureError, match=r"use a name ending in \.png"):
        write_latency_summary(tmp_path / "latency.svg", title="t", latencies_ms=[1.0], completed_at_s=[0.0, 1.0])


def detection(sequence: int, captured_at: datetime, latency_ms: float) -> DetectionResult:
    return DetectionResult(
        frame_event_id=uuid.uuid4(),
        procedure_id="proc-picture",
        sequence=sequence,
        captured_at=captured_at,
        source_ts=captured_at + timedelta(milliseconds=latency_ms),
        polyp_probability=0.1,
        flagged=False,
        model=ModelRef(name="polyp-unet", version="1.2.3"),
        inference_ms=5.0,
    )


def test_demo_picture_from_detections(tmp_path: Path) -> None:
    settings = Settings(output_dir=tmp_path / "demo-run", topic_prefix="demo-picture.")
    start = datetime(2026, 1, 1, tzinfo=UTC)
    latencies = [20.0, 30.0, 40.0, 50.0, 60.0]
    results = Results(
        detections=[
            detection(index, start + timedelta(seconds=index / 2), latency) for index, latency in enumerate(latencies)
        ]
    )

    picture = write_demo_picture(settings, results, realtime=True)

    assert picture == tmp_path / "demo-run" / "latency.png"
    assert picture.read_bytes().startswith(PNG_SIGNATURE)
    page = picture.with_suffix(".html").read_text(encoding="utf-8")
    assert "<tr><th>p50 latency</th><td>40.0 ms</td></tr>" in page
    assert "5 results read back from demo-picture.detections" in page
    assert "detection model polyp-unet 1.2.3" in page


def test_demo_picture_skipped_on_clock_step(tmp_path: Path) -> None:
    settings = Settings(output_dir=tmp_path / "demo-run")
    results = Results(detections=[detection(0, datetime(2026, 1, 1, tzinfo=UTC), -3.0)])

    assert write_demo_picture(settings, results, realtime=False) is None
    assert not (tmp_path / "demo-run" / "latency.png").exists()


def test_demo_picture_skipped_without_detections(tmp_path: Path) -> None:
    settings = Settings(output_dir=tmp_path / "demo-run")

    assert write_demo_picture(settings, Results(), realtime=True) is None
