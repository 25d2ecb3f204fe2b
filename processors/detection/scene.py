"""Drawing steps of the synthetic endoscopy generator.

The generator works in two coordinate systems. A *world* canvas contains what is
fixed on the colon wall (mucosa texture, vessels, folds, debris, polyps and
their label map). A *camera* view is cut out of the world with an affine warp,
and the camera-fixed effects (light fall-off, lumen, blur, noise, field of
view, on-screen text) are applied to that view. ``synth.py`` composes these
steps into single frames and procedure videos.

Images are float32 BGR arrays in [0, 255] until ``finish_view`` converts them.
Label maps are int32: 0 is mucosa, k > 0 is polyp k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

import cv2
import numpy as np

FloatImage = np.ndarray
LabelMap = np.ndarray


@dataclass(frozen=True)
class MucosaStyle:
    """Colour and texture of the colon wall, fixed for one frame or one procedure."""

    base_bgr: tuple[float, float, float]
    texture_strength: float
    vessel_density: float
    fold_density: float


@dataclass(frozen=True)
class PolypSpec:
    """Shape, colour and relief of one polyp in world pixels."""

    polyp_id: int
    centre: tuple[float, float]
    radius: float
    aspect: float
    rotation: float
    harmonics: tuple[tuple[float, float], ...]
    colour_gain: tuple[float, float, float]
    opacity: float
    relief: float
    pit_strength: float
    pit_cell: int
    light_direction: tuple[float, float]


@dataclass(frozen=True)
class CameraOptics:
    """Camera-fixed appearance: light, lumen, blur, field of view and overlay."""

    exposure: float
    vignetting: float
    light_offset: tuple[float, float]
    lumen: tuple[float, float, float, float] | None
    blur_sigma: float
    noise_sigma: float
    fov_shape: str
    fov_extent: float
    text_corner: str
    text_scale: float
    badge: bool


def sample_mucosa_style(rng: np.random.Generator) -> MucosaStyle:
    """Draw a wall colour between pale pink and deep red."""
    red = rng.uniform(165.0, 230.0)
    green = red * rng.uniform(0.40, 0.62)
    blue = green * rng.uniform(0.80, 1.10)
    return MucosaStyle(
        base_bgr=(blue, green, red),
        texture_strength=rng.uniform(0.06, 0.16),
        vessel_density=rng.uniform(0.3, 1.0),
        fold_density=rng.uniform(0.0, 1.0),
    )


def sample_polyp(
    rng: np.random.Generator,
    polyp_id: int,
    centre: tuple[float, float],
    radius: float,
) -> PolypSpec:
    """Draw a polyp's outline, colour and surface at a given place and size."""
    harmonic_count = int(rng.integers(2, 6))
    lobulation = rng.uniform(0.02, 0.14)
    harmonics = tuple(
        (float(rng.uniform(0.0, lobulation)), float(rng.uniform(0.0, 2.0 * math.pi))) for _ in range(harmonic_count)
    )

    # Polyps differ from the wall by up to 45 % per channel: paler and whiter,
    # redder (congested), or more orange. The gain multiplies the wall colour.
    tint = rng.choice(["pale", "red", "orange"])
    gains = {
        "pale": (rng.uniform(1.10, 1.35), rng.uniform(1.15, 1.45), rng.uniform(1.00, 1.12)),
        "red": (rng.uniform(0.80, 0.95), rng.uniform(0.70, 0.88), rng.uniform(1.00, 1.08)),
        "orange": (rng.uniform(0.75, 0.90), rng.uniform(1.05, 1.25), rng.uniform(1.00, 1.10)),
    }[str(tint)]
    angle = rng.uniform(0.0, 2.0 * math.pi)

    return PolypSpec(
        polyp_id=polyp_id,
        centre=centre,
        radius=radius,
        aspect=rng.uniform(0.7, 1.0),
        rotation=rng.uniform(0.0, 180.0),
        harmonics=harmonics,
        colour_gain=(float(gains[0]), float(gains[1]), float(gains[2])),
        opacity=rng.uniform(0.6, 0.9),
        relief=rng.uniform(0.25, 1.0),
        pit_strength=rng.uniform(0.0, 0.16),
        pit_cell=int(rng.integers(2, 6)),
        light_direction=(math.cos(angle), math.sin(angle)),
    )


