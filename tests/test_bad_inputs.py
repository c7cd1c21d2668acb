"""Every odd or bad image file, through every way in: `read_image`, the processor, `score_files`, the CLI, pyiqa.

The corpus is written by the `corpus` fixture (nothing binary is committed). Each case has a defined outcome:

- `Read`: the file is scored as the RGB image `expected` (what a viewer shows: transparency on white, EXIF
  orientation applied, 16 bits scaled to 8, the first frame of an animation), within `tolerance` (mean absolute
  difference in 8-bit levels; 0 for lossless files).
- `TooSmall`: the file reads, but is smaller than the model's 32x32 minimum: scoring refuses it, naming the minimum.
- `Refused`: reading fails with a `ValueError` naming the file and matching `cause`.
"""

from __future__ import annotations

import io
import json
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

from qualiclip_hf import QualiCLIPImageProcessor
from qualiclip_hf.cli import main
from qualiclip_hf.image_reader import open_image
from qualiclip_hf.scoring import collect_image_paths, read_image, score_files
from qualiclip_hf.scoring.files import _ImageFiles

from .conftest import CLIP_MEAN, CLIP_STD, direct_scores, photo

MIN_SIZE = 32


@dataclass
class Read:
    expected: np.ndarray  # (height, width, 3) uint8
    tolerance: float = 0.0
    # pyiqa reads files with its own reader (PIL's RGB conversion): the same pixels as ours only without
    # transparency, EXIF orientation or 16-bit samples.
    pyiqa_reads_the_same: bool = True


@dataclass
class TooSmall:
    size: tuple[int, int]  # (height, width)


@dataclass
class Refused:
    cause: str  # a regular expression


def rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def on_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """`color` (H, W, C) composited onto white with `alpha` (H, W) in 0..255."""
    a = alpha[..., None].astype(np.float64) / 255
    return np.rint(color * a + 255 * (1 - a)).astype(np.uint8)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def write_png16_rgb(path: Path, samples: np.ndarray) -> None:
    """A 48-bit RGB PNG (Pillow does not write those): `samples` (H, W, 3) uint16."""
    height, width = samples.shape[:2]
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in samples)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    body = png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def write_png_bomb(path: Path, width: int, height: int) -> None:
    """A valid PNG header claiming `width` x `height` greyscale pixels, followed by a few rows of data: a few hundred
    bytes that would take `width * height` bytes of memory to decode."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = zlib.compress(b"\0" * (width + 1) * 4)
    body = png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def build_corpus(folder: Path) -> dict[str, Read | TooSmall | Refused]:
    cases: dict[str, Read | TooSmall | Refused] = {}
    base = photo(64, 80, seed=1)

    base.convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    cases["cmyk.jpg"] = Read(rgb(base), tolerance=4)

    samples = np.asarray(base).astype(np.uint16) * 257  # 8-bit p is 16-bit p * 257 exactly
    write_png16_rgb(folder / "rgb16.png", samples)
    cases["rgb16.png"] = Read(rgb(base), pyiqa_reads_the_same=True)  # Pillow keeps the high byte: the same

    grey = base.convert("L")
    Image.fromarray(np.asarray(grey).astype(np.uint16) * 257).save(folder / "grey16.png")
    cases["grey16.png"] = Read(rgb(grey), pyiqa_reads_the_same=False)  # PIL's own conversion clips to white

    grey.save(folder / "grey.png")
    cases["grey.png"] = Read(rgb(grey))

    palette = base.quantize(colors=16)
    palette.save(folder / "palette_transparent.png", transparency=0)
    indices = np.asarray(palette)
    expected = rgb(palette).copy()
    expected[indices == 0] = 255
    assert (indices == 0).any() and (indices != 0).any()
    cases["palette_transparent.png"] = Read(expected, pyiqa_reads_the_same=False)

    alpha = np.tile(np.linspace(0, 255, 80).round().astype(np.uint8), (64, 1))
    Image.fromarray(np.dstack([np.asarray(base), alpha])).save(folder / "rgba.png")
    cases["rgba.png"] = Read(on_white(np.asarray(base), alpha), tolerance=0.5, pyiqa_reads_the_same=False)

    Image.fromarray(np.dstack([np.asarray(grey), alpha[:, ::-1]])).save(folder / "grey_alpha.png")
    expected = on_white(np.asarray(grey)[..., None], alpha[:, ::-1]).repeat(3, axis=2)
    cases["grey_alpha.png"] = Read(expected, tolerance=0.5, pyiqa_reads_the_same=False)

    frames = [photo(48, 64, seed=seed).quantize(colors=32) for seed in (2, 3, 4)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    cases["animated.gif"] = Read(rgb(frames[0]))

    frames = [photo(48, 64, seed=seed) for seed in (5, 6, 7)]
    frames[0].save(folder / "animated.webp", save_all=True, append_images=frames[1:], duration=100, lossless=True)
    cases["animated.webp"] = Read(rgb(frames[0]))

    upright = photo(72, 40, seed=8)
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera held sideways: "rotate 90 degrees clockwise to display"
    upright.transpose(Image.Transpose.ROTATE_90).save(folder / "exif_rotated.jpg", quality=95, exif=exif.tobytes())
    cases["exif_rotated.jpg"] = Read(rgb(upright), tolerance=8, pyiqa_reads_the_same=False)

    base.save(folder / "png_named.jpg", format="PNG")  # the content decides, not the name
    cases["png_named.jpg"] = Read(rgb(base))

    if features.check("avif"):
        base.save(folder / "photo.avif", quality=95)
        cases["photo.avif"] = Read(rgb(base), tolerance=8)

    photo(1, 1, seed=9).save(folder / "tiny_1x1.png")
    cases["tiny_1x1.png"] = TooSmall((1, 1))
    photo(16, 16, seed=10).save(folder / "tiny_16x16.png")
    cases["tiny_16x16.png"] = TooSmall((16, 16))

    jpeg = io.BytesIO()
    photo(120, 120, seed=11).save(jpeg, "JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    cases["truncated.jpg"] = Refused(r"truncated: the file ends before its image data do")
    png = io.BytesIO()
    photo(120, 120, seed=12).save(png, "PNG")
    (folder / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    cases["truncated.png"] = Refused(r"truncated: the file ends before its image data do")
    damaged = bytearray(png.getvalue())
    damaged[20] ^= 0xFF  # inside the header chunk: its checksum no longer matches
    (folder / "damaged_header.png").write_bytes(bytes(damaged))
    cases["damaged_header.png"] = Refused(r"not an image file, a damaged one")

    (folder / "empty.jpg").write_bytes(b"")
    cases["empty.jpg"] = Refused(r"empty file \(0 bytes\)")
    (folder / "text.jpg").write_text("these are notes, not a photo\n")
    cases["text.jpg"] = Refused(r"not an image file")
    (folder / "missing_target.jpg").symlink_to(folder / "deleted.jpg")
    cases["missing_target.jpg"] = Refused(r"no such file \(broken symbolic link\)")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    cases["loop.jpg"] = Refused(r"a loop of symbolic links \(it leads back to itself\), not a file")
    # Without an image extension too: reported for what it is, not skipped as "not an image".
    (folder / "loop_one").symlink_to(folder / "loop_two")
    (folder / "loop_two").symlink_to(folder / "loop_one")
    cases["loop_one"] = cases["loop_two"] = cases["loop.jpg"]

    write_png_bomb(folder / "bomb_100mp.png", 10_000, 10_000)
    cases["bomb_100mp.png"] = Refused(
        r"10000x10000 = 100,000,000 pixels is more than the limit of 89,478,485 \(a guard against decompression "
        r"bombs\); if you trust the file, raise the limit \(max_pixels=, --max-pixels\)"
    )
    write_png_bomb(folder / "bomb_10gp.png", 100_000, 100_000)
    # Beyond twice Pillow's limit, where Pillow refuses on its own: the same message, the same limit.
    cases["bomb_10gp.png"] = Refused(
        r"100000x100000 = 10,000,000,000 pixels is more than the limit of 89,478,485 \(a guard against decompression "
        r"bombs\); if you trust the file, raise the limit \(max_pixels=, --max-pixels\)"
    )

    nan_image = np.random.default_rng(0).random((40, 40)).astype(np.float32) * 255
    nan_image[5, 7] = np.nan
    Image.fromarray(nan_image, mode="F").save(folder / "nan_float.tif")
    cases["nan_float.tif"] = Refused(r"NaN or infinite pixel values")
    return cases


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, Read | TooSmall | Refused]]:
    folder = tmp_path_factory.mktemp("bad_inputs")
    return folder, build_corpus(folder)


@pytest.fixture(scope="session")
def a_directory(tmp_path_factory) -> Path:
    """A folder named like an image. Kept out of the corpus folder: a scan lists files, so it would not appear."""
    path = tmp_path_factory.mktemp("elsewhere") / "folder.jpg"
    path.mkdir()
    return path


def case_names() -> list[str]:
    # Built once in a scratch folder to know the names at collection time.
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        return sorted(build_corpus(Path(scratch)))


CASES = case_names()


def names_the_file_and_cause(path: Path, cause: str) -> str:
    return re.escape(str(path)) + ": .*" + cause


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.mark.parametrize("name", CASES)
def test_read_image(corpus, name):
    folder, cases = corpus
    path, case = folder / name, cases[name]
    if isinstance(case, Refused):
        with pytest.raises(ValueError, match=names_the_file_and_cause(path, case.cause)):
            read_image(path)
        return
    image = read_image(path)
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    if isinstance(case, TooSmall):
        assert tuple(image.shape[1:]) == case.size
        return
    array = image.permute(1, 2, 0).numpy()
    assert array.shape == case.expected.shape
    assert mean_abs_diff(array, case.expected) <= case.tolerance, name
    if case.tolerance == 0:
        assert np.array_equal(array, case.expected)


def test_read_image_refuses_a_directory(a_directory):
    with pytest.raises(ValueError, match=names_the_file_and_cause(a_directory, "is a directory, not an image")):
        read_image(a_directory)


@pytest.mark.parametrize("name", CASES)
def test_processor_on_the_path(corpus, name):
    folder, cases = corpus
    path, case = folder / name, cases[name]
    processor = QualiCLIPImageProcessor()
    if isinstance(case, Refused):
        with pytest.raises(ValueError, match=names_the_file_and_cause(path, case.cause)):
            processor(str(path), return_tensors="pt")
        return
    if isinstance(case, TooSmall):  # the image processor owns the minimum size
        height, width = case.size
        with pytest.raises(ValueError, match=rf"{width}x{height} pixels is below the model's 32x32 minimum"):
            processor(str(path), return_tensors="pt")
        return
    # A path (str or Path) gives exactly what the decoded image gives.
    from_path = processor([path, str(path)], return_tensors="pt")
    from_pixels = processor(read_image(path), return_tensors="pt")
    torch.testing.assert_close(from_path["pixel_values"][:1], from_pixels["pixel_values"], atol=0, rtol=0)
    torch.testing.assert_close(from_path["pixel_values"][1:], from_pixels["pixel_values"], atol=0, rtol=0)
    assert from_path["image_sizes"].tolist() == [list(read_image(path).shape[1:])] * 2


@pytest.mark.parametrize("name", CASES)
def test_processor_on_the_opened_pil_image(corpus, name):
    """`Image.open(path)` handed over undecoded gives exactly the path's pixels, or the path's error."""
    folder, _ = corpus
    path = folder / name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)
    except Exception:  # Pillow cannot open it, so there is no PIL image to hand over; the path is refused
        with pytest.raises(ValueError, match=re.escape(str(path))):
            read_image(path)
        return
    processor = QualiCLIPImageProcessor()
    try:
        expected = processor(str(path), return_tensors="pt")["pixel_values"]
    except ValueError as error:
        with pytest.raises(ValueError) as refused:
            processor(opened, return_tensors="pt")
        assert str(refused.value) == str(error)
        return
    torch.testing.assert_close(processor(opened, return_tensors="pt")["pixel_values"], expected, atol=0, rtol=0)


def test_processor_refuses_a_directory(a_directory):
    with pytest.raises(ValueError, match=names_the_file_and_cause(a_directory, "is a directory")):
        QualiCLIPImageProcessor()(str(a_directory))


def check_result(path: Path, case, score: float | None, error: str | None, tiny) -> None:
    if isinstance(case, Read):
        assert error is None, error
        # Scored as the expected picture alone; the decoded file is the reference for lossy files.
        reference = case.expected if case.tolerance == 0 else read_image(path)
        assert score == pytest.approx(direct_scores(*tiny, reference).item(), abs=1e-6), path.name
    elif isinstance(case, TooSmall):
        assert score is None
        height, width = case.size
        assert error == f"{path}: {width}x{height} pixels is below the model's {MIN_SIZE}x{MIN_SIZE} minimum"
    else:
        assert score is None and re.fullmatch(names_the_file_and_cause(path, case.cause) + ".*", error), error


@pytest.mark.parametrize("num_workers, decode_on", [(0, "workers"), (2, "workers"), (0, "device"), (2, "device")])
def test_score_files_gives_every_file_its_outcome_and_goes_on(corpus, tiny, num_workers, decode_on):
    folder, cases = corpus
    paths = collect_image_paths([folder])
    assert sorted(path.name for path in paths) == sorted(cases)
    results = list(score_files(paths, *tiny, batch_size=3, num_workers=num_workers, decode_on=decode_on))
    assert [result.path for result in results] == [str(path) for path in paths]
    for path, result in zip(paths, results, strict=True):
        check_result(path, cases[path.name], result.score, result.error, tiny)


def test_decoding_on_the_device_takes_plain_jpegs_only(corpus):
    # The files that `decode_on="device"` hands to TorchCodec's decoder: plain JPEGs, broken ones included (their
    # error then comes from Pillow, as the test above checks); everything else is decoded by Pillow in the worker.
    folder, _ = corpus
    paths = collect_image_paths([folder])
    items = _ImageFiles(paths, jpeg_as_bytes=True)
    as_bytes = {path.name for path, item in zip(paths, items, strict=True) if item.jpeg is not None}
    # A JPEG without its end marker goes to the image reader, whose rule decides (decoded or refused as truncated).
    assert as_bytes == {"exif_rotated.jpg"}
    for path, item in zip(paths, items, strict=True):
        if item.jpeg is not None:
            assert item.image is None and item.error is None and item.jpeg.numel() == path.stat().st_size


def test_an_animation_is_scored_as_its_first_frame_saved_alone(corpus, tiny, tmp_path):
    folder, _ = corpus
    with Image.open(folder / "animated.gif") as gif:
        frames = []
        for index in range(2):
            gif.seek(index)
            frames.append(gif.convert("RGB"))
    for index, frame in enumerate(frames):
        frame.save(tmp_path / f"frame{index}.png")
    paths = [folder / "animated.gif", tmp_path / "frame0.png", tmp_path / "frame1.png"]
    gif_score, first, second = (result.score for result in score_files(paths, *tiny, num_workers=0))
    assert gif_score == pytest.approx(first, abs=1e-6)
    assert abs(gif_score - second) > 1e-4, "the frames must differ for the test to mean something"


def test_cli_on_a_folder_of_good_and_bad_files(corpus, tiny, tiny_model_dir, tmp_path, capsys):
    folder, cases = corpus
    output = tmp_path / "scores.json"
    status = main(["score", str(folder), "--model", str(tiny_model_dir), "--output", str(output), "--batch-size", "4"])
    rows = json.loads(output.read_text())
    assert sorted(Path(row["path"]).name for row in rows) == sorted(cases)
    for row in rows:
        path = Path(row["path"])
        check_result(path, cases[path.name], row["score"], row["error"], tiny)
    failed = sum(not isinstance(case, Read) for case in cases.values())
    assert status == 1
    assert f"{failed} of {len(cases)} files failed" in capsys.readouterr().err


def test_cli_pixel_limit_can_be_lowered(corpus, tiny_model_dir, tmp_path):
    folder, _ = corpus
    photo_path = folder / "png_named.jpg"  # 80 x 64 = 5,120 pixels
    args = ["score", str(photo_path), "--model", str(tiny_model_dir), "--output"]
    assert main([*args, str(tmp_path / "limited.json"), "--max-pixels", "5000"]) == 1
    (row,) = json.loads((tmp_path / "limited.json").read_text())
    assert row["error"].startswith(f"{photo_path}: 80x64 = 5,120 pixels is more than the limit of 5,000")
    assert main([*args, str(tmp_path / "at_limit.json"), "--max-pixels", "5120"]) == 0
    assert main([*args, str(tmp_path / "no_limit.json"), "--max-pixels", "0"]) == 0


def test_a_stricter_limit_set_on_pillow_holds_and_a_larger_one_asked_for_lifts_it(corpus, monkeypatch):
    folder, _ = corpus
    path = folder / "png_named.jpg"  # 5,120 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow itself now refuses more than 2,000 pixels
    with pytest.raises(ValueError, match=names_the_file_and_cause(path, "refused by Pillow's guard against decompr")):
        open_image(path)
    assert open_image(path, max_pixels=100_000_000).size == (80, 64)
    assert open_image(path, max_pixels=None).size == (80, 64)
    assert Image.MAX_IMAGE_PIXELS == 1000, "Pillow's global limit is restored"


@pytest.fixture(scope="module")
def pyiqa_metric(tiny_model_dir):
    pyiqa = pytest.importorskip("pyiqa")
    return pyiqa.create_metric("qualiclip", device="cpu", pretrained_model_name_or_path=str(tiny_model_dir))


# pyiqa reads paths with its own reader (PIL's RGB conversion): these files are outside the plugin's reach.
PYIQA_READER_DECIDES = {
    "bomb_100mp.png": "pyiqa's reader only warns below twice Pillow's limit, and decodes 100 megapixels",
    "nan_float.tif": "pyiqa's reader converts NaN pixels to a colour",
}


@torch.no_grad()
@pytest.mark.parametrize("name", CASES)
def test_pyiqa_metric_on_the_path(corpus, pyiqa_metric, tiny, name):
    """What pyiqa's reader decodes is scored, or refused clearly when too small; what it cannot read raises."""
    if name in PYIQA_READER_DECIDES:
        pytest.skip(PYIQA_READER_DECIDES[name])
    folder, cases = corpus
    path, case = folder / name, cases[name]
    if isinstance(case, Refused):
        with pytest.raises(Exception):  # noqa: B017 - pyiqa's reader: PIL's error for the file
            pyiqa_metric(str(path))
        return
    if isinstance(case, TooSmall):
        height, width = case.size
        with pytest.raises(ValueError, match=rf"{width}x{height} pixels is below the model's 32x32 minimum"):
            pyiqa_metric(str(path))
        return
    score = pyiqa_metric(str(path))
    assert score.shape == (1, 1) and 0 <= score.item() <= 1
    # pyiqa's reader takes the PIL image `Image.open(path)` returns as it takes the path.
    assert pyiqa_metric(Image.open(path)).item() == pytest.approx(score.item(), abs=1e-6)
    if case.pyiqa_reads_the_same:
        model, processor = tiny
        pixels = processor(images=read_image(path), return_tensors="pt")["pixel_values"]
        # The plugin's default formula halves the logit scale of a model that records no CLIP scale.
        expected = model(pixels, logit_scale=model.config.logit_scale / 2).quality_score.item()
        assert score.item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("pillow_heif") is not None, reason="pillow-heif is installed"
)
def test_heic_without_a_reader_is_refused_clearly(tmp_path):
    """No HEIC reader is installed here (pillow-heif registers one when it is): a HEIC file gets a clear refusal."""
    path = tmp_path / "photo.heic"
    # The start of an ISO-BMFF HEIC file: an `ftyp` box with the `heic` brand.
    path.write_bytes(struct.pack(">I", 24) + b"ftypheic" + b"\0\0\0\0" + b"mif1heic" + b"\0" * 64)
    with pytest.raises(ValueError, match=names_the_file_and_cause(path, "a format no installed reader supports")):
        read_image(path)


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("pillow_heif") is None, reason="needs pillow-heif (no HEIC reader)"
)
def test_heic_is_read_when_pillow_heif_is_installed(tmp_path):
    import pillow_heif

    image = photo(48, 64, seed=13)
    pillow_heif.from_pillow(image).save(tmp_path / "photo.heic", quality=95)
    decoded = read_image(tmp_path / "photo.heic").permute(1, 2, 0).numpy()
    assert decoded.shape == (48, 64, 3) and mean_abs_diff(decoded, np.asarray(image)) <= 6


