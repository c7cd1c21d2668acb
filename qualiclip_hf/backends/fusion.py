"""The fp32 speed layer of bulk scoring, as an explicit step that makes a scorer (as timm's `reparameterize`).

`fuse_for_inference(model)` returns a [`FusedQualiCLIP`]: a scorer that `qualiclip_hf.scoring.score_images` calls as
it calls the model, and whose scores equal the model's up to float rounding. The model is left as it was: the model
file keeps only the math. Two things make it faster:

- **BatchNorm folding.** Each convolution of the image tower and the BatchNorm after it become one convolution
  (`torch.nn.utils.fusion.fuse_conv_bn_weights`), which spares a full pass over the activations at every layer:
  about a tenth of the image tower's time on a CPU (`python -m benchmarks.fusion_throughput`).
- **CPU chunking.** A batch on a CPU runs through the model in chunks of at most `CPU_CHUNK_PIXELS` pixels, so that
  the activations stay in the caches.

A fused scorer is for inference only: its BatchNorm layers are gone, so it refuses `train()` and has nothing to save
(train or save the model as loaded).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ..modeling_qualiclip import QualiCLIPModel, QualiCLIPOutput

# One 512x384 photo, or three 224x224 crops. With RN50 on the project's 2-core CPU this gave 1.21x the images/s of a
# whole batch of 8 at 512x384, 1.11x at 1024x768 and 1.07x for 224x224 crops, with the same scores.
CPU_CHUNK_PIXELS = 512 * 384

__all__ = ["CPU_CHUNK_PIXELS", "FusedQualiCLIP", "fold_batch_norms", "fuse_conv_batch_norm", "fuse_for_inference"]


class FusedQualiCLIP(nn.Module):
    """
    A scorer for inference: a copy of a [`QualiCLIPModel`] with every BatchNorm of its image tower folded into its
    convolution ([`fold_batch_norms`]), whose CPU batches run in chunks of at most `cpu_chunk_pixels` pixels.

    It takes the model's inputs (`pixel_values` `(batch_size, 3, height, width)`, `image_sizes`, ...) and returns its
    [`QualiCLIPOutput`]; scores equal the model's within float rounding (about 1e-6).

    Args:
        model: A loaded model; it is copied, never changed.
        cpu_chunk_pixels: The largest number of (padded) pixels per chunk of a CPU batch; `None` keeps batches whole.
    """

    def __init__(self, model: QualiCLIPModel, cpu_chunk_pixels: int | None = CPU_CHUNK_PIXELS) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).eval()
        fold_batch_norms(self.model.vision_model)
        self.cpu_chunk_pixels = cpu_chunk_pixels
        super().train(False)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def prompt_embeds(self) -> torch.Tensor:
        return self.model.prompt_embeds

    def train(self, mode: bool = True) -> FusedQualiCLIP:
        if mode:
            raise RuntimeError(
                "a model fused for inference (qualiclip_hf.backends.fusion.fuse_for_inference) has no BatchNorm "
                "layers left and cannot train; train the model as loaded"
            )
        return super().train(False)

    def forward(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None, **kwargs: Any
    ) -> QualiCLIPOutput:
        batch_size, _, height, width = pixel_values.shape
        chunk = batch_size
        if self.cpu_chunk_pixels is not None and pixel_values.device.type == "cpu":
            chunk = max(1, self.cpu_chunk_pixels // (height * width))
        if chunk >= batch_size:
            return self.model(pixel_values, image_sizes, **kwargs)
        outputs = [
            self.model(
                pixel_values[start : start + chunk],
                None if image_sizes is None else image_sizes[start : start + chunk],
                **{**kwargs, "return_dict": True},
            )
            for start in range(0, batch_size, chunk)
        ]
        merged = QualiCLIPOutput(
            quality_score=torch.cat([output.quality_score for output in outputs]),
            logits_per_prompt=torch.cat([output.logits_per_prompt for output in outputs]),
            image_embeds=torch.cat([output.image_embeds for output in outputs]),
            hidden_states=None
            if outputs[0].hidden_states is None
            else tuple(torch.cat(level) for level in zip(*(output.hidden_states for output in outputs), strict=True)),
        )
        return merged if kwargs.get("return_dict", True) is not False else merged.to_tuple()


def fuse_for_inference(model: QualiCLIPModel, cpu_chunk_pixels: int | None = CPU_CHUNK_PIXELS) -> FusedQualiCLIP:
    """
    The fp32 speed layer of bulk scoring (`qualiclip score` applies it through `prepare_scorer(..., fuse=True)`).

    Args:
        model: A loaded model; left as it was.
        cpu_chunk_pixels: The largest number of pixels per chunk of a CPU batch; `None` keeps batches whole.

    Returns:
        A [`FusedQualiCLIP`] scorer.
    """
    return FusedQualiCLIP(model, cpu_chunk_pixels)


def fold_batch_norms(vision_model: nn.Module) -> nn.Module:
    """
    Folds every BatchNorm of an image tower (eval mode) into the convolution before it, in place, and puts an
    identity in its place; the output equals the original's up to float rounding (about 1e-6 relative).

    Returns:
        `vision_model`.
    """
    for parent in list(vision_model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                # The pairs are named (convN, bnN) in CLIP's ResNet, and (conv, bn) in its downsample branch.
                conv_name = name.replace("bn", "conv")
                setattr(parent, conv_name, fuse_conv_batch_norm(getattr(parent, conv_name), child))
                setattr(parent, name, nn.Identity())
    return vision_model


def fuse_conv_batch_norm(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> nn.Conv2d:
    """
    One convolution computing `norm(conv(x))` with `norm` in eval mode (its running statistics).

    The fold is computed in at least float32, so that it adds no rounding of its own to half-precision weights, and
    the weight is stored channels-last, the layout of the image tower's activations, which spares a reordering at
    every call.
    """
    compute = torch.promote_types(conv.weight.dtype, torch.float32)

    def upcast(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.detach().to(compute)

    weight, bias = fuse_conv_bn_weights(
        upcast(conv.weight),
        upcast(conv.bias),
        upcast(norm.running_mean),
        upcast(norm.running_var),
        norm.eps,
        upcast(norm.weight),
        upcast(norm.bias),
    )
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        fused.weight = nn.Parameter(
            weight.to(conv.weight.dtype).contiguous(memory_format=torch.channels_last),
            requires_grad=conv.weight.requires_grad,
        )
        fused.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    return fused.train(False)
