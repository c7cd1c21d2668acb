"""Reading images as a viewer shows them: the one place where files, bytes, PIL images and arrays become pixels.

Every entry point (`qualiclip score`, the processor, the pipeline, the pyiqa plugin's tensors, the Gradio app, the
Endpoints handler) goes through this module, so a picture gets the same pixels, hence the same score, however it
arrives. What it does, and why:

- bit depth: samples wider than 8 bits are scaled by the range their header declares (16-bit PNG/TIFF, PGM/PPM of
  any maxval, modes `I;16*` and `I`), then rounded to 8 bits; never guessed from the values;
- floating point: mode `F` images and floating-point arrays hold values in [0, 1] (torchvision's `ToTensor`, pyiqa);
  other values are an error, never a silently black or white picture;
- orientation: EXIF orientation (and the container's, for HEIF through `pillow-heif`) applied;
- colour profile: an embedded ICC profile is converted to sRGB with `PIL.ImageCms` (what browsers show);
  `convert_icc=False` ignores it, as the official code and pyiqa do;
- transparency: composited onto white;
- animations: the first frame the animation shows (for an APNG whose default image is not part of the animation,
  its first animation frame);
- truncation: refused, whatever Pillow's process-wide `ImageFile.LOAD_TRUNCATED_IMAGES` says; a JPEG missing only
  its final end-of-image marker, all image data present, is decoded with a warning;
- pixel limit: files of more than `max_pixels` pixels are refused before decoding (decompression bombs);
- PIL images: one still as `Image.open` left it (not decoded, on its first frame) is read again from its file's bytes
  by these rules, so it scores as its path does; one decoded, made or changed by the user is taken as it is.

This file is shipped with saved model folders (the image processor imports it), so it imports only installed
libraries.
"""

from __future__ import annotations

import errno
import functools
import io
import logging
import os
import threading
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "array_to_chw",
    "decode_file",
    "find_image_files",
    "image_file_extensions",
    "is_local_file_name",
    "open_image",
    "open_image_value",
    "to_viewable_rgb",
]

logger = logging.getLogger(__name__)

# Pillow's own default for `Image.MAX_IMAGE_PIXELS` (about 9500 x 9500): larger files are refused unless asked for,
# because a small file can claim a huge size and exhaust memory when decoded (a "decompression bomb").
DEFAULT_MAX_PIXELS = 89_478_485
_JPEG_END_OF_IMAGE = b"\xff\xd9"
# JPEG (JFIF) file name endings in use that Pillow does not register (it has .jpg .jpeg .jpe .jfif).
_JPEG_EXTENSIONS_PILLOW_LEAVES_OUT = {".jif": "JPEG", ".jfi": "JPEG"}
# Formats that Pillow's plugins widen to mode `I` from 16-bit samples (PNG, PGM/PPM, whose maxval Pillow rescales to
# 65535, SGI, ...). TIFF says its own sample width; see `_sample_peak`.
_SIXTEEN_BIT_PEAK = 65535.0
TRUNCATED = "truncated: the file ends before its image data do (an interrupted download or copy?)"
# Floating-point values this far outside [0, 1] are rounding noise (a resize, a colour conversion) and are clipped;
# further out, the image is not on the [0, 1] scale.
FLOAT_TOLERANCE = 1e-3


# ---------------------------------------------------------------------------------------------------------- files


@functools.cache
def image_file_extensions() -> frozenset[str]:
    """
    File name endings (lower case, with the dot) that an installed reader opens: Pillow's registered extensions of
    the formats it can open, plus HEIC/HEIF and AVIF when `pillow-heif` (or Pillow's own AVIF plugin) is installed.
    """
    _register_optional_readers()
    Image.init()
    registered = {**Image.registered_extensions(), **_JPEG_EXTENSIONS_PILLOW_LEAVES_OUT}
    return frozenset(extension.lower() for extension, image_format in registered.items() if _decodes(image_format))


def _decodes(image_format: str) -> bool:
    # Formats Pillow identifies but cannot decode: stubs (BUFR, GRIB, HDF5, WMF outside Windows), MPEG (size only),
    # EPS without Ghostscript.
    if image_format not in Image.OPEN or image_format == "MPEG":
        return False
    factory = Image.OPEN[image_format][0]
    if isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile):
        return False
    if image_format == "EPS":
        from PIL import EpsImagePlugin

        return EpsImagePlugin.has_ghostscript()
    return True


