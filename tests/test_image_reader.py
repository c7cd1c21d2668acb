"""One picture, one score, however it arrives: a corpus of odd inputs generated here (nothing binary is committed),
each scored through every entry point (`score_files` behind `qualiclip score`, the processor, the pipeline, the pyiqa
plugin's tensor path, the Gradio app, the Endpoints handler) and compared with the equivalent plain 8-bit sRGB
picture, or checked to give the same clear error everywhere. Demo model (fast)."""

from __future__ import annotations

import io
import logging
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms, ImageFile
from transformers import pipeline

from qualiclip_hf import IMAGE_QUALITY_TASK
from qualiclip_hf.explain import explain_image
from qualiclip_hf.image_reader import array_to_chw, image_file_extensions, open_image, to_viewable_rgb
from qualiclip_hf.scoring import collect_image_paths, read_image, score_files

from .conftest import direct_scores, good_score, image_bytes, photo

TOLERANCE = 1e-5
HEIGHT, WIDTH = 72, 96


# ------------------------------------------------------------------------------------------------ the entry points


@pytest.fixture(scope="module")
def judge(demo):
    model, processor = demo
    return pipeline(IMAGE_QUALITY_TASK, model=model, image_processor=processor.image_processor)


@pytest.fixture(scope="module")
def plugin_net():
    pytest.importorskip("pyiqa")
    from pyiqa_plugin import QualiCLIPHF

    # The model's own formula, so that the plugin's number is the processor's.
    return QualiCLIPHF(pretrained_model_name_or_path="demo", logit_scale="official").eval()


def reference_score(demo, image: Image.Image, **options: Any) -> float:
    """The score of a plain 8-bit sRGB picture, through the processor."""
    assert image.mode == "RGB"
    return direct_scores(*demo, image, **options).item()


def outcomes_for_file(path: Path, demo, judge, handler, max_size: int | None = None) -> dict[str, float | str]:
    """Score or error message of a file through every entry point that takes files (or their bytes)."""
    model, processor = demo
    options = {} if max_size is None else {"max_size": max_size}
    outcomes: dict[str, float | str] = {}
    (result,) = score_files([path], model, processor, batch_size=1, num_workers=0, max_size=max_size)
    outcomes["score_files"] = result.score if result.error is None else result.error
    outcomes["processor"] = _attempt(lambda: _processor_score(demo, str(path), options))
    outcomes["pipeline"] = _attempt(lambda: judge(str(path), **options)[0]["score"])
    outcomes["app"] = _attempt(lambda: explain_image(read_image(path), model, processor, max_size=max_size).score)
    outcomes["handler"] = _attempt(lambda: good_score(handler({"inputs": path.read_bytes(), "parameters": options})))
    return outcomes


def outcomes_for_object(image: Any, demo, judge, plugin_net=None) -> dict[str, float | str]:
    """Score or error message of an in-memory image (PIL image or array) through the entry points that take one."""
    outcomes = {
        "processor": _attempt(lambda: _processor_score(demo, image, {})),
        "pipeline": _attempt(lambda: judge(image)[0]["score"]),
    }
    if plugin_net is not None:
        outcomes["plugin"] = _attempt(lambda: plugin_score(plugin_net, array_to_chw(image)))
    return outcomes


def plugin_score(plugin_net, image: torch.Tensor) -> float:
    """The plugin's tensor path: a `(3, height, width)` image as pyiqa hands it, floats in [0, 1]."""
    pixels = image.float() / 255 if image.dtype == torch.uint8 else image
    with torch.no_grad():
        return plugin_net(pixels[None]).item()


def _processor_score(demo, image: Any, options: dict) -> float:
    return direct_scores(*demo, image, **options).item()


def _attempt(score) -> float | str:
    try:
        return float(score())
    except ValueError as error:
        return str(error)


def assert_all_score(outcomes: dict[str, float | str], expected: float) -> None:
    for entry_point, outcome in outcomes.items():
        assert isinstance(outcome, float), f"{entry_point}: {outcome}"
        assert outcome == pytest.approx(expected, abs=TOLERANCE, rel=0), entry_point


