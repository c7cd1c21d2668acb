"""Image processor of QualiCLIP: full-resolution images, CLIP normalisation, exact batching of mixed sizes."""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ChannelDimension,
    ImageInput,
    infer_channel_dimension_format,
)
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType, logging

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "QualiCLIPImageProcessor",
    "limit_longest_side",
    "load_image",
    "pad_to_common_size",
    "to_viewable_rgb",
]

logger = logging.get_logger(__name__)

# Pillow's own default for `Image.MAX_IMAGE_PIXELS` (about 9500 x 9500): larger files are refused unless asked for,
# because a small file can claim a huge size and exhaust memory when decoded (a "decompression bomb").
DEFAULT_MAX_PIXELS = 89_478_485
# File name endings taken as local image files when a string is given to the processor.
IMAGE_FILE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jp2", ".heic", ".avif"}
)


class QualiCLIPImageProcessorKwargs(ImagesKwargs, total=False):
    """
    max_size (`int`, *optional*):
        Longest side, in pixels, above which an image is downscaled (aspect ratio kept, antialiased bicubic).
        `None` (the default) scores every image at its full resolution, as the official QualiCLIP does.
    """

    max_size: int | None


class QualiCLIPImageProcessor(TorchvisionBackend):
    r"""
    Prepares images for [`QualiCLIPModel`]: EXIF orientation applied, converted to RGB, scaled to [0, 1] and
    normalised with CLIP's mean and standard deviation. Images keep their resolution (QualiCLIP judges the image as
    it is; resizing would change its quality), unless `max_size` caps the longest side.

    Images of different sizes in one call are zero-padded (bottom and right) to a common size when tensors are
    requested, and their true sizes are returned as `image_sizes`; [`QualiCLIPModel`] crops each one back before
    any computation, so every image gets exactly the score it gets alone.

    Accepted images: PIL images (any mode, see [`to_viewable_rgb`]); paths of image files (read by [`load_image`],
    whose errors name the file and the cause); numpy arrays and torch tensors of shape `(height, width)`,
    `(channels, height, width)` or `(height, width, channels)` with 1 (grey), 3 (RGB) or 4 (RGBA, composited onto
    white) channels. Integer arrays hold 8-bit values (0 to 255), except `uint16`, which holds 16-bit values (0 to
    65535) and is scaled down; floating-point arrays hold values in [0, 255] (in [0, 1] with `do_rescale=False`).
    Anything else (booleans, NaN or infinite values, values out of range, empty or wrongly shaped arrays) raises a
    `ValueError` or `TypeError` saying what is wrong.

    Returns a [`BatchFeature`] with `pixel_values` `(batch_size, 3, height, width)` and `image_sizes`
    `(batch_size, 2)` (or lists of per-image tensors when `return_tensors` is `None`).
    """

    valid_kwargs = QualiCLIPImageProcessorKwargs
    model_input_names = ["pixel_values", "image_sizes"]

    do_convert_rgb = True
    do_resize = False
    do_center_crop = False
    do_rescale = True
    do_normalize = True
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    max_size = None

    def __init__(self, **kwargs: Unpack[QualiCLIPImageProcessorKwargs]) -> None:
        super().__init__(**kwargs)

    def fetch_images(self, image_url_or_urls: Any) -> Any:
        # Local files go through `load_image` (EXIF, 16 bits, transparency, pixel limit, errors naming the file);
        # URLs and base64 strings stay with transformers. Greyscale `(height, width)` arrays get their channel axis
        # here, before transformers flattens the input into a list of images.
        if isinstance(image_url_or_urls, (list, tuple)):
            if not image_url_or_urls:
                raise ValueError("got an empty list of images")
            return [self.fetch_images(item) for item in image_url_or_urls]
        if isinstance(image_url_or_urls, os.PathLike) or (
            isinstance(image_url_or_urls, str) and _is_local_file_name(image_url_or_urls)
        ):
            return load_image(image_url_or_urls)
        if isinstance(image_url_or_urls, (np.ndarray, torch.Tensor)):
            if image_url_or_urls.ndim not in (2, 3, 4):
                raise ValueError(
                    "an image array must have shape (height, width), (channels, height, width) or (height, width, "
                    f"channels), or a batch of those; got shape {tuple(image_url_or_urls.shape)}"
                )
            return image_url_or_urls[None] if image_url_or_urls.ndim == 2 else image_url_or_urls
        return super().fetch_images(image_url_or_urls)

    def process_image(self, image: ImageInput, *args: Any, **kwargs: Any) -> torch.Tensor:
        if isinstance(image, Image.Image):
            image = to_viewable_rgb(image)
        elif isinstance(image, (np.ndarray, torch.Tensor)):
            full_scale = 1.0 / kwargs["rescale_factor"] if kwargs.get("do_rescale") else 1.0
            image = _standardize_array(
                image, kwargs.get("input_data_format"), full_scale, kwargs.get("do_convert_rgb") is not False
            )
            kwargs["input_data_format"] = ChannelDimension.FIRST
        return super().process_image(image, *args, **kwargs)

    def _preprocess(
        self,
        images: list[torch.Tensor],
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | tuple[float, ...] | None,
        image_std: float | tuple[float, ...] | None,
        return_tensors: str | TensorType | None,
        max_size: int | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        processed = []
        for image in images:
            if max_size is not None:
                image = self._limit_longest_side(image, max_size)
            processed.append(
                self.rescale_and_normalize(image, do_rescale, rescale_factor, do_normalize, image_mean, image_std)
            )
        image_sizes = [tuple(image.shape[-2:]) for image in processed]
        if return_tensors is None:
            return BatchFeature(data={"pixel_values": processed, "image_sizes": image_sizes})
        return BatchFeature(
            data={"pixel_values": pad_to_common_size(processed), "image_sizes": torch.tensor(image_sizes)},
            tensor_type=return_tensors,
        )

    @staticmethod
    def _limit_longest_side(image: torch.Tensor, max_size: int) -> torch.Tensor:
        resized = limit_longest_side(image[None].float(), max_size)[0]
        if image.dtype == torch.uint8:
            return resized.round_().clamp_(0, 255).to(torch.uint8)
        # Bicubic overshoots at sharp edges; a float image is kept within its own range, as uint8 is within 0-255.
        return resized.clamp_(image.min().item(), image.max().item()).to(image.dtype)


def limit_longest_side(images: torch.Tensor, max_size: int) -> torch.Tensor:
    """
    Downscales `(batch_size, channels, height, width)` float images whose longest side exceeds `max_size`, keeping the
    aspect ratio (antialiased bicubic, as PIL does); smaller images are returned unchanged. Values may overshoot
    the input range slightly, as with any bicubic filter.
    """
    height, width = images.shape[-2:]
    scale = max_size / max(height, width)
    if scale >= 1:
        return images
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False)


