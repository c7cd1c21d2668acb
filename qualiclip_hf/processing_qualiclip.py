"""Processor of QualiCLIP: the image processor plus CLIP's tokenizer (used to (re)compute prompt embeddings)."""

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


__all__ = ["QualiCLIPProcessor"]