def assert_all_refuse(outcomes: dict[str, float | str], *needles: str) -> None:
    for entry_point, outcome in outcomes.items():
        assert isinstance(outcome, str), f"{entry_point} scored {outcome} instead of refusing"
        for needle in needles:
            assert needle in outcome, f"{entry_point}: {outcome!r} lacks {needle!r}"


# ------------------------------------------------------------------------------------------------------ the corpus


def grey_levels(seed: int, high: int = 255) -> np.ndarray:
    """A smooth grey picture with 8-bit levels up to `high`, `(HEIGHT, WIDTH)` uint8."""
    grey = np.asarray(photo(HEIGHT, WIDTH, seed=seed).convert("L"), dtype=np.float64)
    return np.rint(grey * high / 255).astype(np.uint8)


def eight_bit_rgb(levels: np.ndarray) -> Image.Image:
    return Image.fromarray(levels).convert("RGB")


@dataclass
class WideSample:
    """A file whose samples are wider than 8 bits, and the 8-bit levels it stands for."""

    name: str
    data: bytes
    levels: np.ndarray = field(repr=False)


def wide_samples() -> list[WideSample]:
    # Dark pictures (levels <= 40) make the old fault obvious: read as 8-bit values, 16-bit samples are 257 times too
    # bright. Samples are exact multiples of the 8-bit level where the width allows, so the equivalent is unique.
    dark = grey_levels(1, high=40)
    mid = grey_levels(2)
    samples = [
        WideSample("dark.pgm", b"P5\n%d %d\n65535\n" % (WIDTH, HEIGHT) + (dark.astype(">u2") * 257).tobytes(), dark),
        WideSample("dark16.png", image_bytes(Image.fromarray(dark.astype(np.uint16) * 257), "PNG"), dark),
        WideSample("mid16.tif", image_bytes(Image.fromarray(mid.astype(np.uint16) * 257), "TIFF"), mid),
    ]
    # 32-bit signed integer TIFF (mode I): full white is 2**31 - 1, as its BitsPerSample and SampleFormat say.
    int32 = np.rint(mid.astype(np.float64) * (2**31 - 1) / 255).astype(np.int32)
    samples.append(WideSample("mid32.tif", image_bytes(Image.fromarray(int32), "TIFF"), mid))
    # 32-bit float TIFF (mode F): [0, 1].
    samples.append(WideSample("midF.tif", image_bytes(Image.fromarray(mid.astype(np.float32) / 255), "TIFF"), mid))
    return samples