def sample_optics(rng: np.random.Generator, size: int) -> CameraOptics:
    """Draw the light, lumen, blur, field of view and overlay of one camera set-up."""
    lumen = None
    if rng.random() < 0.6:
        lumen = (
            rng.uniform(0.2, 0.8) * size,
            rng.uniform(0.2, 0.8) * size,
            rng.uniform(0.08, 0.2) * size,
            rng.uniform(0.45, 0.75),
        )
    fov_shape = str(rng.choice(["circle", "octagon"]))
    fov_extent = rng.uniform(0.47, 0.62) if fov_shape == "circle" else rng.uniform(0.10, 0.22)

    return CameraOptics(
        exposure=rng.uniform(0.85, 1.15),
        vignetting=rng.uniform(0.25, 0.6),
        light_offset=(rng.uniform(-0.12, 0.12) * size, rng.uniform(-0.12, 0.12) * size),
        lumen=lumen,
        blur_sigma=rng.uniform(0.4, 1.1),
        noise_sigma=rng.uniform(1.0, 4.0),
        fov_shape=fov_shape,
        fov_extent=fov_extent,
        text_corner=str(rng.choice(["top-left", "bottom-left", "top-right"])),
        text_scale=rng.uniform(0.28, 0.38) * size / 256.0,
        badge=bool(rng.random() < 0.15),
    )


