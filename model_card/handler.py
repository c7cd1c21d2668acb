"""
Custom handler for Hugging Face Inference Endpoints: the `image-quality-assessment` pipeline behind an Endpoint.

The Hub's hosted widget and the default Endpoint container do not run custom model code; this file, at the root of
the model repository, makes an Endpoint serve the model. It is a thin layer over the pipeline
(`ImageQualityAssessmentPipeline`), which owns reading the images, the per-image rules and the labels. The request
body is either an image file (the container decodes it to a PIL image) or JSON:

    {"inputs": "<base64 image>" | ["<base64>", ...], "parameters": {"max_size": 1024}}

`parameters` are the pipeline's image options (`max_size`, `convert_icc`). The answer is the pipeline's in the
image-classification schema, two labels sorted by score:

    [{"label": "good", "score": 0.83}, {"label": "bad", "score": 0.17}]

where the "good" score is the QualiCLIP quality score in [0, 1] (higher is better) and "bad" is its complement.
A list of inputs gives a list of such answers, scored in one batch; when the batch fails, each input is scored on
its own, so one that cannot be decoded or scored gets `[{"error": "input N: <reason>"}]` in its place and the others
are still scored. A single input that fails raises `ValueError` with the reason (the Endpoint answers it as a
client error).

Strings are base64 only: an Endpoint never reads a path of its own disk or fetches a URL for a client.

With the `qualiclip_hf` package installed its classes are used; otherwise the model and pipeline are loaded with
`trust_remote_code=True` from the code files saved in the repository.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import pipeline

# The pipeline's task (`IMAGE_QUALITY_TASK`; saved folders declare it in `custom_pipelines`, for remote code).
TASK = "image-quality-assessment"
# The pipeline's image options a request may set; anything else is refused.
PARAMETERS = ("max_size", "convert_icc")


class EndpointHandler:
    def __init__(self, path: str = "") -> None:
        """
        Args:
            path: the model repository's local folder (the Endpoint passes it); empty means this file's folder.
        """
        path = path or str(Path(__file__).resolve().parent)
        try:
            from qualiclip_hf import ImageQualityAssessmentPipeline  # also registers QualiCLIP with the Auto classes
            from qualiclip_hf.loading import select_device

            # The folder's `custom_pipelines` entry would otherwise ask for its remote code even with the package.
            source = {"pipeline_class": ImageQualityAssessmentPipeline}
            device = select_device()
        except ImportError:  # the model repository's remote code alone: CUDA, else the CPU
            source = {"trust_remote_code": True}
            device = 0 if torch.cuda.is_available() else -1
        self.pipeline = pipeline(TASK, model=path, device=device, **source)
        self.model = self.pipeline.model

    def __call__(self, data: dict[str, Any]) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """
        Args:
            data: `{"inputs": image or list of images, "parameters": {...}}`, where an image is a PIL image, the bytes
                of an image file, or those bytes base64-encoded (a `data:` URL is accepted).

        Returns:
            For one image, `[{"label": ..., "score": ...}, {...}]` sorted by score; for a list, one such list per
            image (or `[{"error": ...}]`).

        Raises:
            ValueError: a malformed request, or a single input that cannot be scored, with the reason.
        """
        if not isinstance(data, dict):
            raise ValueError(f'expected a dict {{"inputs": ..., "parameters": ...}}, got {type(data).__name__}')
        inputs = data.get("inputs", data)
        options = data.get("parameters") or {}
        unknown = [key for key in options if key not in PARAMETERS]
        if unknown:
            raise ValueError(f"unknown parameters {', '.join(map(repr, unknown))}; accepted: {', '.join(PARAMETERS)}")
        if not isinstance(inputs, (list, tuple)):
            return self._score(_as_image(inputs), options)
        if not inputs:
            raise ValueError("inputs is an empty list")
        items: list[Any] = []
        for index, item in enumerate(inputs):
            try:
                items.append(_as_image(item))
            except ValueError as error:
                items.append(ValueError(f"input {index}: {error}"))
        valid = [item for item in items if not isinstance(item, ValueError)]
        try:
            scored = iter(self.pipeline(valid, batch_size=len(valid), top_k=2, **options)) if valid else iter(())
            return [[{"error": str(item)}] if isinstance(item, ValueError) else next(scored) for item in items]
        except (RuntimeError, ValueError):
            pass  # the batch failed as a whole (a bad input, out of memory): each input on its own, below
        answers = []
        for index, item in enumerate(items):
            try:
                if isinstance(item, ValueError):
                    raise item
                answers.append(self._score(item, options))
            except ValueError as error:
                message = str(error)
                answers.append([{"error": message if message.startswith("input ") else f"input {index}: {message}"}])
        return answers

    def _score(self, image: Image.Image | bytes, options: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            return self.pipeline(image, top_k=2, **options)
        except TypeError as error:  # the pipeline's refusal of an option
            raise ValueError(str(error)) from None
        except RuntimeError as error:
            raise ValueError(f"scoring failed: {error}") from None


def _as_image(item: Any) -> Image.Image | bytes:
    """A PIL image or image-file bytes as they are; base64 text (optionally a `data:` URL) decoded to bytes."""
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, str):
        text = item.split(",", 1)[1] if item.startswith("data:") else item
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("a string input must be a base64-encoded image file") from None
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    raise ValueError(f"expected an image, image-file bytes or base64 text, got {type(item).__name__}")
