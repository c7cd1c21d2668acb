"""Configuration of QualiCLIP: a CLIP ResNet image tower, a frozen CLIP text tower and antonym prompt pairs."""

from __future__ import annotations

import os
import sys
from typing import Any

from transformers import PreTrainedConfig

# The seven antonym pairs of the official QualiCLIP release, as (positive, negative). The official list is a
# flat list of strings with a missing comma after "Noisy image.", which merges two prompts into one; writing
# the pairs explicitly makes that mistake impossible.
QUALICLIP_PROMPT_PAIRS: tuple[tuple[str, str], ...] = (
    ("Good photo.", "Bad photo."),
    ("Sharp image.", "Blurry image."),
    ("Sharp edges.", "Blurry edges."),
    ("High-resolution image.", "Low-resolution image."),
    ("Noise-free image.", "Noisy image."),
    ("High-quality image.", "Low-quality image."),
    ("Good picture.", "Bad picture."),
)

# How `QualiCLIPModel` reads the score from the image embedding (see `QualiCLIPConfig.quality_head`).
QUALITY_HEADS = ("prompts", "linear")


def _rename_legacy_keys(kwargs: dict[str, Any], attribute_map: dict[str, str]) -> dict[str, Any]:
    """
    Pops the keys that folders saved before the standard names (OpenAI's names: `layers`, `width`, `heads`,
    `output_dim`, ...) carry and returns them under their current names, so that those folders still load.
    """
    return {attribute_map[key]: kwargs.pop(key) for key in list(kwargs) if key in attribute_map}


class QualiCLIPVisionConfig(PreTrainedConfig):
    r"""
    Configuration of the image tower: OpenAI CLIP's `ModifiedResNet` (3-convolution stem, anti-aliased strided
    bottlenecks, attention pooling). The defaults are CLIP RN50. The names are transformers' (`ResNetConfig`,
    `CLIPVisionConfig`); OpenAI's names (in brackets) are accepted when loading and as attribute aliases.

    Args:
        depths (`list[int]`, defaults to `[3, 4, 6, 3]`):
            Number of bottleneck blocks in each of the four stages (`layers`).
        embedding_size (`int`, defaults to 64):
            Channels of the stem, and of the first stage's bottleneck width; the final feature map has
            `embedding_size * 32` channels (`width`).
        num_attention_heads (`int`, defaults to 32):
            Attention heads of the attention pool (`heads`).
        projection_dim (`int`, defaults to 1024):
            Dimension of the image embedding, shared with the text embedding (`output_dim`).
        use_pos_embedding (`bool`, defaults to `False`):
            Whether the attention pool adds CLIP's learned positional embedding. QualiCLIP scores images at their
            native resolution and therefore skips it; with it off, the tower accepts any input size.
        image_size (`int`, defaults to 224):
            Resolution the positional embedding was learned at (a `(image_size // 32) ** 2 + 1` token table;
            `image_resolution`). Only used when `use_pos_embedding` is on.
    """

    model_type = "qualiclip_vision_model"
    base_config_key = "vision_config"
    attribute_map = {
        "layers": "depths",
        "width": "embedding_size",
        "heads": "num_attention_heads",
        "output_dim": "projection_dim",
        "image_resolution": "image_size",
    }

    def __init__(
        self,
        depths: list[int] | tuple[int, ...] = (3, 4, 6, 3),
        embedding_size: int = 64,
        num_attention_heads: int = 32,
        projection_dim: int = 1024,
        use_pos_embedding: bool = False,
        image_size: int = 224,
        **kwargs: Any,
    ) -> None:
        legacy = _rename_legacy_keys(kwargs, self.attribute_map)
        depths = legacy.get("depths", depths)
        embedding_size = legacy.get("embedding_size", embedding_size)
        num_attention_heads = legacy.get("num_attention_heads", num_attention_heads)
        projection_dim = legacy.get("projection_dim", projection_dim)
        image_size = legacy.get("image_size", image_size)
        super().__init__(**kwargs)
        if len(depths) != 4:
            raise ValueError(f"`depths` must list the blocks of 4 stages, got {list(depths)}")
        if (embedding_size * 32) % num_attention_heads != 0:
            raise ValueError(
                f"the pooled width {embedding_size * 32} is not divisible by num_attention_heads={num_attention_heads}"
            )
        self.depths = list(depths)
        self.embedding_size = embedding_size
        self.num_attention_heads = num_attention_heads
        self.projection_dim = projection_dim
        self.use_pos_embedding = use_pos_embedding
        self.image_size = image_size