def value_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> FloatImage:
    """Return smooth noise in about [-1, 1] with features of about ``cell`` pixels."""
    grid = rng.uniform(-1.0, 1.0, size=(height // cell + 2, width // cell + 2)).astype(np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)


def render_mucosa(rng: np.random.Generator, height: int, width: int, style: MucosaStyle, view_size: int) -> FloatImage:
    """Paint the colon wall: coloured noise, blood vessels and folds.

    Args:
        view_size: Width of the camera view in world pixels; folds are sized
            relative to it, so that a large world looks like a small one.
    """
    base = np.array(style.base_bgr, dtype=np.float32)
    shading = 1.0 + style.texture_strength * (
        0.6 * value_noise(rng, height, width, 48) + 0.4 * value_noise(rng, height, width, 12)
    )
    image = shading[..., None] * base[None, None, :]

    # Per-channel drift makes some patches more orange and others more purple.
    for channel in range(3):
        image[..., channel] *= 1.0 + 0.05 * value_noise(rng, height, width, 64)

    _draw_vessels(rng, image, style)
    _draw_folds(rng, image, style, view_size)
    return image


def _draw_vessels(rng: np.random.Generator, image: FloatImage, style: MucosaStyle) -> None:
    height, width = image.shape[:2]
    layer = np.zeros((height, width), dtype=np.float32)
    count = int(style.vessel_density * height * width / 2500)
    steps = 10

    # Each vessel is a random walk: a start point, a slowly turning heading
    # and steps of 4-10 pixels.
    starts = rng.uniform(0.0, 1.0, size=(count, 1, 2)) * np.array([width, height])
    headings = rng.uniform(0.0, 2.0 * math.pi, size=(count, 1)) + np.cumsum(
        rng.normal(0.0, 0.5, size=(count, steps)), axis=1
    )
    lengths = rng.uniform(4.0, 10.0, size=(count, steps))
    moves = np.stack([lengths * np.cos(headings), lengths * np.sin(headings)], axis=2)
    walks = np.concatenate([starts, starts + np.cumsum(moves, axis=1)], axis=1)
    used_steps = rng.integers(4, steps + 1, size=count)
    strengths = rng.uniform(0.3, 1.0, size=count)
    for walk, used, strength in zip(walks, used_steps, strengths, strict=True):
        polyline = np.round(walk[: used + 1]).astype(np.int32)
        cv2.polylines(layer, [polyline], False, float(strength), 1, cv2.LINE_AA)

    layer = cv2.GaussianBlur(layer, (0, 0), 0.6)
    # Vessels darken green and blue more than red, so they look dark red.
    image *= 1.0 - layer[..., None] * np.array([0.35, 0.45, 0.2], dtype=np.float32)


def _draw_folds(rng: np.random.Generator, image: FloatImage, style: MucosaStyle, view_size: int) -> None:
    height, width = image.shape[:2]
    count = int(round(style.fold_density * 1.6 * height * width / view_size**2))
    if count == 0:
        return

    # A haustral fold is a crescent ridge: a lit crest with a soft shadow
    # band on its far side.
    shadow = np.zeros((height, width), dtype=np.float32)
    crest = np.zeros((height, width), dtype=np.float32)
    short_side = view_size
    for _ in range(count):
        centre = (int(rng.uniform(0, width)), int(rng.uniform(0, height)))
        axes = (int(rng.uniform(0.3, 0.9) * short_side), int(rng.uniform(0.15, 0.5) * short_side))
        angle = rng.uniform(0.0, 180.0)
        start = rng.uniform(0.0, 360.0)
        sweep = rng.uniform(50.0, 140.0)
        thickness = int(rng.uniform(0.03, 0.07) * short_side) + 2
        cv2.ellipse(shadow, centre, axes, angle, start, start + sweep, 1.0, thickness, cv2.LINE_AA)
        inner = (max(axes[0] - thickness, 1), max(axes[1] - thickness, 1))
        cv2.ellipse(crest, centre, inner, angle, start, start + sweep, 1.0, max(thickness // 2, 1), cv2.LINE_AA)

    shadow = cv2.GaussianBlur(shadow, (0, 0), max(short_side * 0.025, 1.0))
    crest = cv2.GaussianBlur(crest, (0, 0), max(short_side * 0.01, 1.0))
    image *= (1.0 - 0.3 * np.clip(shadow, 0.0, 1.0))[..., None]
    image *= (1.0 + 0.22 * np.clip(crest, 0.0, 1.0))[..., None]


def render_debris(rng: np.random.Generator, image: FloatImage) -> None:
    """Add polyp-like distractors that are not polyps: stool debris and bubbles."""
    height, width = image.shape[:2]
    if rng.random() < 0.3:
        layer = np.zeros((height, width), dtype=np.float32)
        for _ in range(int(rng.integers(1, 4))):
            centre = np.array([rng.uniform(0, width), rng.uniform(0, height)])
            radius = rng.uniform(3.0, 12.0)
            angles = np.linspace(0.0, 2.0 * math.pi, 16, endpoint=False)
            radii = radius * rng.uniform(0.5, 1.3, size=angles.shape)
            outline = centre + np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
            cv2.fillPoly(layer, [np.round(outline).astype(np.int32)], 1.0, cv2.LINE_AA)
        layer = cv2.GaussianBlur(layer, (0, 0), 1.0)[..., None]
        debris = np.array([60.0, 170.0, 200.0], dtype=np.float32)
        image[:] = image * (1.0 - 0.8 * layer) + debris * 0.8 * layer

    if rng.random() < 0.2:
        layer = np.zeros((height, width), dtype=np.float32)
        for _ in range(int(rng.integers(1, 6))):
            centre = (int(rng.uniform(0, width)), int(rng.uniform(0, height)))
            cv2.circle(layer, centre, int(rng.integers(2, 9)), 1.0, 1, cv2.LINE_AA)
        image += 120.0 * cv2.GaussianBlur(layer, (0, 0), 0.7)[..., None]


def render_specular(rng: np.random.Generator, image: FloatImage, density: float, view_size: int) -> None:
    """Add small white reflections of the light source, in clusters, on the wet surface."""
    height, width = image.shape[:2]
    layer = np.zeros((height, width), dtype=np.float32)
    area_in_views = height * width / view_size**2
    count = int(density * 16 * area_in_views)
    cluster_count = max(int(round(2 * area_in_views)), 1)
    clusters = rng.uniform(0.0, 1.0, size=(cluster_count, 2)) * np.array([width, height])
    spread = 0.12 * view_size
    for _ in range(count):
        centre = clusters[int(rng.integers(0, len(clusters)))] + rng.normal(0.0, spread, size=2)
        axes = (int(rng.integers(1, 4)), int(rng.integers(1, 3)))
        cv2.ellipse(
            layer, (int(centre[0]), int(centre[1])), axes, rng.uniform(0.0, 180.0), 0, 360, 1.0, -1, cv2.LINE_AA
        )
    layer = cv2.GaussianBlur(layer, (0, 0), 0.8)
    image += 255.0 * np.clip(layer, 0.0, 1.0)[..., None]


def polyp_outline(spec: PolypSpec) -> np.ndarray:
    """Return the polyp's outline as an (N, 2) int32 polygon in world pixels."""
    angles = np.linspace(0.0, 2.0 * math.pi, 120, endpoint=False)
    radii = np.ones_like(angles)
    for order, (amplitude, phase) in enumerate(spec.harmonics, start=2):
        radii += amplitude * np.cos(order * angles + phase)
    radii *= spec.radius

    x = radii * np.cos(angles)
    y = radii * np.sin(angles) * spec.aspect
    rotation = math.radians(spec.rotation)
    rotated_x = x * math.cos(rotation) - y * math.sin(rotation)
    rotated_y = x * math.sin(rotation) + y * math.cos(rotation)
    outline = np.stack([rotated_x + spec.centre[0], rotated_y + spec.centre[1]], axis=1)
    return np.round(outline).astype(np.int32)


def render_polyp(rng: np.random.Generator, image: FloatImage, labels: LabelMap, spec: PolypSpec) -> None:
    """Paint a raised polyp with shading, shadow and surface pattern, and label its pixels.

    The polyp is a dome over its outline. Its surface normal is lit from
    ``spec.light_direction`` (Lambert shading), so one flank is brighter and the
    other darker, and it casts a soft shadow on the wall on the far side.
    """
    outline = polyp_outline(spec)
    margin = int(spec.radius * 0.6) + 8
    left = max(int(outline[:, 0].min()) - margin, 0)
    top = max(int(outline[:, 1].min()) - margin, 0)
    right = min(int(outline[:, 0].max()) + margin + 1, image.shape[1])
    bottom = min(int(outline[:, 1].max()) + margin + 1, image.shape[0])
    if right <= left or bottom <= top:
        return

    # Work on the polyp's neighbourhood only; slices are views, so the world
    # image and label map change in place.
    patch = image[top:bottom, left:right]
    patch_labels = labels[top:bottom, left:right]
    height, width = patch.shape[:2]
    footprint = np.zeros((height, width), dtype=np.uint8)
    cv2.fillPoly(footprint, [outline - np.array([left, top], dtype=np.int32)], 1)
    if not footprint.any():
        return

    # Height map: distance to the edge, shaped into a dome that is flat on top.
    distance = cv2.distanceTransform(footprint, cv2.DIST_L2, 5)
    dome = distance / max(float(distance.max()), 1.0)
    dome = 1.0 - (1.0 - dome) ** 2
    dome = cv2.GaussianBlur(dome, (0, 0), max(spec.radius * 0.08, 0.8))

    slope_x = cv2.Sobel(dome, cv2.CV_32F, 1, 0, ksize=3) / 8.0
    slope_y = cv2.Sobel(dome, cv2.CV_32F, 0, 1, ksize=3) / 8.0
    relief = spec.relief * spec.radius * 0.6
    light_x, light_y = spec.light_direction
    light = np.array([0.35 * light_x, 0.35 * light_y, 1.0])
    light /= np.linalg.norm(light)
    normal_x, normal_y = -slope_x * relief, -slope_y * relief
    norm = np.sqrt(normal_x**2 + normal_y**2 + 1.0)
    lambert = (normal_x * light[0] + normal_y * light[1] + light[2]) / (norm * light[2])

    # Shadow: the footprint shifted away from the light, outside the polyp.
    shift = spec.relief * spec.radius * 0.25
    transform = np.float32([[1, 0, -light_x * shift], [0, 1, -light_y * shift]])
    shadow = cv2.warpAffine(footprint.astype(np.float32), transform, (width, height))
    shadow = cv2.GaussianBlur(shadow, (0, 0), max(spec.radius * 0.15, 1.0)) * (1 - footprint)
    patch *= (1.0 - 0.35 * spec.relief * shadow)[..., None]

    # Colour: wall colour times the polyp's gain, with its own pit pattern,
    # blended over the wall with a soft edge so that wall texture shows through.
    edge = cv2.GaussianBlur(footprint.astype(np.float32), (0, 0), 1.2)
    pits = 1.0 + spec.pit_strength * value_noise(rng, height, width, spec.pit_cell)
    polyp_colour = patch * np.array(spec.colour_gain, dtype=np.float32) * pits[..., None]
    alpha = (spec.opacity * edge)[..., None]
    patch[:] = patch * (1.0 - alpha) + polyp_colour * alpha
    lit = np.where(footprint > 0, np.clip(lambert, 0.55, 1.4), 1.0).astype(np.float32)
    patch *= cv2.GaussianBlur(lit, (0, 0), 0.8)[..., None]

    _render_polyp_highlight(rng, patch, spec, dome)
    patch_labels[footprint > 0] = spec.polyp_id


def _render_polyp_highlight(rng: np.random.Generator, image: FloatImage, spec: PolypSpec, dome: FloatImage) -> None:
    if rng.random() < 0.3:
        return
    tops = np.argwhere(dome > 0.8)
    if len(tops) == 0:
        return
    layer = np.zeros(image.shape[:2], dtype=np.float32)
    for _ in range(int(rng.integers(1, 4))):
        y, x = tops[int(rng.integers(0, len(tops)))]
        axes = (max(int(spec.radius * rng.uniform(0.04, 0.12)), 1), max(int(spec.radius * rng.uniform(0.03, 0.08)), 1))
        cv2.ellipse(layer, (int(x), int(y)), axes, rng.uniform(0.0, 180.0), 0, 360, 1.0, -1, cv2.LINE_AA)
    image += 230.0 * cv2.GaussianBlur(layer, (0, 0), 0.8)[..., None]


def camera_transform(centre: tuple[float, float], angle_degrees: float, scale: float, size: int) -> np.ndarray:
    """Return the 2x3 map from view pixels to world pixels for ``cv2.WARP_INVERSE_MAP``.

    The view is ``size`` x ``size`` and shows the world around ``centre``,
    rotated by ``angle_degrees`` and magnified by ``1 / scale``.
    """
    cos = scale * math.cos(math.radians(angle_degrees))
    sin = scale * math.sin(math.radians(angle_degrees))
    half = size / 2.0
    return np.array(
        [
            [cos, -sin, centre[0] - cos * half + sin * half],
            [sin, cos, centre[1] - sin * half - cos * half],
        ],
        dtype=np.float64,
    )


def cut_view(world: FloatImage, labels: LabelMap, transform: np.ndarray, size: int) -> tuple[FloatImage, LabelMap]:
    """Cut the camera view out of the world image and its label map."""
    flags = cv2.WARP_INVERSE_MAP
    view = cv2.warpAffine(world, transform, (size, size), flags=cv2.INTER_LINEAR | flags, borderMode=cv2.BORDER_REFLECT)
    view_labels = cv2.warpAffine(
        labels.astype(np.float32),
        transform,
        (size, size),
        flags=cv2.INTER_NEAREST | flags,
        borderMode=cv2.BORDER_CONSTANT,
    )
    return view, view_labels.astype(np.int32)


def apply_lighting(view: FloatImage, optics: CameraOptics) -> None:
    """Apply exposure, light fall-off towards the edges and the dark lumen."""
    size = view.shape[0]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    centre_x = size / 2.0 + optics.light_offset[0]
    centre_y = size / 2.0 + optics.light_offset[1]
    radius = np.sqrt((xs - centre_x) ** 2 + (ys - centre_y) ** 2) / (0.75 * size)
    gain = optics.exposure * (1.0 - optics.vignetting * np.clip(radius, 0.0, 1.3) ** 2)

    if optics.lumen is not None:
        lumen_x, lumen_y, lumen_sigma, depth = optics.lumen
        distance2 = (xs - lumen_x) ** 2 + (ys - lumen_y) ** 2
        gain *= 1.0 - depth * np.exp(-distance2 / (2.0 * lumen_sigma**2))

    view *= np.clip(gain, 0.05, 2.0)[..., None]


def apply_motion_blur(view: FloatImage, length: int, angle_degrees: float) -> FloatImage:
    """Smear the view along a line of ``length`` pixels, as a fast camera move does."""
    kernel = np.zeros((length, length), dtype=np.float32)
    kernel[length // 2, :] = 1.0
    rotation = cv2.getRotationMatrix2D(((length - 1) / 2.0, (length - 1) / 2.0), angle_degrees, 1.0)
    kernel = cv2.warpAffine(kernel, rotation, (length, length))
    kernel /= max(float(kernel.sum()), 1e-6)
    return cv2.filter2D(view, -1, kernel, borderType=cv2.BORDER_REFLECT)


def field_of_view(size: int, optics: CameraOptics) -> np.ndarray:
    """Return the bool mask of the lens's field of view: a circle or an octagon."""
    fov = np.zeros((size, size), dtype=np.uint8)
    if optics.fov_shape == "circle":
        radius = int(round(optics.fov_extent * size))
        cv2.circle(fov, (size // 2, size // 2), radius, 1, -1, cv2.LINE_8)
    else:
        cut = int(round(optics.fov_extent * size))
        last = size - 1
        corners = [
            (cut, 0),
            (last - cut, 0),
            (last, cut),
            (last, last - cut),
            (last - cut, last),
            (cut, last),
            (0, last - cut),
            (0, cut),
        ]
        cv2.fillPoly(fov, [np.array(corners, dtype=np.int32)], 1)
    return fov.astype(bool)


def finish_view(rng: np.random.Generator, view: FloatImage, optics: CameraOptics, fov: np.ndarray) -> np.ndarray:
    """Soften, add sensor noise, black out everything outside the field of view and return uint8."""
    view = cv2.GaussianBlur(view, (0, 0), optics.blur_sigma)
    view += optics.noise_sigma * rng.standard_normal(size=view.shape, dtype=np.float32)
    image = np.clip(view, 0.0, 255.0).astype(np.uint8)
    image[~fov] = rng.integers(0, 4, size=(int((~fov).sum()), 3), dtype=np.uint8)
    return image


def burn_overlay(image: np.ndarray, optics: CameraOptics, timestamp: datetime, procedure_code: str) -> np.ndarray:
    """Burn date, time and procedure code into a corner, as endoscopy towers do.

    Returns:
        Bool mask of the pixels the overlay changed; they are never polyp pixels.
    """
    size = image.shape[0]
    lines = [procedure_code, timestamp.strftime("%Y/%m/%d"), timestamp.strftime("%H:%M:%S")]
    font = cv2.FONT_HERSHEY_SIMPLEX
    line_height = int(round(26 * optics.text_scale)) + 2
    margin = max(size // 64, 2)

    overlay = np.zeros(image.shape[:2], dtype=np.uint8)
    for index, text in enumerate(lines):
        (text_width, text_height), _ = cv2.getTextSize(text, font, optics.text_scale, 1)
        if optics.text_corner == "top-right":
            x = size - margin - text_width
        else:
            x = margin
        if optics.text_corner == "bottom-left":
            y = size - margin - (len(lines) - 1 - index) * line_height
        else:
            y = margin + text_height + index * line_height
        cv2.putText(overlay, text, (x, y), font, optics.text_scale, 255, 1, cv2.LINE_AA)

    alpha = (overlay.astype(np.float32) / 255.0)[..., None]
    text_colour = np.array([235, 235, 235], dtype=np.float32)
    blended = image.astype(np.float32) * (1.0 - alpha) + text_colour * alpha
    image[:] = np.clip(blended, 0, 255).astype(np.uint8)
    changed = overlay > 0

    if optics.badge:
        # A solid status box in the opposite corner, like the coloured
        # indicators some towers draw.
        badge_size = size // 7
        left = size - badge_size - margin if optics.text_corner != "top-right" else margin
        top = size - badge_size - margin
        image[top : top + badge_size, left : left + badge_size] = (150, 170, 30)
        changed[top : top + badge_size, left : left + badge_size] = True
    return changed
