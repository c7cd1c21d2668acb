import numpy as np
import pytest
import torch
from PIL import Image

from qualiclip_hf import QualiCLIPImageProcessor, QualiCLIPProcessor

from .conftest import CLIP_MEAN, CLIP_STD, photo


def to_tensor_01(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def test_full_resolution_and_clip_normalisation_by_default():
    image = photo(123, 77)
    out = QualiCLIPImageProcessor()(image, return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 123, 77)
    expected = (to_tensor_01(image) - CLIP_MEAN) / CLIP_STD
    torch.testing.assert_close(out["pixel_values"][0], expected, atol=1e-5, rtol=0)
    assert out["image_sizes"].tolist() == [[123, 77]]


def test_exif_orientation_is_applied():
    image = photo(40, 60)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rotated_on_disk = image.copy()
    rotated_on_disk.info["exif"] = exif.tobytes()
    rotated_on_disk.getexif()[0x0112] = 6
    out = QualiCLIPImageProcessor()(rotated_on_disk, return_tensors="pt")
    assert out["pixel_values"].shape[-2:] == (60, 40)
    expected = (to_tensor_01(image.transpose(Image.Transpose.ROTATE_270)) - CLIP_MEAN) / CLIP_STD
    torch.testing.assert_close(out["pixel_values"][0], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_other_modes_become_three_channels(mode):
    reference = photo(48, 48).convert("L")
    if mode == "I;16":
        image = Image.fromarray(np.asarray(reference).astype(np.uint16) * 257)
        assert image.mode == "I;16"
    else:
        image = photo(48, 48).convert(mode)
    out = QualiCLIPImageProcessor()(image, return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 48, 48)
    assert torch.isfinite(out["pixel_values"]).all()
    if mode in ("L", "I;16"):
        # Grey stays grey at the same level (16-bit is scaled, not clipped to white).
        expected = (to_tensor_01(reference.convert("RGB")) - CLIP_MEAN) / CLIP_STD
        torch.testing.assert_close(out["pixel_values"][0], expected, atol=1e-5, rtol=0)


def test_max_size_caps_the_longest_side_only_when_exceeded():
    processor = QualiCLIPImageProcessor(max_size=100)
    big = processor(photo(200, 300), return_tensors="pt")["pixel_values"]
    small = processor(photo(50, 80), return_tensors="pt")["pixel_values"]
    assert big.shape[-2:] == (67, 100)
    assert small.shape[-2:] == (50, 80)
    # As a call argument too, overriding the default of None.
    capped = QualiCLIPImageProcessor()(photo(200, 300), max_size=150, return_tensors="pt")
    assert capped["pixel_values"].shape[-2:] == (100, 150)


def test_mixed_sizes_are_padded_and_their_sizes_returned():
    a, b = photo(50, 70, seed=1), photo(90, 40, seed=2)
    out = QualiCLIPImageProcessor()([a, b], return_tensors="pt")
    assert out["pixel_values"].shape == (2, 3, 90, 70)
    assert out["image_sizes"].tolist() == [[50, 70], [90, 40]]
    alone = QualiCLIPImageProcessor()(b, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(out["pixel_values"][1, :, :90, :40], alone)
    assert torch.count_nonzero(out["pixel_values"][1, :, :, 40:]) == 0


def test_without_return_tensors_each_image_keeps_its_shape():
    out = QualiCLIPImageProcessor()([photo(50, 70), photo(90, 40)])
    assert [tuple(p.shape) for p in out["pixel_values"]] == [(3, 50, 70), (3, 90, 40)]


def test_numpy_and_tensor_inputs_match_pil():
    image = photo(64, 48)
    processor = QualiCLIPImageProcessor()
    from_pil = processor(image, return_tensors="pt")["pixel_values"]
    from_numpy = processor(np.asarray(image), return_tensors="pt")["pixel_values"]
    from_tensor = processor(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1), return_tensors="pt")
    torch.testing.assert_close(from_numpy, from_pil)
    torch.testing.assert_close(from_tensor["pixel_values"], from_pil)


def test_tokenizer_matches_openai_clip_tokenize(tokenizer):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import clip
    texts = ["Good photo.", "Noise-free image.", "High-resolution image.", "A photo of a cat's whiskers!"]
    ours = tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")
    reference = clip.tokenize(texts).long()
    lengths = ours["attention_mask"].sum(-1)
    for row, length in enumerate(lengths):
        assert torch.equal(ours["input_ids"][row, :length], reference[row, :length])
    assert len(tokenizer) == 49408


def test_processor_round_trip_and_both_modalities(tmp_path, tokenizer):
    processor = QualiCLIPProcessor(image_processor=QualiCLIPImageProcessor(max_size=64), tokenizer=tokenizer)
    processor.save_pretrained(tmp_path)
    loaded = QualiCLIPProcessor.from_pretrained(tmp_path)
    assert loaded.image_processor.max_size == 64
    out = loaded(images=photo(100, 50), text=["Good photo."], return_tensors="pt", padding="max_length", max_length=77)
    assert out["pixel_values"].shape == (1, 3, 64, 32)
    assert out["input_ids"].shape == (1, 77)
    with pytest.raises(ValueError, match="at least one input"):  # transformers' ProcessorMixin.__call__
        loaded()


def test_do_convert_rgb_false_keeps_the_channels_as_given():
    processor = QualiCLIPImageProcessor()
    rgba = np.random.default_rng(0).integers(0, 256, (40, 48, 4), dtype=np.uint8)
    kept = processor(rgba, do_convert_rgb=False, image_mean=[0.0] * 4, image_std=[1.0] * 4, return_tensors="pt")
    torch.testing.assert_close(kept.pixel_values[0], torch.from_numpy(rgba).permute(2, 0, 1).float() / 255)
    grey = Image.fromarray(rgba[..., 0], mode="L")
    grey_pixels = processor(grey, do_convert_rgb=False, image_mean=0.5, image_std=0.5, return_tensors="pt")
    assert grey_pixels.pixel_values.shape == (1, 1, 40, 48)
    # The default still composites transparency and expands grey to RGB.
    assert processor(rgba, return_tensors="pt").pixel_values.shape == (1, 3, 40, 48)


def test_statistics_of_the_wrong_length_are_named():
    with pytest.raises(ValueError, match="image_mean has 4 values for images of 3 channels"):
        QualiCLIPImageProcessor()(photo(40, 40), image_mean=[0.5] * 4, return_tensors="pt")