def adobe_rgb_profile() -> bytes:
    """An ICC v2 matrix/TRC profile with Adobe RGB (1998) primaries (D50-adapted colorants, gamma 563/256)."""

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + bytes(4) + b"".join(struct.pack(">i", round(v * 65536)) for v in (x, y, z))

    gamma = b"curv" + bytes(4) + struct.pack(">I", 1) + struct.pack(">H", 563) + bytes(2)
    text = b"Adobe RGB test\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(4 + 4 + 2 + 1 + 67)
    tags = [
        (b"desc", desc),
        (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
        (b"rXYZ", xyz(0.6097, 0.3111, 0.0195)),
        (b"gXYZ", xyz(0.2053, 0.6257, 0.0609)),
        (b"bXYZ", xyz(0.1492, 0.0632, 0.7446)),
        (b"rTRC", gamma),
        (b"gTRC", gamma),
        (b"bTRC", gamma),
        (b"cprt", b"text" + bytes(4) + b"none\0\0\0\0"),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for signature, payload in tags:
        payload += bytes(-len(payload) % 4)
        table += signature + struct.pack(">II", offset + len(body), len(payload))
        body += payload
    size = offset + len(body)
    header = (
        struct.pack(">I", size)
        + b"lcms"
        + struct.pack(">I", 0x02100000)
        + b"mntrRGB XYZ "
        + bytes(12)
        + b"acsp"
        + bytes(24)
        + struct.pack(">I", 0)  # rendering intent
        + b"".join(struct.pack(">i", round(v * 65536)) for v in (0.9642, 1.0, 0.8249))
        + bytes(4)
    )
    header += bytes(128 - len(header))
    return header + struct.pack(">I", len(tags)) + table + body


# ------------------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("sample", wide_samples(), ids=lambda sample: sample.name)
def test_wide_samples_score_as_their_8_bit_picture(sample, demo, judge, handler, tmp_path):
    path = tmp_path / sample.name
    path.write_bytes(sample.data)
    assert np.array_equal(np.asarray(open_image(path)), np.asarray(eight_bit_rgb(sample.levels)))
    expected = reference_score(demo, eight_bit_rgb(sample.levels))
    assert_all_score(outcomes_for_file(path, demo, judge, handler), expected)


def test_a_dark_16_bit_frame_is_not_read_as_bright(demo, tmp_path):
    # The fault of reading 16-bit samples as 8-bit values gives a white picture; the score must be the dark one's.
    sample = wide_samples()[0]
    path = tmp_path / sample.name
    path.write_bytes(sample.data)
    assert read_image(path).max() <= 40
    bright = eight_bit_rgb(np.minimum(sample.levels.astype(np.int64) * 257, 255).astype(np.uint8))
    dark = eight_bit_rgb(sample.levels)
    assert abs(reference_score(demo, bright) - reference_score(demo, dark)) > 1e-3  # the test can tell them apart


def test_wide_pil_images_score_as_their_8_bit_picture(demo, judge, plugin_net):
    levels = grey_levels(3)
    expected = reference_score(demo, eight_bit_rgb(levels))
    for image in (Image.fromarray(levels.astype(np.uint16) * 257), Image.fromarray(levels.astype(np.float32) / 255)):
        assert image.mode in ("I;16", "F")
        assert_all_score(outcomes_for_object(image, demo, judge), expected)
    # A 32-bit integer image that no file format describes has no known range: refused, not guessed.
    assert_all_refuse(outcomes_for_object(Image.fromarray(levels.astype(np.int32)), demo, judge), "mode I")


def test_float_arrays_are_on_the_0_to_1_scale_everywhere(demo, judge, plugin_net):
    image = photo(HEIGHT, WIDTH, seed=4)
    expected = reference_score(demo, image)
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    for floats in (pixels.float() / 255, pixels.double().numpy() / 255, pixels.permute(1, 2, 0).float() / 255):
        assert_all_score(outcomes_for_object(floats, demo, judge, plugin_net), expected)
    uint16 = pixels.numpy().astype(np.uint16) * 257
    assert_all_score(outcomes_for_object(uint16, demo, judge, plugin_net), expected)
    # Floats on the 0-255 scale are refused with the way out, never read as a white picture.
    outcomes = outcomes_for_object(pixels.float(), demo, judge, plugin_net)
    assert_all_refuse(outcomes, "[0, 1]", "uint8")
    # `do_rescale=False` (inputs already in [0, 1]) is accepted by the pipeline as by the processor.
    assert judge(pixels.float() / 255, do_rescale=False)[0]["score"] == pytest.approx(expected, abs=TOLERANCE)


def test_max_size_resizes_the_same_way_everywhere(demo, judge, handler, plugin_net, tmp_path):
    image = photo(300, 400, seed=5)
    path = tmp_path / "large.png"
    image.save(path)
    expected = reference_score(demo, image, max_size=96)
    assert expected != pytest.approx(reference_score(demo, image), abs=1e-4)  # the resize matters
    assert_all_score(outcomes_for_file(path, demo, judge, handler, max_size=96), expected)
    tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    assert plugin_net.max_size is None
    plugin_net.max_size = 96
    try:
        assert plugin_score(plugin_net, tensor) == pytest.approx(expected, abs=TOLERANCE)
    finally:
        plugin_net.max_size = None
    # Below the minimum after max_size: the same message everywhere.
    assert_all_refuse(outcomes_for_file(path, demo, judge, handler, max_size=40), "minimum", "max_size=40")


def test_icc_profiles_are_converted_to_srgb(demo, judge, handler, tmp_path):
    image = photo(HEIGHT, WIDTH, seed=6)
    adobe = adobe_rgb_profile()
    path = tmp_path / "adobe.png"
    image.save(path, icc_profile=adobe)
    srgb = ImageCms.profileToProfile(
        image, ImageCms.ImageCmsProfile(io.BytesIO(adobe)), ImageCms.createProfile("sRGB"), outputMode="RGB"
    )
    converted, raw = reference_score(demo, srgb), reference_score(demo, image)
    assert abs(converted - raw) > 1e-4  # the profile changes what is seen
    assert_all_score(outcomes_for_file(path, demo, judge, handler), converted)
    # Turned off: the stored values, as the official code and pyiqa read them.
    model, processor = demo
    assert _processor_score(demo, str(path), {"convert_icc": False}) == pytest.approx(raw, abs=TOLERANCE)
    assert judge(str(path), convert_icc=False)[0]["score"] == pytest.approx(raw, abs=TOLERANCE)
    (result,) = score_files([path], model, processor, num_workers=0, convert_icc=False)
    assert result.score == pytest.approx(raw, abs=TOLERANCE)
    assert good_score(handler({"inputs": path.read_bytes(), "parameters": {"convert_icc": False}})) == pytest.approx(
        raw, abs=TOLERANCE
    )


def _frames() -> list[Image.Image]:
    return [photo(HEIGHT, WIDTH, seed=seed) for seed in (10, 11, 12)]


@pytest.mark.parametrize("kind", ["gif", "apng", "apng-default-image", "webp"])
def test_animations_score_their_first_shown_frame(kind, demo, judge, handler, tmp_path):
    frames = _frames()
    if kind == "gif":
        path = tmp_path / "anim.gif"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
        with Image.open(path) as opened:
            first = opened.convert("RGB")  # the palette-quantised first frame, as shown
    elif kind == "apng":
        path = tmp_path / "anim.png"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
        first = frames[0]
    elif kind == "apng-default-image":
        # The default image is a still for viewers without APNG support; the animation starts with frames[1].
        path = tmp_path / "anim-default.png"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, default_image=True)
        first = frames[1]
    else:
        path = tmp_path / "anim.webp"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, lossless=True)
        first = frames[0]
    assert_all_score(outcomes_for_file(path, demo, judge, handler), reference_score(demo, first))


