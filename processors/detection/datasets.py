"""Loaders for polyp segmentation data sets in the layouts users bring.

Supported layouts, detected from the folder names:

- Kvasir-SEG: ``images/`` and ``masks/`` with files of the same stem.
- CVC-ClinicDB: ``Original/`` and ``Ground Truth/`` with files of the same stem.

Masks are read as grayscale; pixels above 127 are polyp.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from processors.detection.errors import DatasetLayoutError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
#: (image folder, mask folder) of each supported layout.
LAYOUTS: dict[str, tuple[str, str]] = {
    "kvasir-seg": ("images", "masks"),
    "cvc-clinicdb": ("Original", "Ground Truth"),
}


@dataclass(frozen=True)
class LabelledFrame:
    """One frame of a data set with its ground-truth mask."""

    name: str
    image: np.ndarray
    """BGR uint8 (height, width, 3)."""
    mask: np.ndarray
    """bool (height, width), True on polyp pixels, at the image size."""


def detect_layout(root: Path) -> str:
    """Return the name of the layout of ``root``, one of ``LAYOUTS``.

    Raises:
        DatasetLayoutError: No supported pair of folders is present.
    """
    for layout, (image_folder, mask_folder) in LAYOUTS.items():
        if (root / image_folder).is_dir() and (root / mask_folder).is_dir():
            return layout
    expected = ", ".join(f"{images}/ + {masks}/" for images, masks in LAYOUTS.values())
    raise DatasetLayoutError(f"data set folder {root} has no supported layout; expected one of: {expected}")


def iter_labelled_frames(root: Path) -> Iterator[LabelledFrame]:
    """Yield every image with its mask, sorted by file name.

    Raises:
        DatasetLayoutError: The layout is unknown, an image has no mask, or a
            file cannot be decoded.
    """
    root = Path(root)
    image_folder, mask_folder = LAYOUTS[detect_layout(root)]
    masks_by_stem = {path.stem: path for path in _image_files(root / mask_folder)}
    images = _image_files(root / image_folder)
    if not images:
        raise DatasetLayoutError(
            f"data set folder {root / image_folder} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )

    for image_path in images:
        mask_path = masks_by_stem.get(image_path.stem)
        if mask_path is None:
            raise DatasetLayoutError(
                f"image {image_path} has no mask named {image_path.stem}.* in {root / mask_folder}"
            )
        image = _read(image_path, cv2.IMREAD_COLOR)
        mask = _read(mask_path, cv2.IMREAD_GRAYSCALE)
        if mask.shape != image.shape[:2]:
            # Some exports store masks a few pixels off the image size.
            mask = cv2.resize(mask, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
        yield LabelledFrame(name=image_path.name, image=image, mask=mask > 127)


def _image_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)


def _read(path: Path, flags: int) -> np.ndarray:
    image = cv2.imread(str(path), flags)
    if image is None:
        raise DatasetLayoutError(
            f"file {path} could not be decoded as an image; check that it is a readable PNG, JPEG, TIFF or BMP"
        )
    return image
