"""Latency and throughput pictures for people who would rather look than read.

:func:`write_latency_summary` draws a PNG with the latency distribution
(p50, p95 and p99 marked) beside the throughput over time, and writes an HTML
page next to it that embeds the PNG and lists the same figures as text. The
demo and the benchmarks call it on their measured latencies.

Percentiles use the nearest rank (numpy's ``nearest`` method), so every
reported value is one that was measured, and they match the demo's text summary.
"""

from __future__ import annotations

import base64
import html
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from crc_medai.errors import CrcMedAiError

logger = logging.getLogger(__name__)

#: Percentiles marked on the latency histogram and listed on the page.
PERCENTILES = (50, 95, 99)

#: Maximum number of bins of the throughput plot, so longer runs get wider bins.
MAX_THROUGHPUT_BINS = 120

#: Bin widths of the throughput plot in seconds, tried from the narrowest.
THROUGHPUT_BIN_WIDTHS_S = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class PictureError(CrcMedAiError):
    """The measurements given to a picture cannot be drawn."""


@dataclass(frozen=True)
class LatencyFigures:
    """Figures a summary picture shows, in milliseconds and results per second."""

    count: int
    min_ms: float
    max_ms: float
    mean_ms: float
    percentiles_ms: dict[int, float]
    completed: int
    span_s: float | None
    mean_per_s: float | None
    peak_per_s: float | None
    bin_s: float | None


def summarize_latency(latencies_ms: Sequence[float], completed_at_s: Sequence[float]) -> LatencyFigures:
    """Compute the percentiles and throughput that :func:`write_latency_summary` draws.

    Raises:
        PictureError: ``latencies_ms`` is empty, a latency is negative, or a value is not a finite number.
    """
    latencies = _checked_array(latencies_ms, "latencies_ms", allow_empty=False, allow_negative=False)
    completions = _checked_array(completed_at_s, "completed_at_s", allow_empty=True, allow_negative=True)

    percentiles = {percent: float(np.percentile(latencies, percent, method="nearest")) for percent in PERCENTILES}
    span_s = float(completions.max() - completions.min()) if completions.size else None
    has_span = span_s is not None and span_s > 0.0
    bin_s, counts = _throughput_bins(completions) if has_span else (None, None)
    return LatencyFigures(
        count=int(latencies.size),
        min_ms=float(latencies.min()),
        max_ms=float(latencies.max()),
        mean_ms=float(latencies.mean()),
        percentiles_ms=percentiles,
        completed=int(completions.size),
        span_s=span_s,
        # Arrival rate: n completions span n - 1 intervals.
        mean_per_s=(completions.size - 1) / span_s if has_span else None,
        peak_per_s=float(counts.max()) / bin_s if counts is not None and bin_s else None,
        bin_s=bin_s,
    )


def write_latency_summary(
    path: Path,
    *,
    title: str,
    latencies_ms: Sequence[float],
    completed_at_s: Sequence[float],
    notes: Sequence[str] = (),
) -> Path:
    """Write a latency and throughput PNG at ``path`` and an HTML page beside it.

    Args:
        path: where the PNG goes, ending in ``.png``. The page goes to the same
            path with ``.html``, and missing folders are created.
        title: heading of the picture and the page.
        latencies_ms: one latency per result, in milliseconds.
        completed_at_s: completion time of each result in seconds from any fixed
            origin (only differences count); may be empty, which leaves the
            throughput plot blank.
        notes: lines shown under the figures on the page, for example what was
            measured and on which machine.

    Returns:
        The PNG path (``path``).

    Raises:
        PictureError: ``path`` does not end in ``.png``, or a measurement is invalid.
    """
    if path.suffix.lower() != ".png":
        raise PictureError(f"invalid picture path {path}: use a name ending in .png, and the HTML page goes beside it")
    figures = summarize_latency(latencies_ms, completed_at_s)

    path.parent.mkdir(parents=True, exist_ok=True)
    _draw(path, title, np.asarray(latencies_ms, dtype=float), np.asarray(completed_at_s, dtype=float), figures)
    page = path.with_suffix(".html")
    page.write_text(_render_page(path, title, figures, notes), encoding="utf-8")

    logger.info("latency picture written png=%s html=%s results=%d", path, page, figures.count)
    return path


def _checked_array(values: Sequence[float], name: str, *, allow_empty: bool, allow_negative: bool) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as exc:
        raise PictureError(f"invalid {name}: pass a flat sequence of numbers ({exc})") from exc
    if array.ndim != 1:
        raise PictureError(f"invalid {name} of shape {array.shape}: pass a flat sequence of numbers")
    if not allow_empty and array.size == 0:
        raise PictureError(f"{name} is empty: pass at least one measurement")

    rule = "a finite number" if allow_negative else "a finite number >= 0"
    bad = [float(value) for value in array if not math.isfinite(value) or (value < 0.0 and not allow_negative)]
    if bad:
        raise PictureError(f"invalid value {bad[0]!r} in {name}: every value must be {rule}")
    return array


