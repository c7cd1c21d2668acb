"""QualiCLIP, the opinion-unaware no-reference image quality model, as a transformers model.

Importing the package registers `QualiCLIPConfig`, `QualiCLIPModel`, `QualiCLIPImageProcessor` and
`QualiCLIPProcessor` with transformers' Auto classes, so `AutoModel.from_pretrained(folder)` works without
`trust_remote_code`, and the `image-quality-assessment` task with transformers' pipeline registry.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_qualiclip import (
    QUALICLIP_PROMPT_PAIRS,
    QualiCLIPConfig,
    QualiCLIPTextConfig,
    QualiCLIPVisionConfig,
)
from .dataset_scoring import QualityScorer
from .image_processing_qualiclip import QualiCLIPImageProcessor
from .modeling_qualiclip import QualiCLIPModel, QualiCLIPOutput, QualiCLIPPreTrainedModel
from .pipeline_qualiclip import IMAGE_QUALITY_TASK, ImageQualityAssessmentPipeline
from .processing_qualiclip import QualiCLIPProcessor

__version__ = "0.1.0"

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

__all__ = [
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
]
