"""Processor of QualiCLIP: the image processor plus CLIP's tokenizer (used to (re)compute prompt embeddings)."""

from __future__ import annotations

from typing import Any

from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import ProcessorMixin


class QualiCLIPProcessor(ProcessorMixin):
    r"""
    Wraps a [`QualiCLIPImageProcessor`] and a [`CLIPTokenizer`] into a single processor.

    `processor(images=...)` gives the inputs of [`QualiCLIPModel`]; `processor(text=...)` tokenizes prompts the way
    [`QualiCLIPModel.set_prompts`] needs them. Keyword arguments go to the part that takes them (`max_size`,
    `return_tensors` to the image processor; `padding`, `max_length`, ... to the tokenizer).
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(
        self,
        images: ImageInput | None = None,
        text: str | list[str] | None = None,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        if images is None and text is None:
            raise ValueError("give `images`, `text`, or both")
        data: dict[str, Any] = {}
        if images is not None:
            image_keys = self.image_processor.valid_kwargs.__annotations__
            image_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in image_keys}
            data.update(self.image_processor(images, return_tensors=return_tensors, **image_kwargs))
        if text is not None:
            data.update(self.tokenizer(text, return_tensors=return_tensors, **kwargs))
        return BatchFeature(data=data)


__all__ = ["QualiCLIPProcessor"]