# Tensors and arrays given directly.


def clip_normalised(batch: int = 1, height: int = 64, width: int = 64) -> torch.Tensor:
    return (torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(0)) - CLIP_MEAN) / CLIP_STD


def with_value(tensor: torch.Tensor, value: float) -> torch.Tensor:
    tensor = tensor.clone()
    tensor[0, 1, 5, 7] = value
    return tensor


@pytest.mark.parametrize(
    ("pixel_values", "image_sizes", "error", "message"),
    [
        (with_value(clip_normalised(), float("nan")), None, ValueError, "contains NaN or infinite values"),
        (with_value(clip_normalised(), float("inf")), None, ValueError, "contains NaN or infinite values"),
        ((torch.rand(1, 3, 64, 64) * 255).to(torch.uint8), None, TypeError, r"floating-point .* got torch\.uint8"),
        (clip_normalised()[0], None, ValueError, r"\(batch_size, 3, height, width\) tensor, got shape \(3, 64, 64\)"),
        (clip_normalised()[:, :1], None, ValueError, r"got shape \(1, 1, 64, 64\)"),
        (np.zeros((1, 3, 64, 64), np.float32), None, TypeError, "must be a torch.Tensor, got ndarray"),
        (clip_normalised(2), torch.tensor([64, 64]), ValueError, r"image_sizes must have shape \(2, 2\)"),
        (clip_normalised(1, 16, 64), None, ValueError, "16x64 pixels is smaller than the 32x32 minimum"),
    ],
    ids=["nan", "inf", "uint8", "3d", "one-channel", "numpy", "image-sizes", "too-small"],
)
def test_model_refuses_bad_pixel_values_clearly(tiny_model, pixel_values, image_sizes, error, message):
    with pytest.raises(error, match=message), torch.no_grad():
        tiny_model(pixel_values, image_sizes=image_sizes)