@pytest.fixture
def jpeg_bytes() -> bytes:
    return image_bytes(photo(HEIGHT, WIDTH, seed=7), "JPEG", quality=90)


@pytest.mark.parametrize("load_truncated_images", [False, True])
def test_truncated_jpeg_is_refused_whatever_pillows_global_flag(
    load_truncated_images, jpeg_bytes, demo, judge, handler, tmp_path, monkeypatch
):
    # pyiqa switches `ImageFile.LOAD_TRUNCATED_IMAGES` on for the whole process; the verdict must not change.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated_images)
    for name, data in (("cut.jpg", jpeg_bytes[: len(jpeg_bytes) * 6 // 10]), ("cut-end.jpg", jpeg_bytes[:-12])):
        path = tmp_path / name
        path.write_bytes(data)
        assert_all_refuse(outcomes_for_file(path, demo, judge, handler), "truncated")


@pytest.mark.parametrize("load_truncated_images", [False, True])
def test_jpeg_missing_only_its_end_marker_is_scored_with_a_warning(
    load_truncated_images, jpeg_bytes, demo, judge, handler, tmp_path, monkeypatch
):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated_images)
    assert jpeg_bytes.endswith(b"\xff\xd9")
    path = tmp_path / "no-eoi.jpg"
    path.write_bytes(jpeg_bytes[:-2])
    with Image.open(io.BytesIO(jpeg_bytes)) as complete:
        expected = reference_score(demo, complete.convert("RGB"))
    with pytest.warns(UserWarning, match="end-of-image marker"):
        open_image(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert_all_score(outcomes_for_file(path, demo, judge, handler), expected)


def test_folder_scan_takes_every_extension_a_reader_opens(tmp_path, caplog):
    image = photo(40, 40, seed=8)
    names = ["a.jpg", "b.JPG", "c.jpeg", "d.jfif", "e.jpe", "f.jif", "g.PNG"]
    for name in names:
        image.save(tmp_path / name, "JPEG" if not name.lower().endswith(".png") else "PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "data.csv").write_text("a,b")
    with caplog.at_level(logging.WARNING, logger="qualiclip_hf.scoring.files"):
        found = collect_image_paths([tmp_path])
    assert sorted(path.name for path in found) == sorted(names)
    assert "skipped 2 file(s)" in caplog.text
    assert {".jpg", ".jpeg", ".jfif", ".jpe", ".jif", ".png", ".tif", ".webp", ".gif"} <= image_file_extensions()


def test_array_layout_is_inferred_from_the_possible_end(demo, judge):
    # (2, 500, 3): 2 cannot be a channel count, so channels are last, and the error names the picture's real size.
    array = np.full((2, 500, 3), 128, np.uint8)
    assert array_to_chw(array).shape == (3, 2, 500)
    assert_all_refuse(outcomes_for_object(array, demo, judge), "500x2 pixels", "minimum")
    image = photo(40, 500, seed=9)
    expected = reference_score(demo, image)
    assert_all_score(outcomes_for_object(np.asarray(image), demo, judge), expected)


def test_a_broken_pil_image_gets_a_clear_message(demo, judge, handler, tmp_path):
    path = tmp_path / "broken.png"
    data = image_bytes(photo(HEIGHT, WIDTH, seed=10), "PNG")
    path.write_bytes(data[: len(data) // 2])
    model, processor = demo

    def opened() -> Image.Image:
        return Image.open(path)  # lazy: decoding fails later, inside the entry point

    outcomes = {
        "processor": _attempt(lambda: _processor_score(demo, opened(), {})),
        "pipeline": _attempt(lambda: judge(opened())[0]["score"]),
        "app": _attempt(lambda: explain_image(opened(), model, processor).score),
        "handler": _attempt(lambda: good_score(handler({"inputs": opened()}))),
    }
    assert_all_refuse(outcomes, f"{path}: truncated: the file ends before its image data do")
    # The same message as for the path itself.
    assert_all_refuse(
        outcomes_for_file(path, demo, judge, handler), "truncated: the file ends before its image data do"
    )


def test_a_16_bit_colour_key_makes_only_its_exact_samples_transparent(tmp_path):
    # Samples 0, 16, 32, ... all round to 8-bit level 0; only those equal to the key (0) are transparent (white).
    samples = (np.arange(HEIGHT * WIDTH).reshape(HEIGHT, WIDTH) % 4096).astype(np.uint16) * 16
    path = tmp_path / "keyed16.png"
    Image.fromarray(samples).save(path, transparency=0)
    pixels = read_image(path)
    assert pixels[:, samples == 0].eq(255).all()
    assert pixels[:, (samples > 0) & (samples < 128)].eq(0).all()


# ------------------------------------------------------------------------------- PIL images the user opened


def reader_corpus() -> dict[str, bytes]:
    """Every kind of file above, by name: its bytes."""
    corpus = {sample.name: sample.data for sample in wide_samples()}
    image = photo(HEIGHT, WIDTH, seed=6)
    corpus["adobe.png"] = image_bytes(image, "PNG", icc_profile=adobe_rgb_profile())
    frames = _frames()
    corpus["anim.gif"] = image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    corpus["anim.png"] = image_bytes(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100)
    corpus["anim-default.png"] = image_bytes(
        frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100, default_image=True
    )
    corpus["anim.webp"] = image_bytes(
        frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100, lossless=True
    )
    jpeg = image_bytes(photo(HEIGHT, WIDTH, seed=7), "JPEG", quality=90)
    corpus["cut.jpg"] = jpeg[: len(jpeg) * 6 // 10]
    corpus["cut-end.jpg"] = jpeg[:-12]
    corpus["no-eoi.jpg"] = jpeg[:-2]
    png = image_bytes(photo(HEIGHT, WIDTH, seed=10), "PNG")
    corpus["broken.png"] = png[: len(png) // 2]
    samples = (np.arange(HEIGHT * WIDTH).reshape(HEIGHT, WIDTH) % 4096).astype(np.uint16) * 16
    corpus["keyed16.png"] = image_bytes(Image.fromarray(samples), "PNG", transparency=0)
    return corpus


def outcomes_for_opened(path: Path, demo, judge, handler) -> dict[str, float | str]:
    """`outcomes_for_file`'s entry points that take PIL images, each given a fresh `Image.open(path)`."""
    model, processor = demo
    return {
        "processor": _attempt(lambda: _processor_score(demo, Image.open(path), {})),
        "pipeline": _attempt(lambda: judge(Image.open(path))[0]["score"]),
        "app": _attempt(lambda: explain_image(Image.open(path), model, processor).score),
        "handler": _attempt(lambda: good_score(handler({"inputs": Image.open(path)}))),
    }


@pytest.mark.parametrize("load_truncated_images", [False, True])
def test_an_opened_pil_image_scores_as_its_file(load_truncated_images, demo, judge, handler, tmp_path, monkeypatch):
    # `Image.open(path)` handed over undecoded is read from its file by the same rules as the path: the frame an
    # animation shows, truncation judged by the reader rather than Pillow's flag, the JPEG lacking only its end marker.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated_images)
    for name, data in reader_corpus().items():
        path = tmp_path / name
        path.write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the JPEG lacking its end marker, both ways
            from_path = outcomes_for_file(path, demo, judge, handler)
            from_image = outcomes_for_opened(path, demo, judge, handler)
        refusal = from_path["processor"]
        if isinstance(refusal, float):
            assert_all_score(from_image, refusal)
            assert_all_score(from_path, refusal)
            continue
        # The same cause everywhere, and the image's error names the file it was opened from.
        cause = refusal.removeprefix(f"{path}: ")
        assert cause != refusal, refusal
        assert_all_refuse(from_path, cause)
        assert_all_refuse(from_image, cause, str(path))


def test_the_jpeg_lacking_its_end_marker_warns_as_an_opened_image_too(jpeg_bytes, demo, tmp_path):
    path = tmp_path / "no-eoi.jpg"
    path.write_bytes(jpeg_bytes[:-2])
    with pytest.warns(UserWarning, match=f"{path}: the JPEG file lacks its final end-of-image marker"):
        _processor_score(demo, Image.open(path), {})


def test_an_opened_image_read_again_is_left_as_the_user_had_it(tmp_path):
    frames = _frames()
    path = tmp_path / "anim-default.png"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, default_image=True)
    opened = Image.open(path)
    assert np.array_equal(np.asarray(to_viewable_rgb(opened)), np.asarray(frames[1]))
    # Still undecoded, on its frame, its file open: the user's image is theirs to use as before.
    assert opened.tell() == 0 and opened.tile and not opened.fp.closed
    assert np.array_equal(np.asarray(opened.convert("RGB")), np.asarray(frames[0]))
    # A `with` block that closed the file: read from the path.
    with Image.open(path) as closed:
        pass
    assert np.array_equal(np.asarray(to_viewable_rgb(closed)), np.asarray(frames[1]))


def test_a_pil_image_decoded_or_changed_by_the_user_is_scored_as_it_is(demo, judge, jpeg_bytes, tmp_path):
    frames = _frames()
    path = tmp_path / "anim-default.png"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, default_image=True)
    # Decoded by the user: the APNG's default image, the pixels the user has.
    decoded = Image.open(path)
    decoded.load()
    assert_all_score(outcomes_for_object(decoded, demo, judge), reference_score(demo, frames[0]))
    # Moved to another frame: that frame.
    moved = Image.open(path)
    moved.seek(2)
    assert_all_score(outcomes_for_object(moved, demo, judge), reference_score(demo, frames[2]))
    # A JPEG put in draft mode (decoded at half size): the smaller picture asked for.
    jpeg_path = tmp_path / "photo.jpg"
    jpeg_path.write_bytes(jpeg_bytes)
    with Image.open(jpeg_path) as reference:
        reference.draft("RGB", (WIDTH // 2, HEIGHT // 2))
        half = reference.convert("RGB")
    assert half.size == (WIDTH // 2, HEIGHT // 2)
    drafted = Image.open(jpeg_path)
    drafted.draft("RGB", (WIDTH // 2, HEIGHT // 2))
    assert_all_score(outcomes_for_object(drafted, demo, judge), reference_score(demo, half))