def _throughput_bins(completions: np.ndarray) -> tuple[float, np.ndarray]:
    """Count completions per bin of width :func:`_bin_width`, from the first completion."""
    start = completions.min()
    span_s = completions.max() - start
    bin_s = _bin_width(span_s)
    bins = max(1, math.ceil(span_s / bin_s))
    # The last completion can lie on the upper edge of the last bin, which np.histogram includes.
    counts, _ = np.histogram(completions - start, bins=bins, range=(0.0, bins * bin_s))
    return bin_s, counts


def _bin_width(span_s: float) -> float:
    """Pick 1 s bins where they fit, narrower ones for runs under 10 s and wider ones beyond MAX_THROUGHPUT_BINS."""
    narrowest = min(1.0, span_s / 10.0)
    for width in THROUGHPUT_BIN_WIDTHS_S:
        if width >= narrowest and span_s / width <= MAX_THROUGHPUT_BINS:
            return width
    return float(math.ceil(span_s / MAX_THROUGHPUT_BINS))


def _draw(path: Path, title: str, latencies: np.ndarray, completions: np.ndarray, figures: LatencyFigures) -> None:
    figure = Figure(figsize=(11, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    latency_axes, throughput_axes = figure.subplots(1, 2)
    figure.suptitle(title)

    _draw_latency(latency_axes, latencies, figures)
    _draw_throughput(throughput_axes, completions, figures)

    figure.savefig(path, format="png")


def _draw_latency(axes: Axes, latencies: np.ndarray, figures: LatencyFigures) -> None:
    bins = int(min(50, max(10, math.sqrt(latencies.size))))
    counts, _, _ = axes.hist(latencies, bins=bins, color="#4c72b0", alpha=0.8)
    for (percent, value), color in zip(figures.percentiles_ms.items(), ("#2ca02c", "#ff7f0e", "#d62728"), strict=True):
        axes.axvline(value, color=color, linestyle="--", linewidth=1.5, label=f"p{percent} {value:.1f} ms")
    axes.set_title(f"latency of {figures.count} results")
    axes.set_xlabel("latency (ms)")
    axes.set_ylabel("results")
    # Headroom above the tallest bar gives the legend a place that hides no bar.
    axes.set_ylim(0.0, counts.max() * 1.35)
    axes.legend(loc="best")


def _draw_throughput(axes: Axes, completions: np.ndarray, figures: LatencyFigures) -> None:
    axes.set_xlabel("time since first result (s)")
    axes.set_ylabel("results per second")
    if figures.bin_s is None:
        axes.set_title("throughput")
        axes.text(0.5, 0.5, "fewer than two completion times", ha="center", va="center", transform=axes.transAxes)
        return

    bin_s, counts = _throughput_bins(completions)
    edges = np.arange(counts.size + 1) * bin_s
    rates = counts / bin_s
    axes.stairs(rates, edges, color="#55a868", linewidth=2.0, label="per bin")
    axes.axhline(figures.mean_per_s, color="#333333", linestyle="--", label=f"mean {figures.mean_per_s:.1f}/s")
    # Headroom above the peak keeps the legend off the line.
    axes.set_ylim(0.0, max(rates.max(), figures.mean_per_s) * 1.3)
    axes.set_title(f"throughput ({bin_s:g} s bins)")
    axes.legend(loc="upper right")


def _render_page(png: Path, title: str, figures: LatencyFigures, notes: Sequence[str]) -> str:
    image = base64.b64encode(png.read_bytes()).decode("ascii")
    rows = [
        ("results", str(figures.count)),
        *((f"p{percent} latency", f"{value:.1f} ms") for percent, value in figures.percentiles_ms.items()),
        ("min / mean / max latency", f"{figures.min_ms:.1f} / {figures.mean_ms:.1f} / {figures.max_ms:.1f} ms"),
        ("completion span", _optional(figures.span_s, "{:.1f} s")),
        ("mean throughput", _optional(figures.mean_per_s, "{:.1f} results/s")),
        ("peak throughput", _optional(figures.peak_per_s, "{:.1f} results/s") + _bin_note(figures.bin_s)),
    ]
    table = "\n".join(f"<tr><th>{html.escape(name)}</th><td>{html.escape(value)}</td></tr>" for name, value in rows)
    note_items = "\n".join(f"<li>{html.escape(note)}</li>" for note in notes)
    escaped_title = html.escape(title)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{escaped_title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }}
th, td {{ text-align: left; padding: 0.2em 1em 0.2em 0; }}
img {{ max-width: 100%; }}
</style>
</head>
<body>
<h1>{escaped_title}</h1>
<img src="data:image/png;base64,{image}" alt="latency histogram with p50, p95 and p99 marked, and throughput over time">
<table>
{table}
</table>
<p>Percentiles are nearest-rank values of the measured latencies. Image file: {html.escape(png.name)}</p>
<ul>
{note_items}
</ul>
</body>
</html>
"""


def _optional(value: float | None, template: str) -> str:
    return "n/a" if value is None else template.format(value)


def _bin_note(bin_s: float | None) -> str:
    return "" if bin_s is None else f" (in {bin_s:g} s bins)"