def test_model_warns_about_pixel_values_that_look_unnormalised(tiny_model):
    from transformers.testing_utils import CaptureLogger

    from qualiclip_hf import modeling_qualiclip

    raw = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 254 + 1  # 8-bit values as floats
    with CaptureLogger(modeling_qualiclip.logger) as captured, torch.no_grad():
        score = tiny_model(raw).quality_score
    assert torch.isfinite(score).all()
    assert "far outside CLIP-normalised pixels" in captured.out and "were the images normalised?" in captured.out


@pytest.mark.parametrize(
    ("image", "error", "message"),
    [
        (np.full((20, 30, 3), np.nan, np.float32), ValueError, r"shape \(20, 30, 3\) has NaN or infinite pixel values"),
        (torch.full((3, 20, 30), float("inf")), ValueError, "has NaN or infinite pixel values"),
        (
            torch.full((3, 20, 30), -2.0),
            ValueError,
            r"values from -2 to -2; floating-point images hold values in \[0, 1\]",
        ),
        (
            torch.rand(3, 20, 30) * 300,
            ValueError,
            r"in \[0, 1\] \(8-bit values: pass a uint8 array, or divide by 255\)",
        ),
        (np.full((20, 30), 300, np.int32), ValueError, r"8-bit values \(0 to 255\), or 16-bit ones as uint16"),
        (np.ones((20, 30, 3), bool), TypeError, "must hold integers or floats, got dtype bool"),
        (np.zeros((20, 30, 2), np.uint8), ValueError, r"1 \(grey\), 3 \(RGB\) or 4 \(RGBA\) channels"),
        (np.zeros((0, 30, 3), np.uint8), ValueError, r"shape \(0, 30, 3\) is empty"),
        (np.zeros((1, 1, 3, 8, 8), np.uint8), ValueError, r"or a batch of those; got shape \(1, 1, 3, 8, 8\)"),
        ([], ValueError, "empty list of images"),
    ],
    ids=["nan", "inf", "negative", "above-255", "int-above-255", "bool", "two-channels", "empty", "5d", "no-images"],
)
def test_processor_refuses_bad_arrays_clearly(image, error, message):
    with pytest.raises(error, match=message):
        QualiCLIPImageProcessor()(image, return_tensors="pt")


