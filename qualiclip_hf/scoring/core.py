"""The scoring core: decoded images in, one outcome per image out.

Every way of scoring many images (files, `datasets` datasets, Ray Data, the Endpoints handler) hands its decoded
images to [`score_images`], which owns the rules of a batch, once:

- an item that could not be decoded keeps its error message;
- each image's size is checked alone (the image processor owns the minimum-size rule), so that one small image does
  not fail its batch;
- a batch that fails as a whole (out of memory, say) is scored again one image at a time, so that each image gets
  its own outcome, and an out-of-memory failure says how to avoid it;
- the image embeddings, when asked for, travel with their scores.

A *scorer* is anything called as `scorer(**processor_outputs)` that returns an object with `quality_score` `(B,)` and
`image_embeds` `(B, D)` and has a `device`: a `QualiCLIPModel`, a fused or reduced-precision one, or an ONNX graph
(`qualiclip_hf.backends.precision.prepare_scorer` makes each).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

__all__ = ["DecodedImage", "ImageScore", "score_images"]

# A decoded image: a `(3, height, width)` uint8 tensor (on any device), a `(height, width, 3)` uint8 array, or the
# message of an image that could not be decoded (already naming it).
DecodedImage = Union[torch.Tensor, np.ndarray, str]  # noqa: UP007  (a runtime alias, read on Python 3.10 too)


@dataclass
class ImageScore:
    """
    The outcome for one image.

    Attributes:
        score: The quality score in [0, 1], higher is better; `None` when the image could not be scored.
        error: Why there is no score (naming the image and the cause), else `None`.
        height, width: The decoded image's size in pixels, before any `max_size` downscaling; `None` when it could not
            be decoded.
        image_embeds: The normalised image embedding (`D` floats: 1024 for the official model) when asked for and
            scored, else `None`.
    """

    score: float | None = None
    error: str | None = None
    height: int | None = None
    width: int | None = None
    image_embeds: list[float] | None = None


@torch.inference_mode()
def score_images(
    images: Sequence[DecodedImage],
    scorer: Any,
    processor: Any,
    labels: Sequence[str],
    max_size: int | None = None,
    with_embeddings: bool = False,
) -> list[ImageScore]:
    """
    Scores decoded images as one batch, in order: one [`ImageScore`] per item, never an exception for one image.

    Args:
        images: Decoded images (see `DecodedImage`): `(3, H, W)` uint8 tensors or `(H, W, 3)` uint8 arrays, or the
            error message of an item that could not be decoded (kept as its outcome).
        scorer: What runs the model (see the module's docstring).
        processor: The model's `QualiCLIPProcessor`: it resizes (`max_size`), checks sizes, normalises and pads.
        labels: What names each image in its error messages (a path, `row 12`, ...), one per image.
        max_size: Downscale images whose longest side exceeds this many pixels before scoring.
        with_embeddings: Also return each scored image's `image_embeds`.

    Returns:
        One [`ImageScore`] per image, in the order given.

    Raises:
        ValueError: when `labels` and `images` differ in length.
    """
    if len(labels) != len(images):
        raise ValueError(f"score_images needs one label per image: {len(images)} images, {len(labels)} labels")
    outcomes = [ImageScore() for _ in images]
    ready: list[tuple[int, torch.Tensor]] = []
    for index, image in enumerate(images):
        if isinstance(image, str):
            outcomes[index].error = image
            continue
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        outcomes[index].height, outcomes[index].width = (int(size) for size in image.shape[-2:])
        try:
            processor.image_processor.check_size(*image.shape[-2:], max_size=max_size)
        except ValueError as error:
            outcomes[index].error = f"{labels[index]}: {error}"
            continue
        ready.append((index, image))
    for index, score, embeds, error in _score_batch(ready, scorer, processor, labels, max_size, with_embeddings):
        outcomes[index].score, outcomes[index].image_embeds, outcomes[index].error = score, embeds, error
    return outcomes


def _score_batch(
    ready: list[tuple[int, torch.Tensor]],
    scorer: Any,
    processor: Any,
    labels: Sequence[str],
    max_size: int | None,
    with_embeddings: bool,
) -> list[tuple[int, float | None, list[float] | None, str | None]]:
    if not ready:
        return []
    try:
        inputs = processor(images=[image for _, image in ready], return_tensors="pt", max_size=max_size)
        output = scorer(**inputs.to(scorer.device))
        scores = output.quality_score.float().cpu().tolist()
        embeds = output.image_embeds.float().cpu().tolist() if with_embeddings else [None] * len(ready)
    except (RuntimeError, ValueError) as error:
        if len(ready) == 1:
            index, image = ready[0]
            return [(index, None, None, _failure_message(labels[index], image, error))]
        # The batch failed as a whole (out of memory, say): each image alone gets its own outcome.
        return [
            outcome
            for item in ready
            for outcome in _score_batch([item], scorer, processor, labels, max_size, with_embeddings)
        ]
    return [(index, score, embed, None) for (index, _), score, embed in zip(ready, scores, embeds, strict=True)]


def _failure_message(label: str, image: torch.Tensor, error: Exception) -> str:
    text = str(error)
    if isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text:
        height, width = image.shape[-2:]
        return (
            f"{label}: not enough memory to score {width}x{height} pixels at full resolution; downscale large images "
            "with --max-size (for example --max-size 2048; `max_size=2048` in Python)"
        )
    if isinstance(error, ValueError):  # the processor's checks say what is wrong with the image
        return f"{label}: {text}"
    return f"{label}: scoring failed: {text}"