def to_viewable_rgb(image: Image.Image) -> Image.Image:
    """
    The 8-bit RGB image a viewer shows, which is what QualiCLIP judges:

    - EXIF orientation applied (cameras store portrait photos sideways with a tag);
    - 16-bit and 32-bit integer greyscale (modes `I;16*`, `I`) scaled to 8 bits (PIL's own conversion would clip
      them to white); 32-bit float greyscale (`F`) taken on the 8-bit scale and clipped, as PIL converts it;
    - transparency (an alpha channel, or palette entries or a colour key marked transparent) composited onto
      white, as on a white page. The official QualiCLIP code and pyiqa's file reader drop the alpha channel instead
      and show whatever colour transparent pixels happen to store (often black), so their scores of images with
      transparent pixels differ from ours; fully opaque images are unaffected;
    - every other mode (palette, CMYK, YCbCr, 1-bit, ...) converted by PIL.

    An animated or multi-page image gives the frame it is positioned on: the first one, as opened.

    Raises:
        ValueError: for a floating-point image with NaN or infinite values.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode == "I":
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(np.rint(array * (255.0 / peak)), 0, 255).astype(np.uint8))
    elif image.mode == "F" and not np.isfinite(np.asarray(image)).all():
        raise ValueError("the image has NaN or infinite pixel values")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """
    Reads an image file as [`to_viewable_rgb`] shows it (first frame of animations), fully decoded.

    Args:
        path: The file. Any format an installed Pillow reader supports (HEIC needs `pillow-heif`, registered here
            when installed).
        max_pixels: Files of more pixels are refused before they are decoded: a few kilobytes can claim billions of
            pixels (a decompression bomb). The default is Pillow's. `None` removes the limit; raise it only for
            files you trust, and downscale them for scoring with `max_size`.

    Raises:
        ValueError: naming the file and the cause: missing, a directory, empty, not an image, truncated or corrupt,
            too many pixels, NaN pixel values.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not an image")
    if not path.exists():
        raise ValueError(f"{path}: no such file" + (" (broken symbolic link)" if path.is_symlink() else ""))
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes)")
    _register_optional_readers()
    try:
        with warnings.catch_warnings(), _pillow_pixel_limit_at_least(max_pixels):
            # Pillow's warning between its limit and twice it: our own limit, below, decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if max_pixels is not None and width * height > max_pixels:
                    raise _ImageRefused(
                        f"{width}x{height} = {width * height:,} pixels is more than the limit of {max_pixels:,} "
                        "(a guard against decompression bombs); if you trust the file, raise the limit (max_pixels=, "
                        "--max-pixels) and downscale it for scoring with max_size (--max-size)"
                    )
                image.load()
                return to_viewable_rgb(image)
    except _ImageRefused as error:
        raise ValueError(f"{path}: {error}") from None
    except UnidentifiedImageError:
        raise ValueError(
            f"{path}: not an image file, a damaged one, or a format no installed reader supports"
        ) from None
    except Image.DecompressionBombError as error:
        raise ValueError(
            f"{path}: refused by Pillow's guard against decompression bombs: {error} If you trust the file, raise "
            "the limit (max_pixels=, --max-pixels) and downscale it for scoring with max_size (--max-size)"
        ) from None
    except MemoryError:
        raise ValueError(f"{path}: not enough memory to decode it; lower max_pixels to refuse such files") from None
    except Exception as error:  # Pillow's plugins raise many kinds of errors on corrupt files; each is this file's
        raise ValueError(f"{path}: cannot decode image: {error}") from None