def find_image_files(folder: str | os.PathLike, recursive: bool = False) -> tuple[list[Path], list[Path]]:
    """
    The files of `folder` (and its subfolders when `recursive`) whose extension an installed reader opens, sorted,
    and the other files, which are skipped (`(images, skipped)`). A loop of symbolic links is listed with the images
    whatever its name, so that reading it says what it is rather than it being skipped as "not an image".

    `recursive` follows symbolic links to folders, as `find -L` does, but walks each folder once: a link back into a
    folder already walked (a loop) or a second link to one is not entered again, with a warning, so that the walk
    ends and no file is listed twice.
    """
    extensions = image_file_extensions()
    images: list[Path] = []
    skipped: list[Path] = []
    for path in _walk_files(Path(folder)) if recursive else Path(folder).glob("*"):
        if path.is_dir():
            continue
        is_image = path.suffix.lower() in extensions or (path.is_symlink() and _is_symlink_loop(path))
        (images if is_image else skipped).append(path)
    return sorted(images), sorted(skipped)


def _walk_files(folder: Path) -> Iterator[Path]:
    seen: set[tuple[int, int]] = set()
    for root, folders, files in os.walk(folder, followlinks=True):
        try:
            status = os.stat(root)
        except OSError:  # gone while walking
            folders.clear()
            continue
        if (status.st_dev, status.st_ino) in seen:
            folders.clear()  # walked already, with its subfolders
            logger.warning(
                "%s: not entered: a symbolic link to a folder already walked (%s)", root, Path(root).resolve()
            )
            continue
        seen.add((status.st_dev, status.st_ino))
        folders.sort()  # walked in name order: a folder linked twice is listed under the same name on every run
        yield from (Path(root) / name for name in files)


def is_local_file_name(text: str) -> bool:
    """Whether a string given as an image names a local file (an existing path, or a name with an image extension)."""
    if text.startswith(("http://", "https://", "data:")):
        return False
    return os.path.lexists(text) or (len(text) < 4096 and Path(text).suffix.lower() in image_file_extensions())


def open_image(
    source: str | os.PathLike | bytes | bytearray | memoryview,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    convert_icc: bool = True,
) -> Image.Image:
    """
    Reads an image file, or the bytes of one, as a viewer shows it (see the module's list): a fully decoded 8-bit
    `RGB` PIL image. [`decode_file`] followed by [`to_viewable_rgb`].

    Args:
        source: A path, or the bytes of an image file. Any format an installed Pillow reader supports (HEIC needs
            `pillow-heif`, registered here when installed).
        max_pixels: Files of more pixels are refused before they are decoded: a few kilobytes can claim billions of
            pixels (a decompression bomb). The default is Pillow's. `None` removes the limit; raise it only for
            files you trust, and downscale them for scoring with `max_size`.
        convert_icc: Convert an embedded ICC colour profile to sRGB (the default); `False` takes the stored values
            as sRGB, as the official QualiCLIP code and pyiqa do.

    Raises:
        ValueError: naming the file (or `"<N bytes>"`) and the cause: missing, a directory, empty, not an image,
            truncated or corrupt, too many pixels, floating-point values outside [0, 1].
    """
    image = decode_file(source, max_pixels)
    if image.filename:  # `to_viewable_rgb` names the file in its errors
        return to_viewable_rgb(image, convert_icc=convert_icc)
    try:
        return to_viewable_rgb(image, convert_icc=convert_icc)
    except ValueError as error:
        raise ValueError(f"{_source_name(source)}: {error}") from None


