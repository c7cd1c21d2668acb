"""Grad-CAM quality maps (`qualiclip_hf.explain`) and `qualiclip explain`."""

import numpy as np
import pytest
import torch
from PIL import Image

from qualiclip_hf.cli import main
from qualiclip_hf.explain import colorize_heatmap, explain_image, grad_cam, overlay_heatmap
from qualiclip_hf.processing_qualiclip import QualiCLIPProcessor
from training.degradations import apply_distortion

from .conftest import HELDOUT_PHOTOS, heldout_photo, photo


@pytest.fixture(scope="module")
def tiny_processor(tiny_model_dir):
    return QualiCLIPProcessor.from_pretrained(tiny_model_dir)


def _pixels(image: Image.Image, processor) -> torch.Tensor:
    return processor(images=[image], return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("size", [(64, 96), (70, 45), (33, 129)])
def test_heatmap_has_the_input_shape_and_lies_in_0_1(tiny_model, tiny_processor, size):
    image = photo(*size, seed=sum(size))
    explanation = explain_image(image, tiny_model, tiny_processor)
    heatmap = explanation.heatmap
    assert heatmap.shape == size and heatmap.dtype == np.float32
    assert np.isfinite(heatmap).all()
    assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0
    # Normalised by its peak, unless nothing lowers the score at all.
    assert heatmap.max() == pytest.approx(1.0) or heatmap.max() == 0.0
    assert explanation.image.size == image.size
    with torch.no_grad():
        expected = tiny_model(pixel_values=_pixels(image, tiny_processor)).quality_score.item()
    assert explanation.score == pytest.approx(expected, abs=1e-6)


def test_max_size_downscales_the_image_and_its_map(tiny_model, tiny_processor):
    image = photo(80, 160, seed=3)
    explanation = explain_image(image, tiny_model, tiny_processor, max_size=100)
    assert explanation.image.size == (100, 50) and explanation.heatmap.shape == (50, 100)
    # The score is the one every entry point gives with max_size (the processor's resize, in floating point); the
    # image returned is that picture rounded to 8 bits for display.
    with torch.no_grad():
        seen = tiny_processor(images=image, return_tensors="pt", max_size=100)["pixel_values"]
        expected = tiny_model(pixel_values=seen).quality_score.item()
    assert explanation.score == pytest.approx(expected, abs=1e-6)
    shown = _pixels(explanation.image, tiny_processor)
    assert (shown - seen).abs().max() <= 0.51 / 255 / 0.26  # half an 8-bit level, in CLIP-normalised units


def test_the_model_is_left_unchanged(tiny_model, tiny_processor):
    before = {name: tensor.clone() for name, tensor in tiny_model.state_dict().items()}
    flags = {name: p.requires_grad for name, p in tiny_model.named_parameters()}
    assert any(flags.values()) and not all(flags.values())  # a trainable image tower, a frozen text tower
    pixel_values = _pixels(photo(64, 64, seed=5), tiny_processor)
    tiny_model.train()
    try:
        _, scores = grad_cam(tiny_model, pixel_values)
        assert tiny_model.training  # its mode is restored ...
    finally:
        tiny_model.eval()
    with torch.no_grad():  # ... and the map was computed in eval mode (running BatchNorm statistics untouched)
        assert torch.allclose(scores, tiny_model(pixel_values=pixel_values).quality_score, atol=1e-6)
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert {name: p.requires_grad for name, p in tiny_model.named_parameters()} == flags
    assert all(p.grad is None for p in tiny_model.parameters())
    assert not any(module._forward_hooks for module in tiny_model.modules())


def test_works_under_inference_mode_and_batches_like_single_images(tiny_model, tiny_processor):
    images = [photo(64, 96, seed=seed) for seed in (7, 8)]
    pixel_values = tiny_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        batch_maps, batch_scores = grad_cam(tiny_model, pixel_values)
    for index in range(2):
        single_map, single_score = grad_cam(tiny_model, pixel_values[index : index + 1])
        assert torch.allclose(batch_maps[index], single_map[0], atol=1e-5)
        assert torch.allclose(batch_scores[index], single_score[0], atol=1e-6)


def test_concurrent_calls_on_one_model_do_not_mix(tiny_model, tiny_processor):
    from concurrent.futures import ThreadPoolExecutor

    inputs = [_pixels(photo(64, 64 + 16 * index, seed=index), tiny_processor) for index in range(4)]
    alone = [grad_cam(tiny_model, pixel_values) for pixel_values in inputs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda pixel_values: grad_cam(tiny_model, pixel_values), inputs * 3))
    for (maps, scores), (expected_maps, expected_scores) in zip(together, alone * 3, strict=True):
        assert torch.allclose(maps, expected_maps, atol=1e-5) and torch.allclose(scores, expected_scores, atol=1e-6)


def _heatmap(images: torch.Tensor, demo) -> torch.Tensor:
    model, processor = demo
    return grad_cam(model, _pixels((images[0] * 255).round().to(torch.uint8), processor))[0][0]


