"""Image processor of QualiCLIP: the per-image rules (minimum size, resize), CLIP normalisation, exact batching."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ChannelDimension,
    ImageInput,
)
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType

from .image_reader import array_to_chw, decode_file, is_local_file_name, to_viewable_rgb

__all__ = [
    "MIN_IMAGE_SIZE",
    "QualiCLIPImageProcessor",
    "limit_longest_side",
    "pad_to_common_size",
]

# Smallest height and width QualiCLIP's image tower accepts: its total stride (`VISION_STRIDE` of the modeling file).
MIN_IMAGE_SIZE = 32


class QualiCLIPImageProcessorKwargs(ImagesKwargs, total=False):
    """
    max_size (`int`, *optional*):
        Longest side, in pixels, above which an image is downscaled (aspect ratio kept, antialiased bicubic).
        `None` (the default) scores every image at its full resolution, as the official QualiCLIP does.
    convert_icc (`bool`, *optional*, defaults to `True`):
        Convert an embedded ICC colour profile of an image file or PIL image to sRGB; `False` ignores profiles, as
        the official QualiCLIP code and pyiqa do.
    """

    max_size: int | None
    convert_icc: bool


class QualiCLIPImageProcessor(TorchvisionBackend):
    r"""
    Prepares images for [`QualiCLIPModel`]: read as a viewer shows them (see `image_reader`: bit depth, EXIF
    orientation, ICC profile, transparency, frames), scaled to [0, 1] and normalised with CLIP's mean and standard
    deviation. Images keep their resolution (QualiCLIP judges the image as it is; resizing would change its quality),
    unless `max_size` caps the longest side.

    This class owns the per-image rules shared by every entry point: the minimum size (`min_size`, checked after
    `max_size`) and the resize ([`limit_longest_side`], in floating point, never rounded to 8 bits).

    Images of different sizes in one call are zero-padded (bottom and right) to a common size when tensors are
    requested, and their true sizes are returned as `image_sizes`; [`QualiCLIPModel`] crops each one back before
    any computation, so every image gets exactly the score it gets alone.

    Accepted images: PIL images (any mode); paths of image files (read by `image_reader.decode_file`, whose errors
    name the file and the cause); numpy arrays and torch tensors (see `image_reader.array_to_chw`): `uint8` 0 to 255,
    `uint16` 0 to 65535, floating point in [0, 1], with 1, 3 or 4 channels first or last. `do_rescale=False` says
    that every image is already in [0, 1], so only floating-point ones are accepted then. `do_convert_rgb=False`, as
    in transformers, keeps each image's channels as given (a PIL image's own mode, an array's 1, 3 or 4 channels; no
    colour management, no compositing of transparency), for images that already are what is needed;
    [`QualiCLIPModel`] itself takes 3 channels. Anything else raises a `ValueError` or `TypeError` saying what is
    wrong.

    Returns a [`BatchFeature`] with `pixel_values` `(batch_size, 3, height, width)` and `image_sizes`
    `(batch_size, 2)` (or lists of per-image tensors when `return_tensors` is `None`).

    Raises:
        ValueError: an image smaller than `min_size` x `min_size` pixels (after `max_size`), or `max_size` below it.
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
    convert_icc = True
    min_size = MIN_IMAGE_SIZE

    def __init__(self, **kwargs: Unpack[QualiCLIPImageProcessorKwargs]) -> None:
        super().__init__(**kwargs)
        self.check_max_size(self.max_size)

    def check_max_size(self, max_size: int | None) -> None:
        """Raises `ValueError` when `max_size` is not `None` and below `min_size`."""
        if max_size is not None and (
            isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < self.min_size
        ):
            raise ValueError(
                f"max_size must be an integer of at least {self.min_size} (the model's minimum), got {max_size!r}"
            )

    def check_size(self, height: int, width: int, max_size: int | None = None) -> None:
        """Raises `ValueError` when an image of `height` x `width` pixels is, after `max_size`, below `min_size`."""
        scale = 1.0 if max_size is None else min(1.0, max_size / max(height, width))
        if min(height, width) * scale < self.min_size:
            # The size after resizing, rounded as `limit_longest_side` rounds it.
            resized = f", {round(width * scale)}x{round(height * scale)} after max_size={max_size}," * (scale < 1)
            raise ValueError(
                f"{width}x{height} pixels{resized} is below the model's {self.min_size}x{self.min_size} minimum"
            )

    def prepare_pixels(
        self,
        images: torch.Tensor,
        max_size: int | None = None,
        do_normalize: bool | None = None,
        image_mean: float | tuple[float, ...] | None = None,
        image_std: float | tuple[float, ...] | None = None,
    ) -> torch.Tensor:
        """
        The per-image rules on `(batch_size, 3, height, width)` float images in [0, 1]: size checked, downscaled
        when the longest side exceeds `max_size` ([`limit_longest_side`]), normalised. Differentiable (the pyiqa
        plugin uses it on images that are optimised). Images with another number of channels (`do_convert_rgb=False`)
        take an `image_mean` and `image_std` of one value, or of one per channel.

        Raises:
            ValueError: the images are below `min_size` after `max_size`, `max_size` is below `min_size`, or
                `image_mean` / `image_std` hold neither one value nor one per channel.
        """
        self.check_max_size(max_size)
        self.check_size(*images.shape[-2:], max_size=max_size)
        if max_size is not None:
            images = limit_longest_side(images, max_size)
        if do_normalize if do_normalize is not None else self.do_normalize:
            channels = images.shape[-3]
            statistics = []
            for name, values in (("image_mean", image_mean), ("image_std", image_std)):
                values = torch.as_tensor(values if values is not None else getattr(self, name), dtype=images.dtype)
                if values.numel() not in (1, channels):
                    raise ValueError(
                        f"{name} has {values.numel()} values for images of {channels} channels; give one value, or "
                        "one per channel"
                    )
                statistics.append(values.to(images.device).view(-1, 1, 1))
            mean, std = statistics
            images = (images - mean) / std
        return images

    def fetch_images(self, image_url_or_urls: Any) -> Any:
        # Local files go through the image reader (errors naming the file); URLs and base64 strings stay with
        # transformers. Greyscale `(height, width)` arrays get their channel axis here, before transformers
        # flattens the input into a list of images.
        if isinstance(image_url_or_urls, (list, tuple)):
            if not _holds_an_image(image_url_or_urls):
                raise ValueError("got an empty list of images")
            # A nested list may hold empty lists: samples without images, in a processor call with text.
            return [
                item if isinstance(item, (list, tuple)) and not item else self.fetch_images(item)
                for item in image_url_or_urls
            ]
        if isinstance(image_url_or_urls, os.PathLike) or (
            isinstance(image_url_or_urls, str) and is_local_file_name(image_url_or_urls)
        ):
            return decode_file(image_url_or_urls)  # made viewable by `process_image`, which knows `convert_icc`
        if isinstance(image_url_or_urls, (np.ndarray, torch.Tensor)):
            if image_url_or_urls.ndim not in (2, 3, 4):
                raise ValueError(
                    "an image array must have shape (height, width), (channels, height, width) or (height, width, "
                    f"channels), or a batch of those; got shape {tuple(image_url_or_urls.shape)}"
                )
            return image_url_or_urls[None] if image_url_or_urls.ndim == 2 else image_url_or_urls
        return super().fetch_images(image_url_or_urls)

    def process_image(self, image: ImageInput, *args: Any, **kwargs: Any) -> torch.Tensor:
        convert_rgb = kwargs.get("do_convert_rgb", self.do_convert_rgb) is not False
        if isinstance(image, Image.Image):
            if convert_rgb:
                image = to_viewable_rgb(image, convert_icc=kwargs.get("convert_icc", self.convert_icc) is not False)
            else:  # the pixels of the image's own mode, as transformers' processors keep them
                image = np.array(image)
                kwargs["input_data_format"] = ChannelDimension.LAST if image.ndim == 3 else None
        if isinstance(image, (np.ndarray, torch.Tensor)):
            image = array_to_chw(image, kwargs.get("input_data_format"), convert_rgb=convert_rgb)
        else:
            image = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        if image.is_floating_point():
            # [0, 1]; put on the scale `rescale_factor` expects, so that every type is rescaled alike.
            if kwargs.get("do_rescale", self.do_rescale):
                image = image / kwargs.get("rescale_factor", self.rescale_factor)
        elif kwargs.get("do_rescale", self.do_rescale) is False:
            raise ValueError(
                "do_rescale=False says the images are already scaled to [0, 1], which only floating-point images "
                f"are; got {image.dtype} pixels (0 to 255): leave do_rescale on"
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
        self.check_max_size(max_size)
        processed = []
        for index, image in enumerate(images):
            image = image.to(torch.float32)
            if do_rescale:
                image = image * rescale_factor
            try:
                pixels = self.prepare_pixels(image[None], max_size, do_normalize, image_mean, image_std)[0]
            except ValueError as error:
                raise ValueError(f"image {index}: {error}" if len(images) > 1 else str(error)) from None
            processed.append(pixels)
        image_sizes = [tuple(image.shape[-2:]) for image in processed]
        if return_tensors is None:
            return BatchFeature(data={"pixel_values": processed, "image_sizes": image_sizes})
        return BatchFeature(
            data={"pixel_values": pad_to_common_size(processed), "image_sizes": torch.tensor(image_sizes)},
            tensor_type=return_tensors,
        )


def _holds_an_image(images: list | tuple) -> bool:
    """Whether a (possibly nested) list of images holds at least one image."""
    return any(_holds_an_image(item) if isinstance(item, (list, tuple)) else True for item in images)


def limit_longest_side(images: torch.Tensor, max_size: int) -> torch.Tensor:
    """
    Downscales `(batch_size, channels, height, width)` float images in [0, 1] whose longest side exceeds `max_size`,
    keeping the aspect ratio (antialiased bicubic, as PIL does), and clamps the result to [0, 1] (bicubic overshoots
    at sharp edges); smaller images are returned unchanged. The one resize of every entry point.
    """
    height, width = images.shape[-2:]
    scale = max_size / max(height, width)
    if scale >= 1:
        return images
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


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
