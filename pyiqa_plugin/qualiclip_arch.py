"""QualiCLIP and QualiCLIP+ from `qualiclip_hf` as a pyiqa arch.

pyiqa hands an arch `(batch_size, 3, height, width)` RGB tensors in [0, 1] (already checked by its
`InferenceModel`) and expects one score per image, `(batch_size, 1)`. This arch applies the image processor's
per-image rules to them (`QualiCLIPImageProcessor.prepare_pixels`: minimum size, the one resize, CLIP's
normalisation), so a tensor scores exactly as through the processor, and runs `QualiCLIPModel` at full resolution
unless `max_size` is given, as pyiqa's built-in QualiCLIP does.

Files and PIL images: `pyiqa.create_metric(...)(path)` (or `(pil_image)`) reads them with pyiqa's own reader
(`pyiqa.utils.imread2tensor`: PIL, converted to RGB), not `qualiclip_hf`'s image reader, so pyiqa's conventions hold
there: no colour management, transparency dropped, 16-bit files as Pillow converts them. For `qualiclip_hf`'s reading
rules, read the file with `qualiclip_hf.image_reader.open_image` (a PIL image with `to_viewable_rgb`) and pass the
tensor.
"""

from __future__ import annotations

from typing import Any

import torch
from pyiqa.utils import get_root_logger
from torch import nn

from qualiclip_hf import QualiCLIPImageProcessor, QualiCLIPModel
from qualiclip_hf.loading import official_plus_model_dir, resolve_pretrained

# pyiqa's QualiCLIP metrics, each with the dataset its QualiCLIP+ context was learned on (None: plain QualiCLIP).
MODEL_TYPES: dict[str, str | None] = {
    "qualiclip": None,
    "qualiclip+": "koniq",
    "qualiclip+-clive": "clive",
    "qualiclip+-flive": "flive",
    "qualiclip+-spaq": "spaq",
}
# pyiqa's built-in arch softmaxes `exp(logits / temperature)` with temperature 2 over logits that carry CLIP's learned
# scale; dividing that scale by 2 gives the same numbers.
PYIQA_TEMPERATURE = 2.0


