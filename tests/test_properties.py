"""Property-based tests (hypothesis): whatever the size, mode, layout or dtype of an image, the processor either
refuses it with a clear `ValueError`/`TypeError` (and only when it is invalid) or gives pixel values of the right
shape, finite and within the normalised range; the model scores any image of at least 32x32 in [0, 1]."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from qualiclip_hf import QualiCLIPImageProcessor
from qualiclip_hf.image_processing_qualiclip import MIN_IMAGE_SIZE

from .conftest import CLIP_MEAN, CLIP_STD

# Derandomised: CI runs the same examples every time; modest counts keep it to seconds.
PROPERTY = settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
MODES = ["L", "LA", "RGB", "RGBA", "P", "CMYK", "I;16", "I", "F"]
# Normalised [0, 1] pixels, with room for the slight overshoot of the bicubic downscaling of `max_size`.
LOW, HIGH = (-0.02 - CLIP_MEAN) / CLIP_STD, (1.02 - CLIP_MEAN) / CLIP_STD

sizes = st.integers(min_value=1, max_value=600)
# `max_size` below the model's minimum is refused when the processor is made (see `test_max_size_below_the_minimum`).
max_sizes = st.none() | st.integers(MIN_IMAGE_SIZE, 600)


def check_output(out, expected_sizes: list[tuple[int, int]]) -> None:
    pixel_values, image_sizes = out["pixel_values"], out["image_sizes"]
    height = max(size[0] for size in expected_sizes)
    width = max(size[1] for size in expected_sizes)
    assert tuple(pixel_values.shape) == (len(expected_sizes), 3, height, width)
    assert pixel_values.dtype == torch.float32 and torch.isfinite(pixel_values).all()
    assert image_sizes.tolist() == [list(size) for size in expected_sizes]
    for index, (h, w) in enumerate(expected_sizes):
        image = pixel_values[index : index + 1, :, :h, :w]
        assert ((image >= LOW) & (image <= HIGH)).all()
        assert not pixel_values[index, :, h:, :].any() and not pixel_values[index, :, :, w:].any()  # zero padding


def capped(size: tuple[int, int], max_size: int | None) -> tuple[int, int]:
    height, width = size
    if max_size is None or max(height, width) <= max_size:
        return size
    scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def below_minimum(size: tuple[int, int]) -> bool:
    return min(size) < MIN_IMAGE_SIZE


def pil_image(mode: str, height: int, width: int, seed: int, special: float | None) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-100, 70000, (height, width)).astype(np.int32))
    if mode == "F":
        array = rng.uniform(0, 1, (height, width)).astype(np.float32)  # floating point: [0, 1]
        if special is not None:
            array[rng.integers(height), rng.integers(width)] = special
        return Image.fromarray(array, mode="F")
    image = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), mode="RGBA")
    return image.convert("RGB").quantize(colors=64) if mode == "P" else image.convert(mode)


@PROPERTY
@given(
    mode=st.sampled_from(MODES),
    height=sizes,
    width=sizes,
    seed=st.integers(0, 2**32 - 1),
    special=st.sampled_from([None, None, float("nan"), float("inf")]),
    max_size=max_sizes,
)
def test_processor_on_pil_images_of_any_mode_and_size(mode, height, width, seed, special, max_size):
    image = pil_image(mode, height, width, seed, special)
    processor = QualiCLIPImageProcessor(max_size=max_size)
    if mode == "F" and special is not None:
        with pytest.raises(ValueError, match="NaN or infinite pixel values"):
            processor(image, return_tensors="pt")
        return
    if mode == "I":  # 32-bit integers with no file format to say their range: refused, never guessed
        with pytest.raises(ValueError, match=r"mode I .* does not say the range"):
            processor(image, return_tensors="pt")
        return
    expected = capped((height, width), max_size)
    if below_minimum(expected):
        with pytest.raises(ValueError, match=r"below the model's 32x32 minimum"):
            processor(image, return_tensors="pt")
        return
    check_output(processor(image, return_tensors="pt"), [expected])


@st.composite
def arrays(draw):
    """An image as a numpy array or torch tensor of any layout, channel count and dtype, sometimes invalid."""
    height, width = draw(sizes), draw(sizes)
    channels = draw(st.sampled_from([1, 2, 3, 4]))
    layout = draw(st.sampled_from(["channels_first", "channels_last", "2d"]))
    dtype = draw(st.sampled_from(["uint8", "uint16", "float32", "int64", "bool"]))
    flaw = draw(st.sampled_from([None, None, None, "nan", "inf", "negative", "too_large"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (height, width) if layout == "2d" else (height, width, channels)
    if dtype == "float32":
        array = rng.uniform(0, 1, shape).astype(np.float32)  # floating point: [0, 1]
    elif dtype == "bool":
        array = rng.integers(0, 2, shape).astype(bool)
    else:
        top = {"uint8": 256, "uint16": 65536, "int64": 256}[dtype]
        array = rng.integers(0, top, shape).astype(dtype)
    index = tuple(rng.integers(0, n) for n in shape)
    if flaw in ("nan", "inf") and dtype == "float32":
        array[index] = float(flaw)
    elif flaw == "negative" and dtype in ("float32", "int64"):
        array[index] = -5
    elif flaw == "too_large" and dtype in ("float32", "int64"):
        array[index] = 1000
    else:
        flaw = None
    if layout == "channels_first":
        array = np.ascontiguousarray(np.moveaxis(array, -1, 0))
    as_tensor = draw(st.booleans()) and dtype != "uint16"  # torch has little support for uint16
    image = torch.from_numpy(array) if as_tensor else array
    valid = dtype != "bool" and flaw is None and (layout == "2d" or channels != 2)
    return image, layout, (height, width), valid


@PROPERTY
@given(case=arrays(), max_size=max_sizes)
def test_processor_on_arrays_and_tensors(case, max_size):
    image, layout, size, valid = case
    processor = QualiCLIPImageProcessor(max_size=max_size)
    data_format = None if layout == "2d" else layout  # square-ish shapes are ambiguous without it
    if not valid:
        with pytest.raises((ValueError, TypeError), match=r"image"):
            processor(image, input_data_format=data_format, return_tensors="pt")
        return
    if below_minimum(capped(size, max_size)):
        with pytest.raises(ValueError, match=r"below the model's 32x32 minimum"):
            processor(image, input_data_format=data_format, return_tensors="pt")
        return
    check_output(processor(image, input_data_format=data_format, return_tensors="pt"), [capped(size, max_size)])


@PROPERTY
@given(max_size=st.integers(-5, MIN_IMAGE_SIZE - 1))
def test_max_size_below_the_minimum(max_size):
    with pytest.raises(ValueError, match="max_size must be an integer of at least 32"):
        QualiCLIPImageProcessor(max_size=max_size)
    with pytest.raises(ValueError, match="max_size must be an integer of at least 32"):
        QualiCLIPImageProcessor()(np.zeros((64, 64, 3), np.uint8), max_size=max_size)


@settings(PROPERTY, max_examples=20)
@given(
    shapes=st.lists(
        st.tuples(st.integers(MIN_IMAGE_SIZE, 600), st.integers(MIN_IMAGE_SIZE, 600)), min_size=1, max_size=4
    ),
    seed=st.integers(0, 2**32 - 1),
    return_tensors=st.sampled_from(["pt", None]),
)
def test_processor_on_batches_of_mixed_sizes(shapes, seed, return_tensors):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]
    out = QualiCLIPImageProcessor()(images, return_tensors=return_tensors)
    if return_tensors is None:
        assert [tuple(p.shape) for p in out["pixel_values"]] == [(3, h, w) for h, w in shapes]
        assert [tuple(size) for size in out["image_sizes"]] == shapes
        return
    check_output(out, shapes)
    for index, image in enumerate(images):  # each image, cropped back, is what it is alone
        alone = QualiCLIPImageProcessor()(image, return_tensors="pt")["pixel_values"][0]
        h, w = shapes[index]
        assert torch.equal(out["pixel_values"][index, :, :h, :w], alone)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    shapes=st.lists(st.tuples(st.integers(32, 128), st.integers(32, 128)), min_size=1, max_size=3),
    seed=st.integers(0, 2**32 - 1),
    contrast=st.floats(0.0, 1.0),
)
@torch.no_grad()
def test_model_scores_any_image_of_the_minimum_size_or_more(tiny_model, shapes, seed, contrast):
    rng = np.random.default_rng(seed)
    images = [np.clip(128 + contrast * rng.normal(0, 100, (h, w, 3)), 0, 255).astype(np.uint8) for h, w in shapes]
    inputs = QualiCLIPImageProcessor()(images, return_tensors="pt")
    scores = tiny_model(**inputs).quality_score
    assert scores.shape == (len(shapes),) and torch.isfinite(scores).all()
    assert ((scores >= 0) & (scores <= 1)).all()
    for image, score in zip(images, scores, strict=True):  # padding never changes a score
        alone = tiny_model(**QualiCLIPImageProcessor()(image, return_tensors="pt")).quality_score[0]
        assert abs(score - alone) <= 1e-5