def test_processor_array_conventions():
    """16-bit arrays are scaled to 8 bits; RGBA arrays are composited onto white like RGBA images; floats are on the
    [0, 1] scale, with or without `do_rescale`; `(height, width)` is grey."""
    processor = QualiCLIPImageProcessor()
    base = np.asarray(photo(40, 60, seed=14))
    expected = processor(base, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(
        processor(base.astype(np.uint16) * 257, return_tensors="pt")["pixel_values"], expected, atol=1e-5, rtol=0
    )
    as_float = base.astype(np.float32) / 255
    torch.testing.assert_close(processor(as_float, return_tensors="pt")["pixel_values"], expected, atol=1e-5, rtol=0)
    scaled = processor(as_float, do_rescale=False, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(scaled, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):  # 8-bit values as floats: refused, not read as white
        processor(as_float * 255, return_tensors="pt")
    alpha = np.tile(np.linspace(0, 255, 60).round().astype(np.uint8), (40, 1))
    rgba = np.dstack([base, alpha])
    from_array = processor(rgba, return_tensors="pt")["pixel_values"]
    from_image = processor(Image.fromarray(rgba), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(from_array, from_image, atol=1.01 / 255 / 0.26, rtol=0)  # rounding: one 8-bit level
    grey = np.asarray(photo(40, 60, seed=15).convert("L"))
    torch.testing.assert_close(
        processor(grey, return_tensors="pt")["pixel_values"],
        processor(Image.fromarray(grey), return_tensors="pt")["pixel_values"],
    )


def test_pyiqa_arch_refuses_bad_tensors_clearly(tiny_model_dir):
    pytest.importorskip("pyiqa")
    from pyiqa_plugin import QualiCLIPHF

    arch = QualiCLIPHF(pretrained_model_name_or_path=str(tiny_model_dir))
    images = torch.rand(2, 3, 64, 64)
    with pytest.raises(TypeError, match=r"floating-point images in \[0, 1\], got torch\.uint8; divide 8-bit ones"):
        arch((images * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="NaN or infinite values"):
        arch(with_value(images, float("nan")))
    with pytest.raises(ValueError, match=r"\(batch_size, 3 or 1, height, width\) images, got shape \(3, 64, 64\)"):
        arch(images[0])
    with pytest.raises(ValueError, match="64x16 pixels is below the model's 32x32 minimum"):
        arch(images[:, :, :16])
    # Through pyiqa, a loss (which skips pyiqa's own range check) still refuses NaN.
    import pyiqa

    loss = pyiqa.create_metric(
        "qualiclip", as_loss=True, device="cpu", pretrained_model_name_or_path=str(tiny_model_dir)
    )
    with pytest.raises(ValueError, match="NaN or infinite values"):
        loss(with_value(images, float("nan")))


def test_below_the_minimum_after_max_size_names_the_size_after_resizing():
    from qualiclip_hf import QualiCLIPImageProcessor

    processor = QualiCLIPImageProcessor()
    # 600x400 to a longest side of 40: 40x27 (400 * 40 / 600 = 26.7, rounded as the resize rounds it).
    expected = "600x400 pixels, 40x27 after max_size=40, is below the model's 32x32 minimum"
    with pytest.raises(ValueError, match=re.escape(expected)):
        processor.check_size(400, 600, max_size=40)
    with pytest.raises(ValueError, match=re.escape("600x20 pixels is below the model's 32x32 minimum")):
        processor.check_size(20, 600)  # not resized: one size
