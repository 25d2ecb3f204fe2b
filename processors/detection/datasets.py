"""Loaders for polyp segmentation data sets in the layouts users bring.

Supported layouts, detected from the folder names:

- Kvasir-SEG: ``images/`` and ``masks/`` with files of the same stem.
- CVC-ClinicDB: ``Original/`` and ``Ground Truth/`` with files of the same stem.

Masks are read as grayscale; pixels above 127 are polyp.

Frames of one video sequence look alike, so a held-out split must keep each
sequence on one side (``split_by_sequence``). CVC-ClinicDB frames come from
video sequences that its file names do not tell, so the user passes a CSV file
that maps each frame to its sequence.

NOTE: Kvasir-SEG publishes no sequence or patient ids, so without a map each
of its images counts as its own sequence. Images of one examination can then
land on both sides of a split.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from sklearn.model_selection import GroupShuffleSplit

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
    if not root.is_dir():
        raise DatasetLayoutError(f"data set folder {root} does not exist or is not a folder")
    for layout, (image_folder, mask_folder) in LAYOUTS.items():
        if (root / image_folder).is_dir() and (root / mask_folder).is_dir():
            return layout
        if (root / image_folder).is_dir():
            raise DatasetLayoutError(
                f"data set folder {root} has {image_folder}/ but no {mask_folder}/ beside it; "
                f"put the masks, named like the images, in {root / mask_folder}"
            )
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


def read_sequence_map(path: Path) -> dict[str, str]:
    """Read a CSV file with a header and the columns ``name`` (frame file name) and ``sequence``.

    Raises:
        DatasetLayoutError: The file cannot be read, lacks a column, or names a frame twice.
    """
    try:
        # utf-8-sig also reads the byte-order mark that spreadsheet programs write.
        with Path(path).open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = {"name", "sequence"} - set(reader.fieldnames or [])
            if missing:
                raise DatasetLayoutError(
                    f"sequence map {path} lacks the column(s) {', '.join(sorted(missing))}; "
                    "write a header line 'name,sequence'"
                )
            mapping: dict[str, str] = {}
            for line, row in enumerate(reader, start=2):
                name, sequence = (row["name"] or "").strip(), (row["sequence"] or "").strip()
                if not name or not sequence:
                    raise DatasetLayoutError(f"sequence map {path} line {line} has an empty name or sequence")
                if name in mapping:
                    raise DatasetLayoutError(f"sequence map {path} names frame {name} twice (line {line})")
                mapping[name] = sequence
    except OSError as exc:
        raise DatasetLayoutError(f"sequence map {path} could not be read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise DatasetLayoutError(
            f"sequence map {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8 CSV"
        ) from exc
    return mapping


def frame_sequences(root: Path, names: Sequence[str], sequence_map: dict[str, str] | None = None) -> list[str]:
    """Return the sequence of each frame of the data set at ``root``, in the order of ``names``.

    With a map, every frame must be in it, by file name or by stem. Without
    one, each Kvasir-SEG image counts as its own sequence.

    Raises:
        DatasetLayoutError: A frame is missing from the map, or the layout
            needs a map and none was given.
    """
    if sequence_map is not None:
        sequences = []
        for name in names:
            sequence = sequence_map.get(name, sequence_map.get(Path(name).stem))
            if sequence is None:
                raise DatasetLayoutError(
                    f"frame {name} is missing from the sequence map; add a line '{name},<sequence>'"
                )
            sequences.append(sequence)
        return sequences
    layout = detect_layout(Path(root))
    if layout == "kvasir-seg":
        return [Path(name).stem for name in names]
    raise DatasetLayoutError(
        f"the frames of {root} ({layout}) come from video sequences that their file names do not tell; "
        "pass a sequence map (CSV with the columns name,sequence) so that no sequence ends up on both sides"
    )


def split_by_sequence(sequences: Sequence[str], held_out_share: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Split frame indices into a training and a held-out side, keeping each sequence on one side.

    The held-out side receives about ``held_out_share`` of the sequences
    (scikit-learn's ``GroupShuffleSplit``), so its share of frames varies
    with the sequence lengths.

    Raises:
        DatasetLayoutError: The share is not between 0 and 1, or there are
            fewer than 2 sequences to split.
    """
    if not 0.0 < held_out_share < 1.0:
        raise DatasetLayoutError(f"held-out share {held_out_share} is invalid; use a fraction between 0 and 1")
    if len(set(sequences)) < 2:
        raise DatasetLayoutError(
            f"the data set has {len(set(sequences))} sequence(s); a split needs at least 2, one for each side"
        )
    splitter = GroupShuffleSplit(n_splits=1, test_size=held_out_share, random_state=seed)
    try:
        training, held_out = next(splitter.split(np.zeros(len(sequences)), groups=list(sequences)))
    except ValueError as error:
        # scikit-learn rejects a share that leaves one side without any sequence, and seeds outside 0 to 2**32 - 1.
        raise DatasetLayoutError(
            f"held-out share {held_out_share} of {len(set(sequences))} sequences with split seed {seed} cannot be "
            f"split ({error}); use a share that leaves sequences on both sides and a seed from 0 to 4294967295"
        ) from error
    return sorted(int(index) for index in training), sorted(int(index) for index in held_out)
