"""Image processor of QualiCLIP: full-resolution images, CLIP normalisation, exact batching of mixed sizes."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageInput
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType

__all__ = ["QualiCLIPImageProcessor", "limit_longest_side", "pad_to_common_size", "to_viewable_rgb"]


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

    def process_image(self, image: ImageInput, *args: Any, **kwargs: Any) -> torch.Tensor:
        if isinstance(image, Image.Image):
            image = to_viewable_rgb(image)
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
        return resized.to(image.dtype)


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
    The RGB image a viewer sees: EXIF orientation applied (cameras store portrait photos sideways with a tag), 16-bit
    and 32-bit integer greyscale scaled to 8 bits (PIL's own conversion would clip them to white), transparency and
    palettes resolved by PIL's RGB conversion.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode == "I":
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(np.rint(array * (255.0 / peak)), 0, 255).astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")


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