def open_image_value(value: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS, convert_icc: bool = True) -> Image.Image:
    """
    Reads one value of a dataset's image column (`datasets`, Parquet, WebDataset, Ray Data) as [`open_image`] reads
    a file, so that the rules and error messages are those of file scoring.

    Args:
        value: A PIL image (a decoding `datasets.Image` feature), the bytes of an image file, a local path, or a
            `{"bytes": ..., "path": ...}` struct (`datasets.Image(decode=False)`, Parquet exports of image datasets):
            its bytes when present, else its path.
        max_pixels, convert_icc: As [`open_image`].

    Returns:
        The 8-bit `RGB` image a viewer shows.

    Raises:
        ValueError: naming the file (or `<N bytes>`) and the cause; for an empty value or one of another type,
            saying so.
    """
    if isinstance(value, dict):
        value = value["bytes"] if value.get("bytes") is not None else value.get("path")
    if isinstance(value, Image.Image):
        return to_viewable_rgb(value, convert_icc=convert_icc, max_pixels=max_pixels)
    if isinstance(value, (bytes, bytearray, memoryview, str, os.PathLike)):
        return open_image(value, max_pixels, convert_icc=convert_icc)
    if value is None:
        raise ValueError("no image (the value is empty)")
    raise ValueError(f"cannot read an image from a value of type {type(value).__name__}")