class QualiCLIPHF(nn.Module):
    """
    QualiCLIP (Agnolucci et al., arXiv:2403.11176) through `qualiclip_hf.QualiCLIPModel`, as a pyiqa arch.

    Args:
        model_type: The pyiqa metric whose weights `pretrained_model_name_or_path="official"` means: `"qualiclip"`,
            or QualiCLIP+ learned on KonIQ (`"qualiclip+"`), CLIVE, FLIVE or SPAQ (`"qualiclip+-clive"`, ...).
        pretrained_model_name_or_path: `"official"` (the default): the authors' weights for `model_type` (plus
            pyiqa's QualiCLIP+ context), downloaded from the Hub and converted once; `"demo"`: the demo model
            embedded in `qualiclip_hf`; otherwise a converted folder or a Hub repository id.
        max_size: Longest side, in pixels, above which an image is downscaled (aspect ratio kept, antialiased
            bicubic) before scoring. `None` (the default) scores every image at its full resolution.
        logit_scale: The multiplier of the cosine similarities before each pair's softmax. `"pyiqa"` (the default):
            CLIP's learned scale halved (`config.clip_logit_scale / 2`, 50 for the released weights), which is what
            pyiqa's built-in QualiCLIP computes, so scores stay comparable with earlier pyiqa results; for a model
            fine-tuned on opinion scores (`training/finetune.py`, `config.fine_tuning`), the scale it was fitted at.
            `"official"`: `config.logit_scale` (100), the formula of the QualiCLIP paper and code. Or a number.
        pretrained: Accepted because pyiqa's configuration of the built-in QualiCLIP+ passes it; must be `True`.
    """

    def __init__(
        self,
        model_type: str = "qualiclip",
        pretrained_model_name_or_path: str = "official",
        max_size: int | None = None,
        logit_scale: str | float = "pyiqa",
        pretrained: bool = True,
        **unsupported: Any,
    ) -> None:
        super().__init__()
        if unsupported:
            raise TypeError(
                f"QualiCLIPHF does not take {', '.join(map(repr, unsupported))}; its options are "
                "pretrained_model_name_or_path, max_size and logit_scale. pyiqa's built-in QualiCLIP, with its own "
                "options, is the metric 'qualiclip-pyiqa' (or 'qualiclip+-pyiqa', ...; in a fresh process, "
                "`import pyiqa_plugin` first)"
            )
        if model_type not in MODEL_TYPES:
            raise ValueError(f"unknown model_type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
        if not pretrained:
            raise ValueError("QualiCLIPHF always loads weights; choose them with pretrained_model_name_or_path")

        source = self._weights_location(model_type, pretrained_model_name_or_path)
        self.image_processor = QualiCLIPImageProcessor.from_pretrained(source)
        self.image_processor.check_max_size(max_size)
        self.model = QualiCLIPModel.from_pretrained(source).eval()
        # A metric, also when used as a loss: gradients flow to the images, never into the weights.
        self.model.requires_grad_(False)
        self.max_size = max_size
        # The score formula is part of the loaded model's configuration, so `forward` runs the model as configured.
        self.model.config.logit_scale = self._resolve_logit_scale(logit_scale)
        get_root_logger().info(
            "QualiCLIPHF: %s weights from %s, logit scale %.4g",
            model_type,
            pretrained_model_name_or_path,
            self.model.config.logit_scale,
        )

    @staticmethod
    def _weights_location(model_type: str, name: str) -> str:
        dataset = MODEL_TYPES[model_type]
        if name == "official" and dataset is not None:
            return str(official_plus_model_dir(dataset))
        return resolve_pretrained(name)

    @property
    def logit_scale(self) -> float:
        """The multiplier of the cosine similarities, as set on the model's configuration."""
        return self.model.config.logit_scale

    def _resolve_logit_scale(self, logit_scale: str | float) -> float:
        config = self.model.config
        if logit_scale == "pyiqa":
            if getattr(config, "fine_tuning", None) is not None:
                # Fine-tuned on opinion scores here (training/finetune.py): its prompts were fitted at this scale.
                return config.logit_scale
            if config.clip_logit_scale is None:
                # A model not converted from a CLIP checkpoint: halve its own scale, as pyiqa halves CLIP's.
                get_root_logger().warning(
                    "this model records no CLIP logit scale; the 'pyiqa' formula uses logit_scale / %g = %g",
                    PYIQA_TEMPERATURE,
                    config.logit_scale / PYIQA_TEMPERATURE,
                )
                return config.logit_scale / PYIQA_TEMPERATURE
            return config.clip_logit_scale / PYIQA_TEMPERATURE
        if logit_scale == "official":
            return config.logit_scale
        if isinstance(logit_scale, (int, float)) and not isinstance(logit_scale, bool) and logit_scale > 0:
            return float(logit_scale)
        raise ValueError(f"logit_scale must be 'pyiqa', 'official' or a positive number, got {logit_scale!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (`torch.Tensor` of shape `(batch_size, 3 or 1, height, width)`): RGB (or grey) images in [0, 1], at
                least 32x32 pixels (after `max_size`).

        Returns:
            `torch.Tensor` of shape `(batch_size, 1)`: quality in [0, 1], higher is better.
        """
        _check_images(x)
        if x.shape[1] == 1:  # pyiqa accepts grey images; CLIP sees them as RGB with equal channels
            x = x.expand(-1, 3, -1, -1)
        pixel_values = self.image_processor.prepare_pixels(x.float(), self.max_size)
        return self.model(pixel_values).quality_score[:, None]


def _check_images(x: Any) -> None:
    # pyiqa's `create_metric` checks the shape and (unless `check_input_range=False` or `as_loss=True`) the [0, 1]
    # range; the arch can also be called directly, and neither check catches an integer image or NaN.
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"QualiCLIPHF takes a torch.Tensor of images, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"QualiCLIPHF takes (batch_size, 3 or 1, height, width) images, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"QualiCLIPHF takes floating-point images in [0, 1], got {x.dtype}; divide 8-bit ones by 255")
    if x.numel() and not torch.isfinite(x).all():
        raise ValueError("QualiCLIPHF got images with NaN or infinite values")
