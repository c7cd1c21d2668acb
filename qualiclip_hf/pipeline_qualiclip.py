"""The `image-quality-assessment` pipeline: QualiCLIP's score in the output schema of image classification."""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from transformers import Pipeline
from transformers.pipelines.pt_utils import PipelineDataset, PipelineIterator

from .image_processing_qualiclip import pad_to_common_size
from .image_reader import decode_file

IMAGE_QUALITY_TASK = "image-quality-assessment"
GOOD_LABEL, BAD_LABEL = "good", "bad"
# Seconds an image URL may take to connect, and between two reads, when the call gives no `timeout`: a server that
# never answers fails the image instead of hanging the pipeline.
URL_TIMEOUT_S = 30.0

__all__ = ["BAD_LABEL", "GOOD_LABEL", "IMAGE_QUALITY_TASK", "ImageQualityAssessmentPipeline"]


class ImageQualityAssessmentPipeline(Pipeline):
    """
    No-reference image quality with a [`QualiCLIPModel`]. Each image gets two labels, `"good"` with the model's
    quality score `p` in [0, 1] and `"bad"` with `1 - p`, in the schema of the image-classification pipeline.

    Example:

    ```python
    >>> from transformers import pipeline
    >>> judge = pipeline(model="path/or/hub-id", trust_remote_code=True)
    >>> judge("photo.jpg")
    [{'label': 'good', 'score': 0.73}, {'label': 'bad', 'score': 0.27}]
    >>> judge(["a.jpg", "b.png"], batch_size=2)  # one list per image; images may differ in size
    ```

    Inputs: a local path, the bytes of an image file, an `http(s)://` URL, a base64 string (optionally a `data:`
    URL), a PIL image, or an array/tensor (see [`QualiCLIPImageProcessor`]: floating point in [0, 1]); or a list of
    them. Every file and byte string is read by the same image reader as `qualiclip score` (`image_reader`).
    Images keep their resolution unless `max_size` caps the longest side.

    Call arguments:
        top_k (`int`, *optional*): return the `top_k` most likely labels, sorted by score as image classification
            does. Without it, both labels come back, `"good"` first, so `result[0]["score"]` is always the quality.
        timeout (`float`, *optional*): seconds to wait for an image URL to connect, and between two reads (default
            `URL_TIMEOUT_S`, 30). A URL that fails (an HTTP error status, no answer in time, no connection) raises
            a one-line `ValueError` naming it. With `HF_HUB_OFFLINE=1`, only local addresses are fetched
            (`localhost`, loopback, private and link-local IP addresses).
        Any option of the image processor (`max_size`, `convert_icc`, `do_rescale`, ...): passed to it.
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False

    def _sanitize_parameters(
        self, top_k: int | None = None, timeout: float | None = None, **image_processor_kwargs: Any
    ) -> tuple[dict, dict, dict]:
        accepted = self.image_processor.valid_kwargs.__annotations__
        unknown = [key for key in image_processor_kwargs if key not in accepted]
        if unknown:
            raise TypeError(
                f"unexpected argument(s) {', '.join(map(repr, unknown))}; the pipeline takes top_k, timeout and the "
                f"image processor's options ({', '.join(sorted(accepted))})"
            )
        preprocess_params: dict[str, Any] = {"image_processor_kwargs": image_processor_kwargs}
        if timeout is not None:
            preprocess_params["timeout"] = timeout
        postprocess_params: dict[str, Any] = {}
        if top_k is not None:
            if top_k < 1:
                raise ValueError(f"top_k must be at least 1, got {top_k}")
            postprocess_params["top_k"] = top_k
        return preprocess_params, {}, postprocess_params

    def __call__(self, inputs: Any = None, **kwargs: Any) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        if "images" in kwargs:
            inputs = kwargs.pop("images")
        if inputs is None:
            raise ValueError("give the image(s) to judge: a path, URL, PIL image or array, or a list of them")
        if isinstance(inputs, tuple):
            inputs = list(inputs)
        return super().__call__(inputs, **kwargs)

    def preprocess(self, image: Any, timeout: float | None = None, image_processor_kwargs: dict | None = None) -> dict:
        name = _describe(image)
        try:
            loaded = _load(image, timeout)
            inputs = self.image_processor(images=loaded, return_tensors="pt", **(image_processor_kwargs or {}))
        except (OSError, ValueError, TypeError, SyntaxError, Image.DecompressionBombError) as error:
            cause = str(error).removeprefix(f"{name}: ")
            if isinstance(image, (str, Path)):  # errors found after decoding name the file too
                cause = cause.removeprefix(f"{Path(image)}: ")
            raise ValueError(f"cannot read image {name}: {cause}") from None
        return {"pixel_values": inputs["pixel_values"].to(self.dtype), "image_sizes": inputs["image_sizes"]}

    def _forward(self, model_inputs: dict) -> dict:
        return {"quality_score": self.model(**model_inputs).quality_score}

    def postprocess(self, model_outputs: dict, top_k: int | None = None) -> list[dict[str, Any]]:
        quality = float(model_outputs["quality_score"].float().reshape(-1)[0])
        labels = [{"label": GOOD_LABEL, "score": quality}, {"label": BAD_LABEL, "score": 1.0 - quality}]
        if top_k is None:
            return labels
        return sorted(labels, key=lambda entry: entry["score"], reverse=True)[:top_k]

    def get_iterator(
        self,
        inputs: Any,
        num_workers: int,
        batch_size: int,
        preprocess_params: dict,
        forward_params: dict,
        postprocess_params: dict,
    ) -> PipelineIterator:
        # The base class concatenates `pixel_values`, which fails for images of different sizes; here they are
        # padded to a common size with their true sizes kept, which the model crops back to.
        if isinstance(inputs, list):
            dataset = PipelineDataset(inputs, self.preprocess, preprocess_params)
        else:
            dataset = PipelineIterator(inputs, self.preprocess, preprocess_params)
            num_workers = min(num_workers, 1)  # an iterator cannot be split between workers
        loader = DataLoader(dataset, num_workers=num_workers, batch_size=batch_size, collate_fn=_collate)
        model_iterator = PipelineIterator(loader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)


def _collate(items: list[dict]) -> dict:
    """`(1, 3, h_i, w_i)` images -> `(batch_size, 3, max_h, max_w)` zero-padded, plus `(batch_size, 2)` sizes."""
    return {
        "pixel_values": pad_to_common_size([item["pixel_values"][0] for item in items]),
        "image_sizes": torch.cat([item["image_sizes"] for item in items]),
    }


def _load(image: Any, timeout: float | None) -> Image.Image | np.ndarray | torch.Tensor:
    """Files, bytes, URLs and base64 text read by the image reader; PIL images and arrays passed on unchanged."""
    if isinstance(image, Path):
        image = str(image)
    if isinstance(image, str):
        if image.startswith(("http://", "https://")):
            return _open_named(_fetch(image, URL_TIMEOUT_S if timeout is None else timeout), image)
        if os.path.lexists(image):
            return _open_named(image, image)
        text = image.split(",", 1)[1] if image.startswith("data:") else image
        try:  # transformers' pipelines also take base64-encoded images as strings
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("no such file (nor a URL or base64-encoded image)") from None
        return _open_named(data, None)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _open_named(image, None)
    if isinstance(image, (Image.Image, np.ndarray, torch.Tensor)):
        return image
    raise TypeError(f"unsupported input type {type(image).__name__}; give a path, URL, bytes, PIL image or array")


def _fetch(url: str, timeout: float) -> bytes:
    """
    The bytes at an image URL, fetched with `httpx` (redirects followed, `timeout` seconds for each of connecting and
    each read). With `HF_HUB_OFFLINE` set, only local addresses are fetched (`_is_local_host`): offline mode is about
    leaving the machine, and an image served on it or on the local network does not.

    Raises:
        ValueError: one line, for an HTTP error status (`HTTP 404 Not Found`), no answer within `timeout`, a failed
            connection, or a non-local address in offline mode.
    """
    import httpx
    from huggingface_hub import constants

    host = httpx.URL(url).host
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    if offline and not _is_local_host(host):
        raise ValueError(
            f"offline mode (HF_HUB_OFFLINE) fetches images from local addresses only, and {host} is not one; give the "
            "image's file or bytes, or unset HF_HUB_OFFLINE"
        )
    try:
        response = httpx.get(url, follow_redirects=True, timeout=timeout)
    except httpx.TimeoutException:
        raise ValueError(f"no answer within {timeout:g} s (raise it with timeout=SECONDS)") from None
    except httpx.HTTPError as error:
        raise ValueError(f"cannot fetch it: {error or type(error).__name__}") from None
    if response.is_error:
        raise ValueError(f"the server answered HTTP {response.status_code} {response.reason_phrase}")
    return response.content


def _is_local_host(host: str) -> bool:
    """`localhost`, or an IP address of this machine or of a private or link-local network (no name is resolved)."""
    import ipaddress

    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return address.is_loopback or address.is_private or address.is_link_local


def _open_named(source: Any, name: str | None) -> Image.Image:
    # The caller names the input; the reader's message starts with the path (or the byte count).
    try:
        return decode_file(source)  # the image processor makes it viewable (orientation, profile, ...)
    except ValueError as error:
        prefix = f"{Path(name)}: " if name is not None else f"<{len(source)} bytes>: "
        raise ValueError(str(error).removeprefix(prefix)) from None


def _describe(image: Any) -> str:
    """How an input is named in error messages: the path or URL, or what the object is."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"({len(image)} bytes)"
    if isinstance(image, (str, Path)):
        text = str(image)
        return repr(text if len(text) <= 200 else text[:100] + "...")
    if isinstance(image, Image.Image):
        origin = f" from {image.filename}" if getattr(image, "filename", "") else ""
        return f"(PIL image {image.width}x{image.height} {image.mode}{origin})"
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return f"({type(image).__name__} of shape {tuple(image.shape)})"
    return f"({type(image).__name__})"