def decode_file(
    source: str | os.PathLike | bytes | bytearray | memoryview, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """
    Decodes the first shown frame of an image file (or the bytes of one), checked complete, as Pillow gives it (any
    mode; orientation, bit depth, profile and transparency are left to [`to_viewable_rgb`]). Arguments and errors as
    [`open_image`].
    """
    name, data = _read_source(source)
    image = _decode_named(name, data, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        image.filename = name  # decoded from memory; errors found later name the file
    return image


def _decode_named(name: str, data: bytes, max_pixels: int | None) -> Image.Image:
    """[`decode_file`] on the bytes of a file, its errors starting with `name`."""
    _register_optional_readers()
    try:
        try:
            image = _decode(data, max_pixels)
        except _Truncated:
            image = _decode_jpeg_without_end_marker(name, data, max_pixels)
    except _ImageRefused as error:
        raise ValueError(f"{name}: {error}") from None
    except UnidentifiedImageError:
        raise ValueError(
            f"{name}: not an image file, a damaged one, or a format no installed reader supports"
        ) from None
    except Image.DecompressionBombError as error:
        raise ValueError(
            f"{name}: refused by Pillow's guard against decompression bombs: {error} If you trust the file, raise "
            "the limit (max_pixels=, --max-pixels) and downscale it for scoring with max_size (--max-size)"
        ) from None
    except MemoryError:
        raise ValueError(f"{name}: not enough memory to decode it; lower max_pixels to refuse such files") from None
    except Exception as error:  # Pillow's plugins raise many kinds of errors on corrupt files; each is this file's
        raise ValueError(f"{name}: cannot decode image: {error}") from None
    return image


def _is_symlink_loop(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as error:
        return error.errno == errno.ELOOP
    return False


def _source_name(source: Any) -> str:
    return f"<{len(source)} bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else str(Path(source))


def _read_source(source: Any) -> tuple[str, bytes]:
    name = _source_name(source) if isinstance(source, (bytes, bytearray, memoryview, str, os.PathLike)) else ""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            raise ValueError(f"{path}: is a directory, not an image")
        if not path.exists():
            if _is_symlink_loop(path):
                raise ValueError(f"{path}: a loop of symbolic links (it leads back to itself), not a file")
            raise ValueError(f"{path}: no such file" + (" (broken symbolic link)" if path.is_symlink() else ""))
        try:
            data = path.read_bytes()
        except OSError as error:
            raise ValueError(f"{path}: cannot read the file: {error.strerror or error}") from None
    else:
        raise TypeError(f"expected a path or the bytes of an image file, got {type(source).__name__}")
    if not data:
        raise ValueError(f"{name}: empty file (0 bytes)")
    return name, data


class _ImageRefused(ValueError):
    pass


class _Truncated(Exception):
    pass


class _WatchedBytes(io.BytesIO):
    """The file's bytes, noting whether a decoder asked for data past their end (the file is truncated)."""

    watching = False
    read_past_end = False

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if self.watching and not data and size != 0:
            self.read_past_end = True
        return data


def _decode(data: bytes, max_pixels: int | None) -> Image.Image:
    """
    Decodes the first shown frame. Truncation is judged here, never by Pillow's process-wide
    `ImageFile.LOAD_TRUNCATED_IMAGES` (which other libraries switch on: pyiqa does): a decoder that asks for bytes
    past the end of the file means a truncated file, whether Pillow then raises or pads the image.
    """
    stream = _WatchedBytes(data)
    with warnings.catch_warnings(), _pillow_pixel_limit_at_least(max_pixels):
        # Pillow's warning between its limit and twice it: our own limit, below, decides.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(stream)
        except Image.DecompressionBombError:
            # Pillow's own refusal, above twice its limit. Where our limit is the stricter one (Pillow at its
            # default, or above `max_pixels`), the file gets our message, the one every other large file gets.
            pillow_limit = Image.MAX_IMAGE_PIXELS
            if pillow_limit is None or max_pixels is None or max_pixels > pillow_limit:
                raise
            image = _open_without_pillows_limit(stream)
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise _ImageRefused(
                f"{width}x{height} = {width * height:,} pixels is more than the limit of {max_pixels:,} "
                "(a guard against decompression bombs); if you trust the file, raise the limit (max_pixels=, "
                "--max-pixels) and downscale it for scoring with max_size (--max-size)"
            )
        stream.watching = True
        try:
            _seek_first_shown_frame(image)
            image.load()
        except OSError as error:
            if stream.read_past_end or "truncated" in str(error):
                raise _Truncated from None
            raise
        if stream.read_past_end:
            raise _Truncated
        return image


def _decode_jpeg_without_end_marker(name: str, data: bytes, max_pixels: int | None) -> Image.Image:
    """
    A JPEG whose bytes stop right before its end-of-image marker (every scan complete) decodes, as libjpeg-based
    viewers show it; real truncation is refused. With the marker appended both are decoded without complaint
    (libjpeg fills missing data silently), so the file is decoded twice, once with filler bytes before the marker:
    filler after complete scans is skipped as junk, filler inside a cut scan is decoded as image data and changes
    pixels.
    """
    truncated = _ImageRefused(TRUNCATED)
    if not data.startswith(b"\xff\xd8") or data.endswith(_JPEG_END_OF_IMAGE):
        raise truncated
    try:
        completed = _decode(data + _JPEG_END_OF_IMAGE, max_pixels)
        padded = _decode(data + b"\x55" * 64 + _JPEG_END_OF_IMAGE, max_pixels)
    except (_Truncated, OSError, SyntaxError, ValueError):
        raise truncated from None
    if completed.size != padded.size or not np.array_equal(np.asarray(completed), np.asarray(padded)):
        raise truncated
    warnings.warn(
        f"{name}: the JPEG file lacks its final end-of-image marker; all its image data are present, so it is "
        "decoded as complete",
        stacklevel=5,
    )
    return completed


def _seek_first_shown_frame(image: Image.Image) -> None:
    # Animated PNG: the default image (frame 0) may be a still shown only by viewers without APNG support, when no
    # frame control chunk precedes it (Pillow then sets `info["default_image"]`); the animation starts at frame 1.
    if image.format == "PNG" and image.info.get("default_image", False) and getattr(image, "n_frames", 1) > 1:
        image.seek(1)
    # Every other format (GIF, WebP, MPO, multi-page TIFF, ...): Pillow opens it on its first frame, the one shown.


_PILLOW_LIMIT_LOCK = threading.Lock()


@contextmanager
def _pillow_pixel_limit_at_least(max_pixels: int | None) -> Iterator[None]:
    # Pillow refuses files of more than twice `Image.MAX_IMAGE_PIXELS` on its own. When a caller asks for more than
    # the default, its guard is lifted for this call (Pillow has no per-call setting), under a lock; otherwise it stays,
    # so that a stricter limit set on Pillow still holds.
    pillow_limit = Image.MAX_IMAGE_PIXELS
    if pillow_limit is None or (max_pixels is not None and max_pixels <= DEFAULT_MAX_PIXELS):
        yield
        return
    with _PILLOW_LIMIT_LOCK:
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = pillow_limit


def _open_without_pillows_limit(stream: io.BytesIO) -> Image.Image:
    # Reads the header only; the caller checks the size against its own limit before anything is decoded.
    with _PILLOW_LIMIT_LOCK:
        pillow_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            stream.seek(0)
            return Image.open(stream)
        finally:
            Image.MAX_IMAGE_PIXELS = pillow_limit


_optional_readers_registered = False


def _register_optional_readers() -> None:
    global _optional_readers_registered
    if _optional_readers_registered:
        return
    _optional_readers_registered = True
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return
    register_heif_opener()


# ------------------------------------------------------------------------------------------------------ PIL images


def to_viewable_rgb(
    image: Image.Image, convert_icc: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """
    The 8-bit `RGB` image a viewer shows, which is what QualiCLIP judges (see the module's list): the image decoded,
    EXIF orientation applied, samples scaled by their declared range, the ICC profile converted to sRGB (unless
    `convert_icc=False`), transparency composited onto white.

    What is decoded depends on what the PIL image still is:
    - opened and not decoded yet, as `Image.open` left it (its file still open or its path still there, on the frame
      it opened on, no `draft`, `seek` or `info` change): read again from its file's bytes exactly as that file's
      path is ([`decode_file`]), so the file's rules hold (the frame an animation shows, truncation judged here
      rather than by Pillow's `ImageFile.LOAD_TRUNCATED_IMAGES`, the JPEG missing only its end marker, `max_pixels`);
    - otherwise (decoded, made or changed by the user, or without a file behind it): its pixels as they are, on the
      frame it is positioned on; a pending decode is done with Pillow's own settings.

    Args:
        image: Any PIL image.
        convert_icc: Convert an embedded ICC colour profile to sRGB (the default); `False` ignores it.
        max_pixels: For an image read again from its file, the limit [`decode_file`] applies (`None`: none).

    Raises:
        ValueError: the image cannot be decoded (naming the file it came from, if any); a mode `I` image with no file
            format to declare its bit depth; a mode `F` image with NaN or infinite values or values outside [0, 1].
    """
    filename = os.fsdecode(getattr(image, "filename", "") or "")
    name = str(Path(filename)) if filename else f"the PIL image ({image.width}x{image.height} {image.mode})"
    data = _bytes_of_unread_file(image)
    if data is not None:
        image = _decode_named(name, data, max_pixels)
        image.filename = filename  # decoded from memory; errors found later name the file
    else:
        try:
            image.load()
        except Exception as error:  # Pillow's plugins raise many kinds of errors on corrupt files
            cause = TRUNCATED if "truncated" in str(error) else f"cannot decode image: {error}"
            raise ValueError(f"{name}: {cause}") from None
    try:
        return _viewable(image, convert_icc)
    except ValueError as error:
        raise ValueError(f"{filename}: {error}" if filename else str(error)) from None


def _bytes_of_unread_file(image: Image.Image) -> bytes | None:
    """
    The bytes of the file a PIL image was opened from, when the image is still as `Image.open` left it: not decoded,
    on its first frame, and with the format, mode, size, tiles, decoder settings and `info` that a
    fresh `Image.open` of those bytes gives (so no `draft`, `reduce`, frame change or edited metadata). `None` for
    any other image, and when the file can no longer be read (closed and not on disk).
    """
    if not isinstance(image, ImageFile.ImageFile) or image.tell() != 0:
        return None
    # Pending: tiles left to decode, or (WebP, whose plugin decodes without tiles) no pixels yet. The pixel store
    # is `_im` since Pillow 11, `im` before.
    pixels = vars(image).get("_im", vars(image).get("im"))
    if not image.tile and pixels is not None:
        return None
    data = None
    stream = image.fp
    if stream is not None:
        try:
            position = stream.tell()
            stream.seek(0)  # `Image.open` reads the file from the stream's start
            data = stream.read()
            stream.seek(position)
        except (OSError, ValueError):  # closed (a `with Image.open(...)` block left), or unseekable
            data = None
    if not data and image.filename:
        try:
            data = Path(os.fsdecode(image.filename)).read_bytes()
        except OSError:
            return None
    if not data:
        return None
    _register_optional_readers()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh = Image.open(io.BytesIO(data))
    except Exception:  # the file changed since, or cannot be opened again: the image is what the user has
        return None
    state = ("format", "mode", "size", "tile", "decoderconfig", "info")
    try:
        unchanged = all(bool(getattr(fresh, key) == getattr(image, key)) for key in state)
    except Exception:  # values that do not compare (arrays in `info`): taken as changed
        unchanged = False
    return data if unchanged else None


def _viewable(image: Image.Image, convert_icc: bool) -> Image.Image:
    # The range of wide samples is read from the format before `exif_transpose`, whose copy forgets the format.
    peak = _sample_peak(image) if image.mode.startswith("I;16") or image.mode == "I" else None
    image = ImageOps.exif_transpose(image)
    image = _to_eight_bits(image, peak)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode == "PA":
        image = image.convert("RGBA")
    profile = image.info.get("icc_profile")
    if convert_icc and profile:
        image = _to_srgb(image, profile)
    if image.mode in ("RGBA", "LA", "RGBa", "La") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _sample_peak(image: Image.Image) -> float:
    """The sample value of full white of a mode `I;16*` or `I` image, from what its format declares."""
    if image.mode.startswith("I;16"):
        return _SIXTEEN_BIT_PEAK
    if image.format == "TIFF":
        bits = image.tag_v2.get(258, (32,))[0]
        signed = image.tag_v2.get(339, (1,))[0] == 2
        return float(2 ** (bits - 1) - 1 if signed else 2**bits - 1)
    if image.format is None:
        raise ValueError(
            "a PIL image of mode I (32-bit integers) does not say the range of its samples; convert it to mode I;16 "
            "(16-bit samples) or L (8-bit), or pass it as a uint8 or uint16 array"
        )
    return _SIXTEEN_BIT_PEAK


def _to_eight_bits(image: Image.Image, peak: float | None) -> Image.Image:
    if peak is not None:
        samples = np.asarray(image, dtype=np.float64)
        eight = np.rint(np.clip(samples, 0, peak) * (255.0 / peak)).astype(np.uint8)
    elif image.mode == "F":
        samples = np.asarray(image, dtype=np.float64)
        _check_float_range(samples, f"a mode F image of {image.width}x{image.height}")
        eight = np.rint(np.clip(samples, 0, 1) * 255.0).astype(np.uint8)
    else:
        return image
    info = dict(image.info)  # the ICC profile still applies
    key = info.pop("transparency", None)
    if isinstance(key, (int, float)):
        # A colour key marks the samples of that exact value transparent: an alpha channel from the wide samples,
        # as several of them may round to the key's 8-bit value.
        alpha = np.where(samples == key, 0, 255).astype(np.uint8)
        converted = Image.fromarray(np.dstack([eight, alpha]), "LA")
    else:
        converted = Image.fromarray(eight)
    converted.info = info
    return converted


_SRGB_PROFILE: ImageCms.ImageCmsProfile | None = None


def _to_srgb(image: Image.Image, profile: bytes) -> Image.Image:
    """Colour-manages an image with an embedded ICC profile to sRGB (ImageCms, perceptual intent)."""
    global _SRGB_PROFILE
    if _SRGB_PROFILE is None:
        _SRGB_PROFILE = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    alpha = None
    if image.mode in ("LA", "RGBA"):
        alpha = image.getchannel("A")
        image = image.convert(image.mode[:-1])
    if image.mode not in ("L", "RGB", "CMYK"):
        return image if alpha is None else _with_alpha(image, alpha)
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        converted = ImageCms.profileToProfile(image, source, _SRGB_PROFILE, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as error:
        # A damaged profile, or one for another colour space than the pixels': viewers ignore it too.
        warnings.warn(f"ignoring the image's ICC colour profile, which cannot be applied: {error}", stacklevel=3)
        converted = image
    return converted if alpha is None else _with_alpha(converted, alpha)


def _with_alpha(image: Image.Image, alpha: Image.Image) -> Image.Image:
    image = image.convert("RGBA" if image.mode != "L" else "LA")
    image.putalpha(alpha)
    return image


def _check_float_range(values: np.ndarray | torch.Tensor, what: str) -> None:
    low, high = float(values.min()), float(values.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(f"{what} has NaN or infinite pixel values")
    if low < -FLOAT_TOLERANCE or high > 1 + FLOAT_TOLERANCE:
        raise ValueError(
            f"{what} holds floating-point values from {low:g} to {high:g}; floating-point images hold values in "
            "[0, 1] (8-bit values: pass a uint8 array, or divide by 255)"
        )


# ---------------------------------------------------------------------------------------------------------- arrays


def array_to_chw(
    image: np.ndarray | torch.Tensor, input_data_format: str | None = None, convert_rgb: bool = True
) -> torch.Tensor:
    """
    Checks an array image and returns it as a `(3, height, width)` RGB tensor: `uint8` (0 to 255) as is, every other
    type as `float32` in [0, 1]. With `convert_rgb=False` (an image processor's `do_convert_rgb=False`), the image
    keeps its 1, 3 or 4 channels, uncomposited: `(channels, height, width)`.

    Value ranges, from the type: `uint8` and other integer types 0 to 255; `uint16` 0 to 65535; floating point
    [0, 1] (torchvision's `ToTensor`, pyiqa; values within 1e-3 outside are clipped). Layout: `(height, width)`,
    `(channels, height, width)` or `(height, width, channels)` with 1 (grey), 3 (RGB) or 4 (RGBA, composited onto
    white) channels; when only one end has 1, 3 or 4 entries, that end is the channel axis; when both have,
    channels-first (transformers' rule) unless `input_data_format` says otherwise.

    Raises:
        TypeError: booleans, complex numbers or other non-numeric types.
        ValueError: naming the shape the caller gave: wrong number of dimensions or channels, empty, NaN or infinite
            values, values outside the type's range.
    """
    shape = tuple(image.shape)
    if isinstance(image, np.ndarray):
        if image.dtype.kind not in "uif":
            raise TypeError(f"an image array must hold integers or floats, got dtype {image.dtype} (shape {shape})")
        array = np.ascontiguousarray(image, dtype=image.dtype.newbyteorder("="))
        # torch shares the memory of writable arrays only (a PIL image's `np.asarray` is read-only).
        image = torch.from_numpy(array if array.flags.writeable else array.copy())
    if image.dtype == torch.bool or image.is_complex():
        raise TypeError(f"an image tensor must hold integers or floats, got dtype {image.dtype} (shape {shape})")
    if image.ndim == 2:
        image, input_data_format = image[None], "channels_first"
    if image.ndim != 3:
        raise ValueError(f"an image must have 2 or 3 dimensions, got shape {shape}")
    if image.numel() == 0:
        raise ValueError(f"the image of shape {shape} is empty")
    layout = _channel_axis(image.shape, input_data_format)
    if layout is None:
        raise ValueError(
            f"an image needs 1 (grey), 3 (RGB) or 4 (RGBA) channels, first or last; got shape {shape}"
            + ("" if input_data_format is None else f" with input_data_format={input_data_format}")
        )
    if layout == "last":
        image = image.permute(2, 0, 1)

    if image.dtype == torch.uint8:
        pass
    elif image.dtype == torch.uint16:
        image = image.to(torch.float32) / 65535
    elif not image.is_floating_point():
        low, high = int(image.min()), int(image.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"an integer image holds 8-bit values (0 to 255), or 16-bit ones as uint16; got {image.dtype} values "
                f"from {low} to {high} (shape {shape})"
            )
        image = image.to(torch.uint8)
    else:
        image = image.to(torch.float32)
        _check_float_range(image, f"the image of shape {shape}")
        image = image.clamp(0, 1)

    if not convert_rgb:
        return image
    if image.shape[0] == 4:
        if image.dtype == torch.uint8:
            alpha = image[3:].float() / 255
            rgb = image[:3].float() * alpha + 255 * (1 - alpha)
            image = rgb.round_().clamp_(0, 255).to(torch.uint8)
        else:
            image = image[:3] * image[3:] + (1 - image[3:])
    elif image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image


def _channel_axis(shape: Iterable[int], input_data_format: str | None) -> str | None:
    first, _, last = shape
    if input_data_format is not None:
        layout = "first" if str(getattr(input_data_format, "value", input_data_format)) == "channels_first" else "last"
        return layout if (first if layout == "first" else last) in (1, 3, 4) else None
    if first in (1, 3, 4):
        return "first"
    if last in (1, 3, 4):
        return "last"
    return None