class QualiCLIPTextConfig(PreTrainedConfig):
    r"""
    Configuration of the (frozen) text tower: OpenAI CLIP's causal text transformer. The defaults are CLIP RN50's.
    The names are transformers' (`CLIPTextConfig`); OpenAI's names (in brackets) are accepted when loading and as
    attribute aliases.

    Args:
        max_position_embeddings (`int`, defaults to 77): Maximum number of tokens of a prompt (`context_length`).
        vocab_size (`int`, defaults to 49408): Size of CLIP's byte-level BPE vocabulary.
        hidden_size (`int`, defaults to 512): Width of the transformer (`width`).
        num_attention_heads (`int`, defaults to 8): Attention heads (`heads`).
        num_hidden_layers (`int`, defaults to 12): Transformer blocks (`layers`).
        projection_dim (`int`, defaults to 1024):
            Dimension of the text embedding, shared with the image embedding (`output_dim`).
    """

    model_type = "qualiclip_text_model"
    base_config_key = "text_config"
    attribute_map = {
        "context_length": "max_position_embeddings",
        "width": "hidden_size",
        "heads": "num_attention_heads",
        "layers": "num_hidden_layers",
        "output_dim": "projection_dim",
    }

    def __init__(
        self,
        max_position_embeddings: int = 77,
        vocab_size: int = 49408,
        hidden_size: int = 512,
        num_attention_heads: int = 8,
        num_hidden_layers: int = 12,
        projection_dim: int = 1024,
        **kwargs: Any,
    ) -> None:
        legacy = _rename_legacy_keys(kwargs, self.attribute_map)
        max_position_embeddings = legacy.get("max_position_embeddings", max_position_embeddings)
        hidden_size = legacy.get("hidden_size", hidden_size)
        num_attention_heads = legacy.get("num_attention_heads", num_attention_heads)
        num_hidden_layers = legacy.get("num_hidden_layers", num_hidden_layers)
        projection_dim = legacy.get("projection_dim", projection_dim)
        super().__init__(**kwargs)
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"text hidden_size {hidden_size} is not divisible by num_attention_heads={num_attention_heads}"
            )
        self.max_position_embeddings = max_position_embeddings
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_hidden_layers = num_hidden_layers
        self.projection_dim = projection_dim


class QualiCLIPConfig(PreTrainedConfig):
    r"""
    Configuration of [`QualiCLIPModel`].

    Args:
        vision_config (`dict` or [`QualiCLIPVisionConfig`], *optional*): The image tower; defaults to CLIP RN50.
        text_config (`dict` or [`QualiCLIPTextConfig`], *optional*): The text tower; defaults to CLIP RN50's.
        prompt_pairs (`list[list[str]]`, *optional*):
            The antonym prompts as `(positive, negative)` pairs; defaults to QualiCLIP's seven pairs.
        logit_scale (`float`, defaults to 100.0):
            Multiplier of the cosine similarities before the softmax of each pair. The official QualiCLIP uses
            CLIP's value of 100.
        clip_logit_scale (`float`, *optional*):
            `exp(logit_scale)` of the CLIP checkpoint the weights were converted from. Not used by the official
            score; kept so that formulas that use CLIP's learned scale (pyiqa's) can be reproduced exactly.
        prompt_context_length (`int`, *optional*):
            QualiCLIP+ only: the number of learned context token embeddings of each prompt (16 in pyiqa's
            QualiCLIP+), placed half before and half after the prompt's words (CoOp-style prompt learning). `None`,
            QualiCLIP, uses the prompts as written.
        source_checkpoint_sha256 (`str`, *optional*):
            SHA-256 of the checkpoint file the weights were converted from, for provenance.
        quality_head (`str`, defaults to `"prompts"`):
            How the score is read from the image embedding. `"prompts"`: QualiCLIP's, the mean over prompt pairs of
            the softmax probability of the positive prompt. `"linear"`: a linear map of the embedding (the `ridge`
            method of `training/finetune.py`), fitted to opinion scores rescaled to [0, 1].
        fine_tuning (`dict`, *optional*):
            A model fine-tuned on opinion scores (`training/finetune.py`): its method, data and MOS scale, for
            provenance. Its prompts or linear head were fitted at `logit_scale`.

    Example:

    ```python
    >>> from qualiclip_hf import QualiCLIPConfig, QualiCLIPModel
    >>> config = QualiCLIPConfig()  # CLIP RN50 sizes, the 7 official prompt pairs
    >>> model = QualiCLIPModel(config)  # random weights
    ```
    """

    model_type = "qualiclip"
    sub_configs = {"vision_config": QualiCLIPVisionConfig, "text_config": QualiCLIPTextConfig}

    def __init__(
        self,
        vision_config: dict[str, Any] | QualiCLIPVisionConfig | None = None,
        text_config: dict[str, Any] | QualiCLIPTextConfig | None = None,
        prompt_pairs: list[list[str]] | tuple[tuple[str, str], ...] | None = None,
        logit_scale: float = 100.0,
        clip_logit_scale: float | None = None,
        prompt_context_length: int | None = None,
        source_checkpoint_sha256: str | None = None,
        quality_head: str = "prompts",
        fine_tuning: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if vision_config is None:
            vision_config = QualiCLIPVisionConfig()
        elif isinstance(vision_config, dict):
            vision_config = QualiCLIPVisionConfig(**vision_config)
        if text_config is None:
            text_config = QualiCLIPTextConfig(projection_dim=vision_config.projection_dim)
        elif isinstance(text_config, dict):
            text_config = QualiCLIPTextConfig(**text_config)
        if text_config.projection_dim != vision_config.projection_dim:
            raise ValueError(
                f"the towers must share an embedding size: vision projection_dim={vision_config.projection_dim}, "
                f"text projection_dim={text_config.projection_dim}"
            )
        self.prompt_pairs = validate_prompt_pairs(QUALICLIP_PROMPT_PAIRS if prompt_pairs is None else prompt_pairs)
        self.vision_config = vision_config
        self.text_config = text_config
        self.logit_scale = float(logit_scale)
        self.clip_logit_scale = None if clip_logit_scale is None else float(clip_logit_scale)
        if prompt_context_length is not None and prompt_context_length < 1:
            raise ValueError(f"prompt_context_length must be positive or None, got {prompt_context_length}")
        self.prompt_context_length = prompt_context_length
        self.source_checkpoint_sha256 = source_checkpoint_sha256
        if quality_head not in QUALITY_HEADS:
            raise ValueError(f"quality_head must be one of {', '.join(QUALITY_HEADS)}, got {quality_head!r}")
        self.quality_head = quality_head
        self.fine_tuning = fine_tuning
        super().__init__(**kwargs)
        if getattr(self, "custom_pipelines", None):
            self.custom_pipelines = DeclaredPipelines(self.custom_pipelines)

    @property
    def num_prompt_pairs(self) -> int:
        return len(self.prompt_pairs)

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        """
        Saves `config.json`. With the class registered for the Auto classes (importing `qualiclip_hf` does it), the
        folder also gets this file and the files it imports relatively, the `image-quality-assessment` pipeline
        among them, and `config.json` declares that pipeline in `custom_pipelines`, so that
        `pipeline(model=folder, trust_remote_code=True)` finds it without being told the task.
        """
        if self._auto_class is not None:
            from .pipeline_qualiclip import IMAGE_QUALITY_TASK, ImageQualityAssessmentPipeline

            module = ImageQualityAssessmentPipeline.__module__.rsplit(".", 1)[-1]
            self.custom_pipelines = {
                IMAGE_QUALITY_TASK: {
                    "impl": f"{module}.{ImageQualityAssessmentPipeline.__name__}",
                    "pt": ["AutoModel"],
                    "type": "image",
                }
            }
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)


