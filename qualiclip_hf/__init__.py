"""QualiCLIP, the opinion-unaware no-reference image quality model, as a transformers model.

Importing the package registers `QualiCLIPConfig`, `QualiCLIPModel`, `QualiCLIPImageProcessor` and
`QualiCLIPProcessor` with transformers' Auto classes, so `AutoModel.from_pretrained(folder)` works without
`trust_remote_code`, and the `image-quality-assessment` task with transformers' pipeline registry.

The public names are imported on first use (PEP 562), as transformers' own packages do. The one exception to the
registration at import is the `qualiclip` command: it registers after parsing its arguments, so that `qualiclip
--help` and `--version` answer without importing torch and transformers.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "QUALICLIP_PROMPT_PAIRS": "configuration_qualiclip",
    "QualiCLIPConfig": "configuration_qualiclip",
    "QualiCLIPTextConfig": "configuration_qualiclip",
    "QualiCLIPVisionConfig": "configuration_qualiclip",
    "QualiCLIPImageProcessor": "image_processing_qualiclip",
    "QualiCLIPModel": "modeling_qualiclip",
    "QualiCLIPOutput": "modeling_qualiclip",
    "QualiCLIPPreTrainedModel": "modeling_qualiclip",
    "IMAGE_QUALITY_TASK": "pipeline_qualiclip",
    "ImageQualityAssessmentPipeline": "pipeline_qualiclip",
    "QualiCLIPProcessor": "processing_qualiclip",
    "DEMO_MODEL_PATH": "loading",
    "load_model_and_processor": "loading",
    "QualityScorer": "scoring.dataset",
    "score_images": "scoring.core",
}

if TYPE_CHECKING:
    from .configuration_qualiclip import (
        QUALICLIP_PROMPT_PAIRS,
        QualiCLIPConfig,
        QualiCLIPTextConfig,
        QualiCLIPVisionConfig,
    )
    from .image_processing_qualiclip import QualiCLIPImageProcessor
    from .loading import DEMO_MODEL_PATH, load_model_and_processor
    from .modeling_qualiclip import QualiCLIPModel, QualiCLIPOutput, QualiCLIPPreTrainedModel
    from .pipeline_qualiclip import IMAGE_QUALITY_TASK, ImageQualityAssessmentPipeline
    from .processing_qualiclip import QualiCLIPProcessor
    from .scoring.core import score_images
    from .scoring.dataset import QualityScorer


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


_registered = False


def register_auto_classes() -> None:
    """
    Registers the QualiCLIP classes with transformers' Auto classes and the `image-quality-assessment` task with its
    pipeline registry. Runs when the package is imported; the `qualiclip` command calls it itself. Idempotent.
    """
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor
    from transformers.pipelines import PIPELINE_REGISTRY

    from .configuration_qualiclip import QualiCLIPConfig
    from .image_processing_qualiclip import QualiCLIPImageProcessor
    from .modeling_qualiclip import QualiCLIPModel
    from .pipeline_qualiclip import IMAGE_QUALITY_TASK, ImageQualityAssessmentPipeline
    from .processing_qualiclip import QualiCLIPProcessor

    AutoConfig.register(QualiCLIPConfig.model_type, QualiCLIPConfig, exist_ok=True)
    AutoModel.register(QualiCLIPConfig, QualiCLIPModel, exist_ok=True)
    AutoImageProcessor.register(
        QualiCLIPConfig, image_processor_classes={"torchvision": QualiCLIPImageProcessor}, exist_ok=True
    )
    AutoProcessor.register(QualiCLIPConfig, QualiCLIPProcessor, exist_ok=True)

    # Saved folders carry these files and an `auto_map`, so they load with `trust_remote_code=True` where this
    # package is not installed (the Hub).
    QualiCLIPConfig.register_for_auto_class()
    QualiCLIPModel.register_for_auto_class("AutoModel")
    QualiCLIPImageProcessor.register_for_auto_class("AutoImageProcessor")
    QualiCLIPProcessor.register_for_auto_class("AutoProcessor")

    # `pipeline("image-quality-assessment", model=...)`. Saved folders also declare the task in config.json
    # (`custom_pipelines`, see `QualiCLIPConfig.save_pretrained`), which is what `pipeline(model=REPO,
    # trust_remote_code=True)` reads where this package is not installed.
    PIPELINE_REGISTRY.register_pipeline(
        IMAGE_QUALITY_TASK, pipeline_class=ImageQualityAssessmentPipeline, pt_model=AutoModel, type="image"
    )
    _registered = True


# The console script `qualiclip` (whose process is named after it) defers the registration until its arguments are
# parsed; everyone else gets the classes registered by `import qualiclip_hf`.
if Path(getattr(sys, "argv", [""])[0] or "").stem != "qualiclip":
    register_auto_classes()

__all__ = [
    "DEMO_MODEL_PATH",
    "IMAGE_QUALITY_TASK",
    "QUALICLIP_PROMPT_PAIRS",
    "ImageQualityAssessmentPipeline",
    "QualiCLIPConfig",
    "QualiCLIPImageProcessor",
    "QualiCLIPModel",
    "QualiCLIPOutput",
    "QualiCLIPPreTrainedModel",
    "QualiCLIPProcessor",
    "QualiCLIPTextConfig",
    "QualiCLIPVisionConfig",
    "QualityScorer",
    "load_model_and_processor",
    "register_auto_classes",
    "score_images",
]
