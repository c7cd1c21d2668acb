"""Grad-CAM quality maps: which regions of an image lower its QualiCLIP score.

The paper illustrates QualiCLIP with Grad-CAM maps on the image tower computed toward the quality score. Here the
map is computed at the output of the image tower's last residual stage (`vision_model.layer4`, stride 32), for the
target `-quality_score`:

    weights[c] = mean over (i, j) of  d(-score) / d activation[c, i, j]
    map[i, j]  = ReLU(sum over c of weights[c] * activation[c, i, j])

so the map is high where the features that pull the score *down* are strong ("what lowers quality") and zero where
nothing does. It is upsampled (bilinear) to the input resolution and divided by its maximum, so it lies in [0, 1];
an image where no region lowers the score gets an all-zero map.

The activations are captured with a forward hook and their gradient is taken with `torch.autograd.grad`, so the
model is not modified: no parameter receives a `.grad`, `requires_grad` flags and the train/eval mode are left as
they were.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .image_processing_qualiclip import limit_longest_side
from .image_reader import to_viewable_rgb

__all__ = ["QualityExplanation", "colorize_heatmap", "explain_image", "grad_cam", "overlay_heatmap"]


@dataclass
class QualityExplanation:
    """
    Grad-CAM of one image.

    Args:
        score (`float`): the quality score in [0, 1], higher is better (the same as `QualiCLIPModel` gives).
        heatmap (`np.ndarray` of shape `(height, width)`, float32): in [0, 1], high where the image loses quality;
            at the resolution of `image`.
        image (`PIL.Image.Image`): the RGB image the model saw (EXIF orientation applied, downscaled when
            `max_size` asked for it).
    """

    score: float
    heatmap: np.ndarray
    image: Image.Image


def grad_cam(
    model: nn.Module,
    pixel_values: torch.Tensor,
    target_layer: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Grad-CAM toward a lower quality score for a batch of images of one size (no padding).

    Args:
        model ([`QualiCLIPModel`]): any mode; it is run in eval mode and left in the mode it was in.
        pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): processor output.
        target_layer (`nn.Module`, *optional*): the module whose output is explained; it must output a
            `(batch_size, channels, h, w)` feature map. Defaults to the last residual stage of the image tower.

    Returns:
        `(heatmaps, scores)`: `heatmaps` of shape `(batch_size, height, width)` in [0, 1], float32, on the CPU;
        `scores` of shape `(batch_size,)`, the model's quality scores.
    """
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values must be (batch_size, 3, height, width), got shape {tuple(pixel_values.shape)}")
    if target_layer is None:
        target_layer = model.vision_model.layer4
    captured: list[torch.Tensor] = []
    caller = threading.get_ident()

    def capture(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        # Hooks run in the thread of the forward pass: another thread using the same model (a web app serving two
        # requests) must not add its activations to this call's.
        if threading.get_ident() == caller:
            captured.append(output)

    handle = target_layer.register_forward_hook(capture)
    was_training = model.training
    model.eval()
    try:
        # The caller may be under `no_grad` or `inference_mode`; the backward pass needs neither. The graph is
        # rooted at a copy of the input that requires grad, so it exists even when every parameter is frozen.
        with torch.inference_mode(False), torch.enable_grad():
            pixel_values = pixel_values.to(model.device).clone().requires_grad_(True)
            output = model(pixel_values=pixel_values, return_dict=True)
            if len(captured) != 1:
                raise RuntimeError(f"the target layer ran {len(captured)} times in one forward pass, expected once")
            activations = captured[0]
            if activations.ndim != 4:
                raise ValueError(
                    f"the target layer must output a 4-d feature map, got shape {tuple(activations.shape)}"
                )
            # The score recomputed in float64 from the logits: softmax at a logit scale of 100 saturates in float32,
            # and a saturated score would have an exactly zero gradient (a blank map) for clearly bad images.
            score = output.logits_per_prompt.double().softmax(dim=-1)[..., 0].mean(dim=-1)
            (gradients,) = torch.autograd.grad(-score.sum(), activations)
    finally:
        handle.remove()
        model.train(was_training)

    weights = gradients.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    cam = F.relu((weights * activations.detach().to(weights.dtype)).sum(dim=1, keepdim=True))  # (B, 1, h, w)
    cam = F.interpolate(cam, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(dim=1).clamp_min(torch.finfo(cam.dtype).tiny)
    heatmaps = (cam / peak[:, None, None]).clamp(0.0, 1.0)
    return heatmaps.float().cpu(), output.quality_score.detach().float().cpu()


def explain_image(
    image: Image.Image | np.ndarray | torch.Tensor,
    model: nn.Module,
    processor,
    max_size: int | None = None,
    target_layer: nn.Module | None = None,
) -> QualityExplanation:
    """
    Scores one image and computes its Grad-CAM map (see [`grad_cam`]).

    Args:
        image: a PIL image (any mode; EXIF orientation is applied), an array PIL can read (`(H, W, 3)` uint8, ...)
            or a `(3, H, W)` uint8 tensor (what `qualiclip_hf.scoring.read_image` returns).
        model ([`QualiCLIPModel`]), processor ([`QualiCLIPProcessor`] or [`QualiCLIPImageProcessor`]).
        max_size (`int`, *optional*): downscale first when the longest side exceeds it, as the processor does.

    Raises:
        ValueError: when the image is below the model's minimum size.
    """
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise ValueError(f"expected a (3, height, width) uint8 tensor, got {image.dtype} {tuple(image.shape)}")
        pixels = image.cpu()
    else:
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        pixels = torch.from_numpy(np.array(to_viewable_rgb(image))).permute(2, 0, 1)
    # The processor downscales (the one resize of every entry point, in floating point), so the score is the one
    # every other way in gives; the returned image is that downscaled picture rounded to 8 bits for display.
    pixel_values = processor(images=[pixels], return_tensors="pt", max_size=max_size)["pixel_values"]
    if max_size is not None:
        pixels = limit_longest_side(pixels[None].float() / 255, max_size)[0].mul_(255).round_().to(torch.uint8)
    heatmaps, scores = grad_cam(model, pixel_values, target_layer)
    image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    return QualityExplanation(score=float(scores[0]), heatmap=heatmaps[0].numpy(), image=image)


# Anchor colours of the colour map, dark (0) to bright (1): black, indigo, crimson, orange, pale yellow. Perceptually
# ordered by lightness, so the map reads the same in greyscale.
_COLORMAP_ANCHORS = np.array(
    [[0, 0, 4], [80, 18, 123], [190, 40, 84], [248, 139, 34], [252, 253, 191]],
    dtype=np.float32,
)


def colorize_heatmap(heatmap: np.ndarray) -> Image.Image:
    """
    Maps a `(height, width)` heat map in [0, 1] to an RGB image: black (0), through purple and red, to pale yellow
    (1). Values outside [0, 1] are clipped; non-finite values are shown as 0.
    """
    heatmap = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be 2-d (height, width), got shape {heatmap.shape}")
    positions = np.linspace(0.0, 1.0, len(_COLORMAP_ANCHORS))
    values = np.clip(heatmap, 0.0, 1.0).ravel()
    rgb = np.stack([np.interp(values, positions, _COLORMAP_ANCHORS[:, c]) for c in range(3)], axis=-1)
    return Image.fromarray(np.rint(rgb).astype(np.uint8).reshape(*heatmap.shape, 3))


def overlay_heatmap(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """
    Blends the coloured heat map with a greyscale copy of the image: `(1 - alpha) * grey + alpha * colour(h)`. The
    image is shown in grey so that its own colours are not mistaken for the map's. The heat map is resized
    (bilinear) to the image's size when they differ.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    grey = to_viewable_rgb(image).convert("L").convert("RGB")
    heat = Image.fromarray(np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0))
    if heat.size != grey.size:
        heat = heat.resize(grey.size, Image.BILINEAR)
    return Image.blend(grey, colorize_heatmap(np.asarray(heat)), alpha)