class DeclaredPipelines(dict):
    """
    The `custom_pipelines` a saved folder declares (`{task: {"impl": ..., "pt": [...], "type": ...}}`), as the config
    holds them once loaded.

    transformers' `pipeline()` reads this mapping twice: its keys, to infer the task of `pipeline(model=folder)`, and
    `task in custom_pipelines`, to decide that the task needs the folder's own code, which it refuses to run without
    `trust_remote_code=True`, even where the same pipeline is installed and registered (importing `qualiclip_hf`
    registers it, as it registers the model with `AutoModel`). For a task served by an installed pipeline, the
    membership test is therefore `False`: the task is still inferred from the folder, and transformers builds the
    installed pipeline, as `AutoModel` uses the installed model class. Where the package is not installed (a Hub
    folder loaded with `trust_remote_code=True`), no task is registered and the folder's code is used as before.
    """

    def __contains__(self, task: object) -> bool:
        return super().__contains__(task) and not _is_installed_pipeline_task(task)


def _is_installed_pipeline_task(task: object) -> bool:
    """Whether transformers' pipeline registry holds `task`, registered by this package (`register_auto_classes`)."""
    if not isinstance(task, str) or "transformers.pipelines" not in sys.modules:
        return False  # the registration imports transformers.pipelines: no module, no registered task
    from transformers.pipelines import PIPELINE_REGISTRY

    entry = PIPELINE_REGISTRY.supported_tasks.get(task)
    return entry is not None and entry["impl"].__module__.split(".")[0] == __name__.split(".")[0]


def validate_prompt_pairs(pairs: Any) -> list[list[str]]:
    """Checks that `pairs` is a non-empty sequence of (positive, negative) prompts; returns them as lists."""
    checked = []
    for pair in pairs:
        if isinstance(pair, str) or len(pair) != 2 or not all(isinstance(t, str) and t.strip() for t in pair):
            raise ValueError(f"a prompt pair is (positive, negative), two non-empty strings; got {pair!r}")
        checked.append([pair[0], pair[1]])
    if not checked:
        raise ValueError("at least one prompt pair is needed")
    return checked


__all__ = [
    "QUALICLIP_PROMPT_PAIRS",
    "QUALITY_HEADS",
    "QualiCLIPConfig",
    "QualiCLIPTextConfig",
    "QualiCLIPVisionConfig",
    "validate_prompt_pairs",
]
