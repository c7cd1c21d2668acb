"""
Custom handler for Hugging Face Inference Endpoints: QualiCLIP quality scores as an image-classification answer.

The Hub's hosted widget and the default Endpoint container do not run custom model code; this file, at the root of
the model repository, makes an Endpoint serve the model. The request body is either an image file (the container
decodes it to a PIL image) or JSON:

    {"inputs": "<base64 image>" | ["<base64>", ...], "parameters": {"max_size": 1024}}

The answer has the shape of an image-classification pipeline's, two labels sorted by score:

    [{"label": "good", "score": 0.83}, {"label": "bad", "score": 0.17}]

where the "good" score is the QualiCLIP quality score in [0, 1] (higher is better) and "bad" is its complement.
A list of inputs gives a list of such answers; an input that cannot be decoded or scored gets
`[{"error": "<reason>"}]` in its place and the others are still scored. A single input that fails raises
`ValueError` with the reason (the Endpoint answers it as a client error).

With the `qualiclip_hf` package installed its classes are used; otherwise the model is loaded with
`trust_remote_code=True` from the code files saved in the repository.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from transformers import AutoModel, AutoProcessor

LABELS = ("good", "bad")


class EndpointHandler:
    def __init__(self, path: str = "") -> None:
        """
        Args:
            path: the model repository's local folder (the Endpoint passes it); empty means this file's folder.
        """
        path = path or str(Path(__file__).resolve().parent)
        try:
            import qualiclip_hf  # noqa: F401  (registers QualiCLIP with the Auto classes)

            remote_code = False
        except ImportError:
            remote_code = True
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModel.from_pretrained(path, trust_remote_code=remote_code).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=remote_code)

    def __call__(self, data: dict[str, Any]) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """
        Args:
            data: `{"inputs": image or list of images, "parameters": {"max_size": int}}`, where an image is a PIL
                image, the bytes of an image file, or those bytes base64-encoded (a `data:` URL is accepted).

        Returns:
            For one image, `[{"label": "good", "score": q}, {"label": "bad", "score": 1 - q}]` sorted by score; for
            a list, one such list per image (or `[{"error": ...}]`).
        """
        if not isinstance(data, dict):
            raise ValueError(f'expected a dict {{"inputs": ..., "parameters": ...}}, got {type(data).__name__}')
        inputs = data.get("inputs", data)
        parameters = data.get("parameters") or {}
        max_size = parameters.get("max_size")
        if max_size is not None and (not isinstance(max_size, int) or max_size < 1):
            raise ValueError(f"parameters.max_size must be a positive integer, got {max_size!r}")

        if isinstance(inputs, (list, tuple)):
            if not inputs:
                raise ValueError("inputs is an empty list")
            return self._score_many(list(inputs), max_size)
        answer = self._score_many([inputs], max_size)[0]
        if "error" in answer[0]:
            raise ValueError(answer[0]["error"])
        return answer

    def _score_many(self, items: list[Any], max_size: int | None) -> list[list[dict[str, Any]]]:
        answers: list[list[dict[str, Any]] | None] = [None] * len(items)
        images: dict[int, Image.Image] = {}
        for index, item in enumerate(items):
            try:
                images[index] = self._check_size(decode_image(item), max_size)
            except ValueError as error:
                answers[index] = [{"error": f"input {index}: {error}"}]
        if images:
            try:
                scores = self._run(list(images.values()), max_size)
            except (RuntimeError, ValueError):
                # A batch failing as a whole (out of memory, say): each image on its own gets its own outcome.
                scores = []
                for index, image in images.items():
                    try:
                        scores.extend(self._run([image], max_size))
                    except (RuntimeError, ValueError) as error:
                        scores.append(f"input {index}: scoring failed: {error}")
            for index, score in zip(images, scores, strict=True):
                answers[index] = [{"error": score}] if isinstance(score, str) else _labels(score)
        return answers

    def _check_size(self, image: Image.Image, max_size: int | None) -> Image.Image:
        width, height = image.size
        scale = 1.0 if max_size is None else min(1.0, max_size / max(width, height))
        minimum = self.model.min_image_size
        if min(width, height) * scale < minimum:
            raise ValueError(f"{width}x{height} pixels is below the model's {minimum}x{minimum} minimum")
        return image

    @torch.inference_mode()
    def _run(self, images: list[Image.Image], max_size: int | None) -> list[float]:
        inputs = self.processor(images=images, return_tensors="pt", max_size=max_size).to(self.device)
        return self.model(**inputs).quality_score.float().cpu().tolist()


def _labels(score: float) -> list[dict[str, Any]]:
    answer = [{"label": LABELS[0], "score": score}, {"label": LABELS[1], "score": 1.0 - score}]
    return sorted(answer, key=lambda entry: entry["score"], reverse=True)


def decode_image(item: Any) -> Image.Image:
    """
    A PIL image, image-file bytes, or base64 text (optionally a `data:` URL) -> a decoded PIL image. Its mode and
    EXIF orientation are left to the processor, which handles them as `qualiclip score` does.
    """
    if isinstance(item, Image.Image):
        image = item
    else:
        if isinstance(item, str):
            text = item.split(",", 1)[1] if item.startswith("data:") else item
            try:
                item = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("a string input must be a base64-encoded image file") from None
        if not isinstance(item, (bytes, bytearray, memoryview)):
            raise ValueError(f"expected an image, image-file bytes or base64 text, got {type(item).__name__}")
        try:
            image = Image.open(io.BytesIO(bytes(item)))
            image.load()
        except UnidentifiedImageError:
            raise ValueError(f"{len(item)} bytes that are not an image file of a supported format") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise ValueError(f"cannot decode the image: {error}") from None
    return image
