"""Tests of the synthetic endoscopy frame and video generator."""

from __future__ import annotations

import json
from datetime import datetime
from itertools import pairwise
from pathlib import Path

import cv2
import numpy as np
import pytest

from processors.detection import scene, synth
from processors.detection.errors import ParameterError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_VIDEO = REPO_ROOT / "samples" / "video" / "procedure-demo.mp4"


def test_frame_same_seed_same_pixels() -> None:
    first_image, first_mask = synth.generate_frame(np.random.default_rng(42), size=128, with_polyp=True)
    second_image, second_mask = synth.generate_frame(np.random.default_rng(42), size=128, with_polyp=True)
    other_image, _ = synth.generate_frame(np.random.default_rng(43), size=128, with_polyp=True)

    assert np.array_equal(first_image, second_image)
    assert np.array_equal(first_mask, second_mask)
    assert not np.array_equal(first_image, other_image)


@pytest.mark.parametrize("with_polyp", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_frame_mask_matches_request(seed: int, with_polyp: bool) -> None:
    image, mask = synth.generate_frame(np.random.default_rng(seed), size=128, with_polyp=with_polyp)

    assert image.shape == (128, 128, 3)
    assert image.dtype == np.uint8
    assert mask.shape == (128, 128)
    assert mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    assert bool(mask.any()) is with_polyp


def test_frame_random_polyp_choice_mixes() -> None:
    rng = np.random.default_rng(5)
    present = [bool(synth.generate_frame(rng, size=96)[1].any()) for _ in range(16)]

    assert any(present)
    assert not all(present)


def test_some_polyps_cross_the_view_edge() -> None:
    # Polyps enter a video's view across its edge, so training frames must show that too.
    rng = np.random.default_rng(9)
    at_edge = 0
    for _ in range(40):
        frame = synth.render_frame(rng, size=128, with_polyp=True)
        outside = (frame.image.max(axis=2) < 8) & ~frame.overlay_mask
        near_outside = cv2.dilate(outside.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        at_edge += bool((near_outside & (frame.mask > 0)).any())

    assert 0.1 <= at_edge / 40 <= 0.6


def test_frame_border_outside_view_is_black() -> None:
    frame = synth.render_frame(np.random.default_rng(8), size=128, with_polyp=False)

    # Corner pixels lie outside every circle and octagon the generator draws.
    corners = [(0, 0), (0, 127), (127, 0), (127, 127)]
    dark_corners = [frame.image[y, x].max() < 16 for y, x in corners if not frame.overlay_mask[y, x]]
    assert dark_corners
    assert all(dark_corners)


@pytest.mark.parametrize("seed", range(3))
def test_frame_pair_differs_only_near_polyp(seed: int) -> None:
    with_polyp, without_polyp = synth.render_frame_pair(np.random.default_rng(seed), size=128)

    assert with_polyp.mask.any()
    assert not without_polyp.mask.any()
    assert np.array_equal(with_polyp.overlay_mask, without_polyp.overlay_mask)
    # The polyp's shadow and the final blur reach past its outline, so compare
    # only pixels more than 21 pixels (a sixth of the frame) away from it.
    near_polyp = cv2.dilate(with_polyp.mask, np.ones((43, 43), dtype=np.uint8)) > 0
    changed = (with_polyp.image != without_polyp.image).any(axis=2)
    assert changed[near_polyp].any()
    assert not changed[~near_polyp].any()


@pytest.mark.parametrize("seed", range(4))
def test_overlay_text_not_in_mask(seed: int) -> None:
    frame = synth.render_frame(np.random.default_rng(seed), size=256, with_polyp=True)

    assert frame.overlay_mask.any()
    assert not (frame.mask > 0)[frame.overlay_mask].any()
    # The text is burned into the image: overlay pixels are brighter than the
    # black border they mostly sit on.
    assert frame.image[frame.overlay_mask].mean() > 60


def test_overlay_removed_from_full_view_polyp() -> None:
    rng = np.random.default_rng(0)
    optics = scene.sample_optics(rng, 128)
    view = np.full((128, 128, 3), 150.0, dtype=np.float32)
    labels = np.ones((128, 128), dtype=np.int32)

    frame = synth._finish_frame(rng, view, labels, optics, datetime(2024, 5, 1, 10, 30), "ID 0001")

    fov = scene.field_of_view(128, optics)
    assert frame.overlay_mask.any()
    assert frame.polyp_ids == (1,)
    assert not (frame.mask > 0)[frame.overlay_mask].any()
    assert (frame.mask > 0)[fov & ~frame.overlay_mask].all()
    assert not (frame.mask > 0)[~fov].any()


@pytest.mark.parametrize("size", [0, 32, 4096])
def test_frame_size_out_of_range(size: int) -> None:
    with pytest.raises(ParameterError, match=f"size={size}"):
        synth.generate_frame(np.random.default_rng(0), size=size)


def test_procedure_flags_match_masks() -> None:
    frames = list(synth.generate_procedure(seed=3, seconds=10, fps=4, size=96))

    assert len(frames) == 40
    assert [frame.index for frame in frames] == list(range(40))
    for frame in frames:
        assert frame.image.shape == (96, 96, 3)
        assert bool(frame.mask.any()) is frame.polyp_present
    present = [frame.polyp_present for frame in frames]
    assert any(present)
    assert not all(present)


def test_procedure_same_seed_same_video() -> None:
    first = list(synth.generate_procedure(seed=11, seconds=2, fps=3, size=64))
    second = list(synth.generate_procedure(seed=11, seconds=2, fps=3, size=64))

    assert all(np.array_equal(a.image, b.image) for a, b in zip(first, second, strict=True))
    assert [a.polyp_ids for a in first] == [b.polyp_ids for b in second]


@pytest.mark.parametrize(("seconds", "fps"), [(0, 15), (-1, 15), (5, 0), (5, 500)])
def test_procedure_parameters_out_of_range(seconds: float, fps: float) -> None:
    with pytest.raises(ParameterError):
        next(synth.generate_procedure(seed=0, seconds=seconds, fps=fps, size=64))


def test_ground_truth_summary() -> None:
    truth = synth.summarise_ground_truth([(), (1,), (1,), (), (2,), (1, 2), ()], seed=1, fps=2.0, size=64)

    assert truth["frame_count"] == 7
    assert truth["frames_with_polyp"] == 4
    assert truth["polyp_present"] == [False, True, True, False, True, True, False]
    assert truth["polyps"] == [
        {"polyp_id": 1, "frame_ranges": [[1, 2], [5, 5]]},
        {"polyp_id": 2, "frame_ranges": [[4, 5]]},
    ]
    assert [(e["first_frame"], e["last_frame"], e["polyp_ids"]) for e in truth["episodes"]] == [
        (1, 2, [1]),
        (4, 5, [1, 2]),
    ]
    assert truth["episodes"][1]["first_time_s"] == 2.0


def test_video_written_with_ground_truth(tmp_path: Path) -> None:
    path = tmp_path / "procedure.mp4"

    truth = synth.write_procedure_video(path, seed=5, seconds=3, fps=5, size=96)

    written = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    assert written == truth
    assert written["frame_count"] == 15
    capture = cv2.VideoCapture(str(path))
    decoded = 0
    while True:
        ok, image = capture.read()
        if not ok:
            break
        assert image.shape == (96, 96, 3)
        decoded += 1
    capture.release()
    assert decoded == 15


def test_demo_video_has_polyp_episodes() -> None:
    truth = json.loads(DEMO_VIDEO.with_suffix(".json").read_text(encoding="utf-8"))

    assert DEMO_VIDEO.stat().st_size < 5 * 1024 * 1024
    assert truth["seed"] == 7
    assert truth["frame_count"] == 300
    assert len(truth["episodes"]) >= 3
    assert not truth["polyp_present"][0]
    gaps = [later["first_frame"] - earlier["last_frame"] - 1 for earlier, later in pairwise(truth["episodes"])]
    assert min(gaps) >= truth["fps"]