class _ImageRefused(ValueError):
    pass


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


def _is_local_file_name(text: str) -> bool:
    if text.startswith(("http://", "https://", "data:")):
        return False
    return os.path.lexists(text) or (len(text) < 4096 and Path(text).suffix.lower() in IMAGE_FILE_SUFFIXES)


def _standardize_array(
    image: np.ndarray | torch.Tensor,
    input_data_format: ChannelDimension | str | None,
    full_scale: float,
    composite_alpha: bool,
) -> torch.Tensor:
    """
    Checks an array image and returns it as a `(channels, height, width)` tensor that transformers' conversion and
    `rescale_and_normalize` treat correctly: `uint8` as is, `uint16` scaled down to `full_scale`, other integers and
    floats checked against their range, alpha composited onto white.
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
        image, input_data_format = image[None], ChannelDimension.FIRST
    if image.ndim != 3:
        raise ValueError(f"an image must have 2 or 3 dimensions, got shape {shape}")
    if image.numel() == 0:
        raise ValueError(f"the image of shape {shape} is empty")
    try:
        layout = input_data_format or infer_channel_dimension_format(image, num_channels=(1, 3, 4))
    except ValueError:
        layout = None
    if layout is not None and ChannelDimension(layout) == ChannelDimension.LAST:
        image = image.permute(2, 0, 1)
    if layout is None or image.shape[0] not in (1, 3, 4):
        raise ValueError(
            f"an image needs 1 (grey), 3 (RGB) or 4 (RGBA) channels, first or last; got shape {shape}"
            + ("" if input_data_format is None else f" with input_data_format={input_data_format}")
        )

    if image.dtype == torch.uint8:
        white = 255.0
    elif image.dtype == torch.uint16:
        image, white = image.to(torch.float32) * (full_scale / 65535), full_scale
    elif not image.is_floating_point():
        low, high = int(image.min()), int(image.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"an integer image holds 8-bit values (0 to 255), or 16-bit ones as uint16; got {image.dtype} values "
                f"from {low} to {high} (shape {shape})"
            )
        white = 255.0
    else:
        image = image.to(torch.float32)
        low, high = image.min().item(), image.max().item()
        if not (np.isfinite(low) and np.isfinite(high)):
            raise ValueError(f"the image of shape {shape} has NaN or infinite values")
        tolerance = 1e-3 * full_scale
        if low < -tolerance or high > full_scale + tolerance:
            raise ValueError(
                f"a floating-point image holds values in [0, {full_scale:g}] "
                + ("(or [0, 1] with do_rescale=False)" if full_scale != 1 else "(with do_rescale=False)")
                + f"; got values from {low:g} to {high:g} (shape {shape})"
            )
        if full_scale > 1 and high <= 1:
            logger.warning_once(
                "A floating-point image has all its values in [0, 1], but is taken on the [0, 255] scale. If it is "
                "already scaled to [0, 1], pass do_rescale=False."
            )
        white = full_scale

    if composite_alpha and image.shape[0] == 4:
        alpha = image[3:].to(torch.float32) / white
        composited = image[:3].to(torch.float32) * alpha + white * (1 - alpha)
        image = composited.round().clamp(0, 255).to(torch.uint8) if image.dtype == torch.uint8 else composited
    return image


def pad_to_common_size(images: list[torch.Tensor]) -> torch.Tensor:
    """
    Stacks `(3, height_i, width_i)` tensors into `(batch_size, 3, max_height, max_width)`, zero-padding each one at
    the bottom and right (the convention `QualiCLIPModel` expects with `image_sizes`).
    """
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    batch = images[0].new_zeros(len(images), images[0].shape[0], height, width)
    for index, image in enumerate(images):
        batch[index, :, : image.shape[-2], : image.shape[-1]] = image
    return batch