@pytest.mark.parametrize("name", HELDOUT_PHOTOS)
def test_demo_model_map_points_at_the_degraded_half(demo, name):
    """
    One half of a held-out photo is heavily degraded (level 5 of 5), the other left pristine. The map (what lowers
    the score) must move to the degraded half: that half's share of the map grows compared with the map of the
    pristine photo (which has its own, content-driven, hot spots), and holds most of it.
    """
    pristine = heldout_photo(name)
    width = pristine.shape[-1]
    halves = {"left": slice(None, width // 2), "right": slice(width // 2, None)}
    pristine_map = _heatmap(pristine, demo)
    for distortion in ("gaussian_blur", "white_noise", "jpeg"):
        degraded = apply_distortion(pristine, distortion, 4, torch.Generator().manual_seed(0))
        for side, half in halves.items():
            mixed = pristine.clone()
            mixed[..., half] = degraded[..., half]
            heatmap = _heatmap(mixed, demo)
            share = float(heatmap[:, half].sum() / heatmap.sum())
            pristine_share = float(pristine_map[:, half].sum() / pristine_map.sum())
            case = (name, distortion, side, share, pristine_share)
            assert share > pristine_share + 0.05, case
            # Measured: the degraded half holds 60-99% of the map in every case but one. The astronaut's pristine
            # map already puts 88% on its right half (the flag and the shuttle); JPEG on the left half moves the
            # left half's share from 12% to 44% only.
            if (name, distortion, side) != ("astronaut", "jpeg", "left"):
                assert share > 0.5, case


def test_colour_map_runs_dark_to_bright():
    ramp = np.linspace(0, 1, 11, dtype=np.float32)[None]
    colours = np.asarray(colorize_heatmap(ramp), dtype=np.float32)[0]
    lightness = colours @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    assert np.all(np.diff(lightness) > 0)
    # Out-of-range and non-finite values are clipped / shown as 0 rather than wrapping around.
    odd = np.asarray(colorize_heatmap(np.array([[-1.0, 2.0, np.nan]], dtype=np.float32)))[0]
    assert np.array_equal(odd[0], colours[0]) and np.array_equal(odd[1], colours[-1])
    assert np.array_equal(odd[2], colours[0])


def test_overlay_matches_the_image_size_and_follows_the_heat():
    image = Image.new("RGB", (40, 20), (128, 128, 128))
    heatmap = np.zeros((10, 20), dtype=np.float32)
    heatmap[:, 10:] = 1.0  # hot right half, at half the image's resolution
    overlay = np.asarray(overlay_heatmap(image, heatmap), dtype=np.float32)
    assert overlay.shape == (20, 40, 3)
    cold, hot = overlay[:, :15].mean(axis=(0, 1)), overlay[:, 25:].mean(axis=(0, 1))
    assert hot.sum() > cold.sum() + 100
    with pytest.raises(ValueError, match="alpha"):
        overlay_heatmap(image, heatmap, alpha=1.5)


def test_cli_explain_writes_the_map(tiny_model_dir, tiny_model, tiny_processor, tmp_path, capsys):
    source = photo(64, 96, seed=11)
    source.save(tmp_path / "image.png")
    expected = explain_image(source, tiny_model, tiny_processor)

    command = ["explain", str(tmp_path / "image.png"), "--model", str(tiny_model_dir), "--output"]
    assert main([*command, str(tmp_path / "map.npy")]) == 0
    assert np.allclose(np.load(tmp_path / "map.npy"), expected.heatmap, atol=1e-5)
    assert f"{expected.score:.4f}" in capsys.readouterr().out

    for extra, name in (([], "map.png"), (["--overlay"], "sub/overlay.jpg")):
        assert main([*command, str(tmp_path / name), *extra]) == 0
        with Image.open(tmp_path / name) as written:
            assert written.size == (96, 64)
    colours = np.asarray(Image.open(tmp_path / "map.png"), dtype=np.int16)
    assert np.array_equal(colours, np.asarray(colorize_heatmap(expected.heatmap), dtype=np.int16))


def test_cli_explain_errors_name_the_file(tiny_model_dir, tmp_path, capsys):
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not an image")
    small = tmp_path / "small.png"
    photo(16, 16).save(small)
    output = str(tmp_path / "map.png")
    model = ["--model", str(tiny_model_dir)]

    cases = [
        (["explain", str(not_image), "--output", output, *model], 1, "notes.jpg: not an image file"),
        (["explain", str(tmp_path / "missing.png"), "--output", output, *model], 1, "missing.png: no such file"),
        (["explain", str(small), "--output", output, *model], 1, "small.png: cannot explain"),
        (["explain", str(small), "--output", str(tmp_path / "map.txt"), *model], 2, "--output must be an image"),
        (["explain", str(small), "--output", str(tmp_path / "m.npy"), "--overlay", *model], 2, "--overlay needs"),
        (["explain", str(small), "--output", output, "--model", str(tmp_path / "nowhere")], 2, "cannot load model"),
    ]
    for argv, code, message in cases:
        assert main(argv) == code, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "map.png").exists()
