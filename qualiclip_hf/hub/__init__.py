"""Publishing on the Hugging Face Hub: the model card (`card.py`, from `model_card_template.md`) and the push of a
model folder in one commit (`push.py`). The `qualiclip card` and `qualiclip push` commands call these functions."""

from .card import WEIGHT_KINDS, ModelCardError, make_model_card, read_results, write_model_card
from .push import PushError, StagedFile, push_model_folder, stage_model_folder

__all__ = [
    "WEIGHT_KINDS",
    "ModelCardError",
    "PushError",
    "StagedFile",
    "make_model_card",
    "push_model_folder",
    "read_results",
    "stage_model_folder",
    "write_model_card",
]
