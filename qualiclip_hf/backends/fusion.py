"""Inference speed-ups of a loaded QualiCLIP model, applied by one explicit call (as timm's `reparameterize`).

`fuse_for_inference(model)` does two things, neither of which changes a score beyond float rounding:

- **BatchNorm folding.** Each convolution of the image tower and the BatchNorm after it become one convolution
  (`torch.nn.utils.fusion.fuse_conv_bn_weights`), which spares a full pass over the activations at every layer:
  about a tenth of the image tower's time on a CPU (`benchmarks/model_throughput.py --fusion`).
- **CPU chunking.** An eval-mode batch on a CPU runs through the image tower in chunks of at most
  `CPU_CHUNK_PIXELS` pixels, so that the activations stay in the caches.

A fused model is for inference only: its BatchNorm layers are gone, so it refuses `train()` and `save_pretrained`
(save or train the model as loaded, and fuse a copy).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ..modeling_qualiclip import QualiCLIPModel

# One 512x384 photo, or three 224x224 crops. With RN50 on the project's 2-core CPU this gave 1.21x the images/s of a
# whole batch of 8 at 512x384, 1.11x at 1024x768 and 1.07x for 224x224 crops, with the same scores.
CPU_CHUNK_PIXELS = 512 * 384

__all__ = ["CPU_CHUNK_PIXELS", "fold_batch_norms", "fuse_conv_batch_norm", "fuse_for_inference"]


def fuse_for_inference(model: QualiCLIPModel, cpu_chunk_pixels: int | None = CPU_CHUNK_PIXELS) -> QualiCLIPModel:
    """
    Folds every BatchNorm of the image tower into its convolution and turns on CPU chunking, in place.

    Args:
        model: A loaded model. It is put in eval mode. Calling this on a fused model changes nothing.
        cpu_chunk_pixels: The largest number of pixels per chunk of a CPU batch; `None` keeps batches whole.

    Returns:
        The same model, fused.
    """
    model.eval()
    if not model.is_fused:
        fold_batch_norms(model.vision_model)
        model.is_fused = True
    model.cpu_chunk_pixels = cpu_chunk_pixels
    return model


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
