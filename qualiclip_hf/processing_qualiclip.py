"""Processor of QualiCLIP: the image processor plus CLIP's tokenizer (used to (re)compute prompt embeddings)."""

import os
from typing import Any

from transformers.processing_utils import ProcessingKwargs, ProcessorMixin

from .image_processing_qualiclip import QualiCLIPImageProcessorKwargs


class QualiCLIPProcessorKwargs(ProcessingKwargs, total=False):
    images_kwargs: QualiCLIPImageProcessorKwargs
    _defaults = {}


class QualiCLIPProcessor(ProcessorMixin):
    r"""
    Wraps a [`QualiCLIPImageProcessor`] and a [`CLIPTokenizer`] into a single processor.

    `processor(images=...)` gives the inputs of [`QualiCLIPModel`]; `processor(text=...)` tokenizes prompts the way
    [`QualiCLIPModel.set_prompts`] needs them. `ProcessorMixin.__call__` routes keyword arguments to the part that
    takes them (`max_size`, `convert_icc`, `do_rescale` to the image processor; `padding`, `max_length`, ... to the
    tokenizer; `return_tensors` to both).
    """

    valid_processor_kwargs = QualiCLIPProcessorKwargs

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """
        [`ProcessorMixin.save_pretrained`], leaving the processor as it was: transformers writes the `auto_map` of a
        processor registered for the Auto classes onto the object itself, which `from_pretrained` does not restore, so
        a saved processor would otherwise differ (`to_dict()`) from the one loaded back from its folder.
        """
        had_auto_map = "auto_map" in self.__dict__
        previous = self.__dict__.get("auto_map")
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            if had_auto_map:
                self.auto_map = previous
            else:
                self.__dict__.pop("auto_map", None)


__all__ = ["QualiCLIPProcessor"]
