"""Tests of the polyp detector, its Grad-CAM explainer, evaluation and data set loader."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

from crc_medai.settings import get_settings
from processors.detection.datasets import frame_sequences, iter_labelled_frames, read_sequence_map, split_by_sequence
from processors.detection.errors import (
    DatasetLayoutError,
    DetectionError,
    InvalidFrameError,
    ParameterError,
    WeightsFileError,
)
from processors.detection.evaluate import dice_and_iou, evaluate, evaluate_videos, generated_frames, pointing_game
from processors.detection.evaluate import main as evaluate_main
from processors.detection.explain import (
    GRADCAM_DECODER_BLOCK,
    GRADCAM_STAGES_FROM_END,
    GradCamExplainer,
    SegmentedPolypTarget,
    decoder_block,
    encoder_stage,
    last_encoder_stage,
)
from processors.detection.model import MASK_THRESHOLD, NetworkConfig, PolypDetector
from processors.detection.synth import generate_frame
from processors.detection.train import LabelledData, TrainingConfig, VideoFrames, compress, train
from processors.detection.train import main as train_main

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_WEIGHTS = REPO_ROOT / "processors" / "detection" / "weights" / "polyp_unet.pt"
#: Floors a margin below what the shipped weights measured on this 48-frame set
#: (seed 2024) at threshold 0.5: sensitivity 0.875, specificity 1.00, mean Dice
#: 0.83. On 400 held-out frames they measured 0.915, 0.99 and 0.84 (see the model card).
SENSITIVITY_FLOOR = 0.75
SPECIFICITY_FLOOR = 0.90
DICE_FLOOR = 0.70
#: Pointing-game floor a margin below what the shipped weights hit on this
#: 48-frame set (seed 2024): 22 of its 24 polyp frames (0.92) with the mask
#: target. The presence logit hit 0.24 on held-out frames, so the floor also
#: guards the choice of target.
POINTING_GAME_FLOOR = 0.75
#: One generated video, 20 s at 10 fps, with 4 polyps, through the default
#: tracker. The shipped weights found all 4, with no finding on a polyp-free
#: stretch, a median of 250 ms of capture time after each polyp came into view
#: (polyp-unet 0.1.0 found 3, after 1000 ms).
VIDEO_SEED = 2024
VIDEO_POLYPS_FLOOR = 3
VIDEO_FALSE_FINDINGS_CEILING = 1
VIDEO_TTFD_CEILING_MS = 400.0
#: A small architecture so that tests that build networks stay fast.
TINY_CONFIG = NetworkConfig(decoder_channels=(16, 16, 8, 8, 8), input_size=64)


@pytest.fixture(scope="module")
def detector() -> PolypDetector:
    return PolypDetector.load(SHIPPED_WEIGHTS)


def _frame(height: int, width: int, seed: int = 0) -> np.ndarray:
    image, _ = generate_frame(np.random.default_rng(seed), size=128, with_polyp=True)
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


def test_shipped_weights_metadata(detector: PolypDetector) -> None:
    assert SHIPPED_WEIGHTS.stat().st_size <= 15 * 1024 * 1024
    assert detector.name == "polyp-unet"
    assert detector.version
    assert detector.input_size % 32 == 0
    assert detector.metadata["training"]["data"].startswith("synthetic")
    assert detector.metadata["training"]["steps"] > 0
    assert not detector.network.training


def test_predict_mixed_sizes(detector: PolypDetector) -> None:
    sizes = [(256, 256), (346, 440), (61, 99), (1, 1), (500, 120)]
    frames = [_frame(height, width, seed) for seed, (height, width) in enumerate(sizes)]

    predictions = detector.predict(frames)

    assert len(predictions) == len(frames)
    for (height, width), prediction in zip(sizes, predictions, strict=True):
        assert 0.0 <= prediction.probability <= 1.0
        assert prediction.mask.shape == (height, width)
        assert prediction.mask.dtype == bool
        if prediction.region is None:
            assert not prediction.mask.any()
        else:
            x, y, region_width, region_height = prediction.region
            assert x >= 0
            assert y >= 0
            assert region_width > 0
            assert region_height > 0
            assert x + region_width <= width
            assert y + region_height <= height
            assert prediction.mask[y : y + region_height, x : x + region_width].any()


def test_predict_batch_equals_single(detector: PolypDetector) -> None:
    frames = [_frame(256, 256, seed) for seed in range(3)]

    batch = detector.predict(frames)
    single = [detector.predict([frame])[0] for frame in frames]

    for together, alone in zip(batch, single, strict=True):
        assert together.probability == pytest.approx(alone.probability, abs=1e-4)
        assert (together.mask != alone.mask).mean() < 0.001


@pytest.mark.parametrize(
    ("bad_frame", "message"),
    [
        (np.zeros((64, 64), dtype=np.uint8), "shape"),
        (np.zeros((64, 64, 1), dtype=np.uint8), "shape"),
        (np.zeros((64, 64, 4), dtype=np.uint8), "shape"),
        (np.zeros((64, 64, 3), dtype=np.float32), "dtype float32"),
        (np.zeros((0, 64, 3), dtype=np.uint8), "size 64x0"),
        (np.zeros((64, 0, 3), dtype=np.uint8), "size 0x64"),
        ([[0, 0, 0]], "list"),
    ],
)
def test_predict_ill_posed_frame(detector: PolypDetector, bad_frame: object, message: str) -> None:
    good_frame = _frame(64, 64)

    with pytest.raises(InvalidFrameError, match="frame 1") as raised:
        detector.predict([good_frame, bad_frame])

    assert message in str(raised.value)


def test_predict_empty_batch(detector: PolypDetector) -> None:
    with pytest.raises(InvalidFrameError, match="empty"):
        detector.predict([])


def test_shipped_weights_reach_floor(detector: PolypDetector) -> None:
    report = evaluate(detector, generated_frames(48, seed=2024), threshold=0.5)

    assert report.polyp_frames == 24
    assert report.polyp_free_frames == 24
    assert report.sensitivity >= SENSITIVITY_FLOOR
    assert report.specificity >= SPECIFICITY_FLOOR
    assert report.mean_dice >= DICE_FLOOR


def test_shipped_weights_find_polyps_in_video(detector: PolypDetector) -> None:
    report = evaluate_videos(detector, [VIDEO_SEED], get_settings(), fps=10.0, seconds=20.0)

    assert report.videos == 1
    assert report.polyps == 4
    assert report.polyps_detected >= VIDEO_POLYPS_FLOOR
    assert len(report.ttfd_ms) == report.polyps_detected
    assert report.findings == report.findings_on_polyps + report.findings_without_polyp
    assert report.findings_without_polyp <= VIDEO_FALSE_FINDINGS_CEILING
    assert report.summary()["ttfd_median_ms"] <= VIDEO_TTFD_CEILING_MS
    assert report.summary()["detection_rate"] == report.polyps_detected / 4


def test_dice_and_iou_values() -> None:
    truth = np.zeros((4, 4), dtype=bool)
    truth[:2, :2] = True
    predicted = np.zeros((4, 4), dtype=bool)
    predicted[:2, :] = True

    dice, iou = dice_and_iou(predicted, truth)

    assert dice == pytest.approx(2 * 4 / (8 + 4))
    assert iou == pytest.approx(4 / 8)
    assert dice_and_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == (1.0, 1.0)


def test_save_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    original = PolypDetector.create(TINY_CONFIG, name="tiny", version="9.9.9")
    path = tmp_path / "tiny.pt"
    frames = [_frame(80, 100)]

    original.save(path, {"training": {"seed": 3}})
    loaded = PolypDetector.load(path)

    assert (loaded.name, loaded.version, loaded.input_size) == ("tiny", "9.9.9", 64)
    assert loaded.metadata == {"training": {"seed": 3}}
    assert loaded.predict(frames)[0].probability == pytest.approx(original.predict(frames)[0].probability, abs=1e-6)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsFileError, match="not found"):
        PolypDetector.load(tmp_path / "absent.pt")


def test_load_folder(tmp_path: Path) -> None:
    with pytest.raises(WeightsFileError, match="is a folder; pass the .pt file inside it"):
        PolypDetector.load(tmp_path)


def test_load_pickle_error_one_line(tmp_path: Path) -> None:
    # A pickle that weights_only loading rejects: torch's message goes on with advice that does not apply.
    path = tmp_path / "object.pt"
    torch.save({"model": SimpleNamespace(a=1)}, path)

    with pytest.raises(WeightsFileError) as error:
        PolypDetector.load(path)

    assert "could not be read as a torch file" in str(error.value)
    assert "\n" not in str(error.value)
    assert "weights_only" not in str(error.value).split("); pass")[1]


@pytest.mark.parametrize("content", [b"not a torch file", b"hello"])
def test_load_not_a_torch_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)

    with pytest.raises(WeightsFileError, match="could not be read"):
        PolypDetector.load(path)


def test_load_foreign_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, path)

    with pytest.raises(WeightsFileError, match="is not a crc-medai/polyp-unet file"):
        PolypDetector.load(path)


def test_encoder_weights_from_disk(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = PolypDetector.create(TINY_CONFIG).network
    # Written as timm names its own checkpoints: no "model." prefix, plus a classifier.
    state = {key.removeprefix("model."): value for key, value in source.encoder.state_dict().items()}
    state["classifier.weight"] = torch.zeros(1000, 1024)
    path = tmp_path / "encoder.pth"
    torch.save(state, path)

    torch.manual_seed(2)
    detector = PolypDetector.create(TINY_CONFIG, encoder_weights=path)

    for key, value in source.encoder.state_dict().items():
        assert torch.equal(detector.network.encoder.state_dict()[key], value)


def test_encoder_weights_wrong_architecture(tmp_path: Path) -> None:
    path = tmp_path / "encoder.pth"
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3)}, path)

    with pytest.raises(WeightsFileError, match="lack"):
        PolypDetector.create(TINY_CONFIG, encoder_weights=path)


def test_training_writes_loadable_weights(tmp_path: Path) -> None:
    config = TrainingConfig(seed=3, steps=2, batch_size=4, frame_size=64, input_size=64, pool_size=8, pool_refresh=2)
    path = tmp_path / "trained.pt"

    train(config, path, version="0.0.1-test", log_every=1)

    loaded = PolypDetector.load(path)
    assert loaded.version == "0.0.1-test"
    assert loaded.input_size == 64
    assert loaded.metadata["training"]["steps"] == 2
    assert loaded.metadata["training"]["seed"] == 3
    assert len(loaded.predict([_frame(64, 64)])) == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"steps": 0}, "steps=0"),
        ({"batch_size": 5}, "must be even"),
        ({"batch_size": 64, "pool_size": 32}, "batch_size=64"),
        ({"pool_refresh": 0}, "pool_refresh=0"),
    ],
)
def test_training_config_rejected(tmp_path: Path, overrides: dict, message: str) -> None:
    config = TrainingConfig(**{"pool_size": 32, **overrides})

    with pytest.raises(ParameterError, match=message):
        train(config, tmp_path / "never.pt")


def test_gradcam_heatmap_and_overlay(detector: PolypDetector) -> None:
    frame = _frame(150, 200, seed=4)

    with GradCamExplainer(detector) as explainer:
        explanation = explainer.explain(frame)

    assert explanation.heatmap.shape == (150, 200)
    assert explanation.heatmap.dtype == np.float32
    assert explanation.heatmap.min() >= 0.0
    assert explanation.heatmap.max() <= 1.0
    assert explanation.overlay_png.startswith(b"\x89PNG\r\n\x1a\n")
    overlay = cv2.imdecode(np.frombuffer(explanation.overlay_png, dtype=np.uint8), cv2.IMREAD_COLOR)
    assert overlay.shape == (150, 200, 3)
    assert "Grad-CAM" in explanation.method
    assert "decoder block 2" in explanation.method


def test_segmented_target_matches_grad_cam_target(detector: PolypDetector) -> None:
    # The target takes the mask from Grad-CAM's own forward pass. grad-cam's SemanticSegmentationTarget,
    # given the mask of a separate forward pass, must give the same heatmap.
    image, _ = generate_frame(np.random.default_rng(6), size=256, with_polyp=True)
    with GradCamExplainer(detector) as explainer:
        inputs = detector.preprocess([image])
        with torch.no_grad():
            mask_logits, _ = detector.network(inputs)
        segmented = (torch.sigmoid(mask_logits[0, 0]) >= MASK_THRESHOLD).numpy().astype(np.float32)
        expected = explainer._cam(input_tensor=inputs, targets=[SemanticSegmentationTarget(0, segmented)])[0]
        heatmap = explainer._cam(input_tensor=inputs, targets=[SegmentedPolypTarget()])[0]

    assert segmented.any()
    np.testing.assert_allclose(heatmap, expected, atol=1e-6)


def test_gradcam_presence_target(detector: PolypDetector) -> None:
    image, mask = generate_frame(np.random.default_rng(5), size=256, with_polyp=True)

    with GradCamExplainer(detector, target="presence") as explainer:
        explanation = explainer.explain(image)

    assert explanation.heatmap.shape == mask.shape
    assert "encoder stage 4" in explanation.method
    assert "presence logit" in explanation.method


def test_gradcam_unknown_target(detector: PolypDetector) -> None:
    with pytest.raises(ParameterError, match="'box' is unknown"):
        GradCamExplainer(detector, target="box")


def test_gradcam_points_at_polyps(detector: PolypDetector) -> None:
    # The Grad-CAM layer is 24 x 24 at input size 192, so the heatmap is coarse,
    # but the polyp area should be hotter on average than the rest.
    rng = np.random.default_rng(77)
    inside_higher = 0
    with GradCamExplainer(detector) as explainer:
        for _ in range(20):
            image, mask = generate_frame(rng, size=256, with_polyp=True)
            heatmap = explainer.explain(image).heatmap
            inside_higher += heatmap[mask > 0].mean() > heatmap[mask == 0].mean()

    assert inside_higher >= 15


def test_gradcam_pointing_game_floor(detector: PolypDetector) -> None:
    frames = list(generated_frames(48, 2024, 256))

    report = pointing_game(detector, frames)

    assert report.frames == 24
    assert "decoder block 2 (stride 8)" in report.method
    assert report.hit_rate >= POINTING_GAME_FLOOR


def test_pointing_game_tolerance_widens_mask(detector: PolypDetector) -> None:
    frames = list(generated_frames(12, 2024, 256))

    exact = pointing_game(detector, frames)
    tolerant = pointing_game(detector, frames, tolerance_px=15)

    assert tolerant.hits >= exact.hits
    assert tolerant.tolerance_px == 15
    with pytest.raises(ParameterError, match="tolerance_px=-1"):
        pointing_game(detector, frames, tolerance_px=-1)


def test_encoder_stage_counts_from_deepest(detector: PolypDetector) -> None:
    deepest, deepest_text = encoder_stage(detector.network, 0)
    earlier, earlier_text = encoder_stage(detector.network, 1)

    assert deepest is last_encoder_stage(detector.network)[0]
    assert deepest is not earlier
    assert "stride 32" in deepest_text
    assert "stride 16" in earlier_text
    with pytest.raises(DetectionError, match="stages_from_end=9"):
        encoder_stage(detector.network, 9)


def test_decoder_block_counts_from_deepest(detector: PolypDetector) -> None:
    deepest, deepest_text = decoder_block(detector.network, 0)
    in_use, in_use_text = decoder_block(detector.network, GRADCAM_DECODER_BLOCK)

    assert deepest is not in_use
    assert deepest_text == "decoder block 1 (stride 16)"
    assert in_use_text == "decoder block 2 (stride 8)"
    with pytest.raises(DetectionError, match="decoder block 5 is out of range"):
        decoder_block(detector.network, 5)


def test_gradcam_releases_hooks(detector: PolypDetector) -> None:
    explainer = GradCamExplainer(detector)
    layer, _ = decoder_block(explainer._model.network, GRADCAM_DECODER_BLOCK)

    with explainer:
        assert layer._forward_hooks
    assert not layer._forward_hooks
    with pytest.raises(DetectionError, match="closed"):
        explainer.explain(_frame(64, 64))


def test_gradcam_leaves_detector_unhooked(detector: PolypDetector) -> None:
    decoder_layer, _ = decoder_block(detector.network, GRADCAM_DECODER_BLOCK)
    encoder_layer, _ = encoder_stage(detector.network, GRADCAM_STAGES_FROM_END)

    with GradCamExplainer(detector), GradCamExplainer(detector, target="presence"):
        assert not decoder_layer._forward_hooks
        assert not encoder_layer._forward_hooks


def test_gradcam_ill_posed_frame(detector: PolypDetector) -> None:
    with GradCamExplainer(detector) as explainer:
        with pytest.raises(InvalidFrameError, match="shape"):
            explainer.explain(np.zeros((32, 32), dtype=np.uint8))


def _write_kvasir_folder(root: Path, names: list[str]) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for name in names:
        image, mask = generate_frame(rng, size=96, with_polyp=True)
        cv2.imwrite(str(root / "images" / f"{name}.jpg"), image)
        # Masks a pixel narrower than the image, as some exports store them.
        cv2.imwrite(str(root / "masks" / f"{name}.png"), mask[:, :-1])


def test_kvasir_folder_loaded(tmp_path: Path) -> None:
    _write_kvasir_folder(tmp_path, ["b", "a"])

    frames = list(iter_labelled_frames(tmp_path))

    assert [frame.name for frame in frames] == ["a.jpg", "b.jpg"]
    for frame in frames:
        assert frame.image.shape == (96, 96, 3)
        assert frame.mask.shape == (96, 96)
        assert frame.mask.dtype == bool
        assert frame.mask.any()


def test_kvasir_folder_evaluated(detector: PolypDetector, tmp_path: Path) -> None:
    _write_kvasir_folder(tmp_path, ["a", "b"])
    frames = ((frame.name, frame.image, frame.mask) for frame in iter_labelled_frames(tmp_path))

    report = evaluate(detector, frames)

    assert report.frames == 2
    assert report.polyp_frames == 2
    assert report.specificity is None
    assert 0.0 <= report.mean_dice <= 1.0


def test_dataset_image_without_mask(tmp_path: Path) -> None:
    _write_kvasir_folder(tmp_path, ["a"])
    cv2.imwrite(str(tmp_path / "images" / "orphan.png"), np.zeros((8, 8, 3), dtype=np.uint8))

    with pytest.raises(DatasetLayoutError, match="orphan"):
        list(iter_labelled_frames(tmp_path))


def test_dataset_unknown_layout(tmp_path: Path) -> None:
    (tmp_path / "frames").mkdir()

    with pytest.raises(DatasetLayoutError, match="no supported layout"):
        list(iter_labelled_frames(tmp_path))


def test_dataset_folder_missing(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="does not exist or is not a folder"):
        list(iter_labelled_frames(tmp_path / "absent"))


def test_dataset_images_without_masks_folder(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()

    with pytest.raises(DatasetLayoutError, match="has images/ but no masks/"):
        list(iter_labelled_frames(tmp_path))


def _write_cvc_folder(root: Path, count: int) -> None:
    (root / "Original").mkdir(parents=True)
    (root / "Ground Truth").mkdir()
    rng = np.random.default_rng(1)
    for index in range(1, count + 1):
        image, mask = generate_frame(rng, size=64, with_polyp=True)
        cv2.imwrite(str(root / "Original" / f"{index}.png"), image)
        cv2.imwrite(str(root / "Ground Truth" / f"{index}.png"), mask)


def test_split_keeps_sequences_together() -> None:
    sequences = [f"seq{index // 5}" for index in range(40)]

    training, held_out = split_by_sequence(sequences, held_out_share=0.25, seed=3)

    assert sorted(training + held_out) == list(range(40))
    assert {sequences[index] for index in training}.isdisjoint({sequences[index] for index in held_out})
    assert len({sequences[index] for index in held_out}) == 2
    assert split_by_sequence(sequences, 0.25, seed=3) == (training, held_out)


@pytest.mark.parametrize(
    ("sequences", "share", "message"), [(["a", "b"], 1.0, "share 1.0 is invalid"), (["a", "a"], 0.5, "1 sequence")]
)
def test_split_rejected(sequences: list[str], share: float, message: str) -> None:
    with pytest.raises(DatasetLayoutError, match=message):
        split_by_sequence(sequences, share)


def test_kvasir_images_are_own_sequences(tmp_path: Path) -> None:
    _write_kvasir_folder(tmp_path, ["a", "b"])

    assert frame_sequences(tmp_path, ["a.png", "b.png"]) == ["a", "b"]


def test_cvc_needs_sequence_map(tmp_path: Path) -> None:
    _write_cvc_folder(tmp_path, 2)

    with pytest.raises(DatasetLayoutError, match="pass a sequence map"):
        frame_sequences(tmp_path, ["1.png", "2.png"])


def test_sequence_map_read_and_applied(tmp_path: Path) -> None:
    _write_cvc_folder(tmp_path, 3)
    csv_path = tmp_path / "sequences.csv"
    csv_path.write_text("name,sequence\n1.png,s1\n2,s1\n", encoding="utf-8")

    mapping = read_sequence_map(csv_path)

    assert frame_sequences(tmp_path, ["1.png", "2.png"], mapping) == ["s1", "s1"]
    with pytest.raises(DatasetLayoutError, match="frame 3.png is missing from the sequence map"):
        frame_sequences(tmp_path, ["3.png"], mapping)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("frame,sequence\n1.png,s1\n", "lacks the column"),
        ("name,sequence\n1.png,\n", "line 2 has an empty name or sequence"),
        ("name,sequence\n1.png,s1\n1.png,s2\n", "names frame 1.png twice"),
    ],
)
def test_sequence_map_rejected(tmp_path: Path, text: str, message: str) -> None:
    csv_path = tmp_path / "sequences.csv"
    csv_path.write_text(text, encoding="utf-8")

    with pytest.raises(DatasetLayoutError, match=message):
        read_sequence_map(csv_path)


def test_sequence_map_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="could not be read"):
        read_sequence_map(tmp_path / "absent.csv")


def test_evaluate_command_held_out_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_cvc_folder(tmp_path / "cvc", 8)
    csv_path = tmp_path / "sequences.csv"
    csv_path.write_text("name,sequence\n" + "".join(f"{i}.png,s{(i - 1) // 2}\n" for i in range(1, 9)), "utf-8")

    evaluate_main(
        [
            "--weights",
            str(SHIPPED_WEIGHTS),
            "--data-dir",
            str(tmp_path / "cvc"),
            "--sequence-map",
            str(csv_path),
            "--held-out-share",
            "0.25",
        ]
    )

    summary = json.loads(capsys.readouterr().out)
    assert summary["frames"] == 2
    assert "held-out side: 2 frames of 1 of 4 sequences" in summary["source"]


def test_evaluate_command_share_needs_data_dir() -> None:
    with pytest.raises(ParameterError, match="--held-out-share applies to --data-dir only"):
        evaluate_main(["--weights", str(SHIPPED_WEIGHTS), "--held-out-share", "0.2"])


@pytest.mark.parametrize(
    ("text", "encoding"), [("\ufeffname,sequence\n1.png,s1\n", "utf-8"), ("name,sequence\n1.png,s\u00e9\n", "utf-8")]
)
def test_sequence_map_utf8_variants(tmp_path: Path, text: str, encoding: str) -> None:
    # A byte-order mark, as spreadsheet programs write, and a non-ASCII sequence name.
    csv_path = tmp_path / "sequences.csv"
    csv_path.write_text(text, encoding=encoding)

    assert list(read_sequence_map(csv_path)) == ["1.png"]


def test_sequence_map_not_utf8(tmp_path: Path) -> None:
    csv_path = tmp_path / "sequences.csv"
    csv_path.write_text("name,sequence\n1.png,s\u00e9\n", encoding="latin-1")

    with pytest.raises(DatasetLayoutError, match="is not UTF-8 text"):
        read_sequence_map(csv_path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--frames", "0"], "nothing to evaluate"),
        (["--videos", "-1"], "--videos=-1 is invalid"),
        (["--frames", "0", "--videos", "1", "--video-fps", "5", "--video-seconds", "0.01"], "shorter than one frame"),
    ],
)
def test_evaluate_command_rejects_options(options: list[str], message: str) -> None:
    with pytest.raises(ParameterError, match=message):
        evaluate_main(["--weights", str(SHIPPED_WEIGHTS), *options])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--threads", "0"], "--threads=0 is invalid"),
        (["--log-every", "0"], "--log-every=0 is invalid"),
        (["--learning-rate", "-1"], "--learning-rate=-1.0 is invalid"),
    ],
)
def test_train_command_rejects_options(tmp_path: Path, options: list[str], message: str) -> None:
    with pytest.raises(ParameterError, match=message):
        train_main(["--out", str(tmp_path / "model.pt"), *options])


def test_train_command_checks_out_first(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x", encoding="utf-8")

    with pytest.raises(ParameterError, match="is a folder"):
        train_main(["--out", str(tmp_path)])
    with pytest.raises(ParameterError, match="is not a writable folder"):
        train_main(["--out", str(blocker / "model.pt")])


TINY_TRAINING = ["--steps", "2", "--batch-size", "4", "--frame-size", "64", "--input-size", "64"]
TINY_POOL = ["--pool-size", "8", "--pool-refresh", "2", "--log-every", "1"]


def test_training_on_labelled_folder(tmp_path: Path) -> None:
    _write_kvasir_folder(tmp_path / "kvasir", ["a", "b", "c"])
    path = tmp_path / "trained.pt"

    train_main(["--out", str(path), "--data-dir", str(tmp_path / "kvasir"), *TINY_TRAINING, *TINY_POOL])

    training = PolypDetector.load(path).metadata["training"]
    assert "2 of 4 frames of each batch from kvasir: 3 frames" in training["data"]
    assert training["init_weights"] is None
    assert training["init_training"] is None


def test_labelled_training_side_disjoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_cvc_folder(tmp_path / "cvc", 8)
    csv_path = tmp_path / "sequences.csv"
    csv_path.write_text("name,sequence\n" + "".join(f"{i}.png,s{(i - 1) // 2}\n" for i in range(1, 9)), "utf-8")
    split = ["--sequence-map", str(csv_path), "--held-out-share", "0.25"]

    data = LabelledData.load(tmp_path / "cvc", 64, held_out_share=0.25, sequence_map=csv_path)
    evaluate_main(["--weights", str(SHIPPED_WEIGHTS), "--data-dir", str(tmp_path / "cvc"), *split, "--per-frame"])

    held_out = {json.loads(line)["name"] for line in capsys.readouterr().out.splitlines() if line.startswith('{"name')}
    assert len(data.names) == 6
    assert len(held_out) == 2
    assert not held_out & set(data.names)
    assert "sequence map sequences.csv, training side 6 frames of 3 sequences" in data.source
    assert data.images[0].shape == (64, 64, 3)
    assert set(np.unique(data.masks[0])) <= {0, 255}


def test_labelled_masks_all_empty(tmp_path: Path) -> None:
    # Masks stored as 0 and 1 read as empty, because polyp pixels are those above 127.
    _write_kvasir_folder(tmp_path / "kvasir", ["a", "b"])
    for mask_path in (tmp_path / "kvasir" / "masks").iterdir():
        mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(mask_path), (mask > 127).astype(np.uint8))

    with pytest.raises(DatasetLayoutError, match="every mask of the 2 frames .* is empty"):
        LabelledData.load(tmp_path / "kvasir", 64)


def test_split_leaving_no_training_side() -> None:
    with pytest.raises(DatasetLayoutError, match="held-out share 0.99 of 2 sequences .* cannot be split"):
        split_by_sequence(["a", "b"], 0.99)


def test_training_fine_tunes_saved_weights(tmp_path: Path) -> None:
    start = tmp_path / "start.pt"
    train_main(["--out", str(start), *TINY_TRAINING, *TINY_POOL])
    tuned = tmp_path / "tuned.pt"

    train_main(["--out", str(tuned), "--init-weights", str(start), "--version", "0.0.2", *TINY_TRAINING, *TINY_POOL])

    before, after = PolypDetector.load(start), PolypDetector.load(tuned)
    assert after.version == "0.0.2"
    assert after.metadata["training"]["init_weights"] == "start.pt"
    assert after.metadata["training"]["init_training"] == before.metadata["training"]
    changed = [
        name
        for name, tensor in after.network.state_dict().items()
        if tensor.is_floating_point() and not torch.equal(tensor, before.network.state_dict()[name])
    ]
    assert changed


def test_fine_tune_at_other_input_size(tmp_path: Path) -> None:
    start = tmp_path / "start.pt"
    train_main(["--out", str(start), *TINY_TRAINING, *TINY_POOL])
    tuned = tmp_path / "tuned.pt"

    train_main(["--out", str(tuned), "--init-weights", str(start), *TINY_TRAINING, *TINY_POOL, "--input-size", "96"])

    loaded = PolypDetector.load(tuned)
    assert loaded.input_size == 96
    assert len(loaded.predict([_frame(64, 64)])) == 1


def test_video_frames_entering_and_polyp_free() -> None:
    frames = VideoFrames.generate(first_seed=5000, videos=1, frame_size=64)

    assert frames.entering
    assert frames.polyp_free
    assert all(mask.any() for _, mask in frames.entering)
    assert not any(mask.any() for _, mask in frames.polyp_free)
    images, masks = frames.sample(np.random.default_rng(0), 4)
    assert [bool(mask.any()) for mask in masks] == [True, False, True, False]
    assert images[0].shape == (64, 64, 3)


def test_compress_share_zero_draws_nothing() -> None:
    rng = np.random.default_rng(0)
    images = [_frame(64, 64)]

    assert compress(rng, images, 0.0) is images
    assert rng.random() == np.random.default_rng(0).random()


def test_compress_share_one_changes_frames() -> None:
    image = _frame(64, 64)

    (compressed,) = compress(np.random.default_rng(0), [image], 1.0)

    assert compressed.shape == image.shape
    assert compressed.dtype == np.uint8
    assert not np.array_equal(compressed, image)


def test_training_with_video_frames(tmp_path: Path) -> None:
    path = tmp_path / "trained.pt"

    train_main(["--out", str(path), "--video-share", "0.5", "--videos", "1", *TINY_TRAINING, *TINY_POOL])

    training = PolypDetector.load(path).metadata["training"]
    assert "2 of 4 frames of each batch from 1 generated procedure videos (seeds 5000-5000, 15 fps)" in training["data"]
    assert training["compression_share"] == 0.0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--held-out-share", "0.2"], "--held-out-share applies to --data-dir DIR only"),
        (["--init-weights", "a.pt", "--encoder-weights", "b.pt"], "pass only one of them"),
        (["--data-dir", "kvasir", "--data-share", "1"], "data_share=1.0 is invalid"),
        (["--data-dir", "kvasir", "--data-share", "0.9", "--batch-size", "4"], "gives 4 labelled and 0 generated"),
        (["--data-dir", "kvasir", "--data-share", "0.1", "--batch-size", "4"], "gives 0 labelled and 4 generated"),
        (["--data-dir", "kvasir", "--data-share", "0"], "would leave --data-dir unused"),
        (["--data-share", "0.5"], "--data-share applies to --data-dir DIR only"),
        (["--data-dir", "kvasir", "--split-seed", "1"], "--split-seed applies to --held-out-share F only"),
        (["--data-dir", "kvasir", "--held-out-share", "0.5", "--split-seed", "-1"], "--split-seed=-1 is invalid"),
        (["--videos", "3"], "--videos applies to --video-share F only"),
        (["--video-share", "0.5", "--video-seed", "-1"], "video_seed=-1 is invalid"),
        (["--video-share", "0.5", "--videos", "100000"], "videos=100000 is invalid"),
        (["--init-weights", "a.pt", "--input-size", "48"], "input_size=48 is invalid"),
        (["--video-share", "1"], "video_share=1.0 is invalid"),
        (["--compression-share", "1.5"], "compression_share=1.5 is invalid"),
        (["--video-share", "0.5", "--videos", "0"], "videos=0 is invalid"),
        (["--video-share", "0.25", "--batch-size", "4"], "gives 1 video and 3 generated frames"),
    ],
)
def test_train_command_rejects_data_options(tmp_path: Path, options: list[str], message: str) -> None:
    with pytest.raises(ParameterError, match=message):
        train_main(["--out", str(tmp_path / "model.pt"), *options])
